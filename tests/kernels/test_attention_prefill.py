"""kernels/attention_prefill.py: causal GQA flash attention (interpreted on CPU) against the reference,
and the reference against the graph's additive-mask attention."""

from __future__ import annotations

import pytest
import torch

from qwen3export.graphs.decoder import attention_mask_bias
from qwen3export.kernels.attention_prefill import attention_prefill, attention_prefill_reference, visible_keys
from qwen3export.kernels.config import KernelConfig

# bf16 is absent: tl.dot on bf16 operands returns garbage in the Triton 3.9 interpreter (DESIGN.md §5);
# the bf16 path differs from fp16 only in the operand type, which test_compile.py compiles.
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3)]
SMALL = KernelConfig("attention_prefill", {"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=1)
CONFIGS = [SMALL, None]  # None: DEFAULT_CONFIG (128 x 64)
# (B, Hq, Hkv, S, L, D): prefill, prefill with past, several blocks, a single query, head_dim 128
SHAPES = [(1, 2, 1, 5, 5, 64), (2, 4, 2, 3, 20, 64), (1, 2, 2, 37, 37, 64), (2, 4, 1, 1, 17, 64),
          (1, 2, 1, 19, 40, 128)]
# head_dims that are not powers of two (converted and small test models): BLOCK_D 32 / 128 / 128 / 128 with
# the lanes past D masked; 24 is the failing Qwen3-MoE checkpoint's
ODD_HEAD_DIMS = [(1, 4, 2, 9, 21, 24), (2, 2, 1, 5, 13, 72), (1, 2, 2, 3, 30, 80), (1, 4, 2, 17, 17, 96)]


def _qkv(b, hq, hkv, s, length, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, s, d, generator=g).to(dtype)
    k = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    v = torch.randn(b, hkv, length, d, generator=g).to(dtype)
    return q, k, v


@pytest.mark.parametrize("config", CONFIGS, ids=["16x16", "default"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_attention_prefill_matches_reference(shape, dtype, atol, rtol, config):
    q, k, v = _qkv(*shape, dtype)
    torch.testing.assert_close(attention_prefill(q, k, v, config=config), attention_prefill_reference(q, k, v),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("config", CONFIGS, ids=["16x16", "default"])
@pytest.mark.parametrize("shape", ODD_HEAD_DIMS, ids=lambda s: f"d{s[-1]}")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_attention_prefill_head_dims_not_a_power_of_two(shape, dtype, atol, rtol, config):
    q, k, v = _qkv(*shape, dtype, seed=shape[-1])
    kv_lens = torch.tensor([shape[4] - 2] * shape[0])  # the last cache slots hold no key (a static cache)
    torch.testing.assert_close(attention_prefill(q, k, v, kv_lens=kv_lens, config=config),
                               attention_prefill_reference(q, k, v, kv_lens=kv_lens), atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_attention_prefill_per_row_lengths_and_left_padding(dtype, atol, rtol):
    b, hq, hkv, s, length, d = 4, 4, 2, 6, 29, 64
    q, k, v = _qkv(b, hq, hkv, s, length, d, dtype, seed=3)
    kv_lens = torch.tensor([29, 11, 6, 3])  # the last row has fewer keys than queries: early rows see nothing
    key_mask = torch.ones(b, length, dtype=torch.int64)
    key_mask[0, :7] = 0  # left padding
    key_mask[1, 4:6] = 0  # holes
    out = attention_prefill(q, k, v, kv_lens=kv_lens, key_mask=key_mask, config=SMALL)
    ref = attention_prefill_reference(q, k, v, kv_lens=kv_lens, key_mask=key_mask)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    assert (out[3, :, :3] == 0).all()  # queries at positions < 0 see no key


def test_attention_prefill_bool_mask_strided_cache_and_scale():
    q, k, v = _qkv(2, 4, 2, 5, 24, 64, torch.float32, seed=5)
    cache = torch.randn(2, 2, 40, 64)  # a preallocated cache read through a [.., :24, :] view
    cache[:, :, :24] = k
    key_mask = torch.rand(2, 24) > 0.3
    key_mask[:, -5:] = True
    out = attention_prefill(q, cache[:, :, :24], v, scale=0.2, key_mask=key_mask, config=SMALL)
    torch.testing.assert_close(out, attention_prefill_reference(q, k, v, scale=0.2, key_mask=key_mask),
                               atol=2e-5, rtol=2e-5)


def test_reference_is_the_graph_attention_where_a_key_is_visible():
    """graphs/decoder.py adds attention_mask_bias (finfo.min off the causal/padding pattern); rows with at
    least one visible key agree, padding rows with none are 0 in the kernels and arbitrary in the graph."""
    b, hq, hkv, s, length, d = 2, 4, 2, 6, 10, 64
    q, k, v = _qkv(b, hq, hkv, s, length, d, torch.float32, seed=7)
    attention_mask = torch.ones(b, length, dtype=torch.int64)
    attention_mask[1, :6] = 0  # left padding: query 0 of row 1 (position 4) sees nothing
    bias = attention_mask_bias(attention_mask, s, torch.float32)  # [B, 1, 1, S, L]
    qg = q.view(b, hkv, hq // hkv, s, d)
    scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * d ** -0.5 + bias
    graph = torch.matmul(torch.softmax(scores, -1), v[:, :, None]).reshape(b, hq, s, d)
    ref = attention_prefill_reference(q, k, v, key_mask=attention_mask)
    seen = visible_keys(b, s, length, None, attention_mask, q.device).any(-1)  # [B, S]
    assert not seen.all()
    torch.testing.assert_close(ref.transpose(1, 2)[seen], graph.transpose(1, 2)[seen], atol=1e-5, rtol=1e-5)
    assert (ref.transpose(1, 2)[~seen] == 0).all()
