"""kernels/attention_decode.py: flash-decoding split + reduce (interpreted on CPU) against the reference."""

from __future__ import annotations

import pytest
import torch

from qwen3export.kernels.attention_decode import attention_decode, attention_decode_reference
from qwen3export.kernels.attention_prefill import attention_prefill
from qwen3export.kernels.config import KernelConfig

# bf16 is absent: tl.dot on bf16 operands returns garbage in the Triton 3.9 interpreter (DESIGN.md §5);
# test_compile.py compiles the bf16 specialisation.
DTYPES = [(torch.float32, 2e-5, 2e-5), (torch.float16, 2e-3, 2e-3)]


def _config(block_n, splits):
    return KernelConfig("attention_decode", {"BLOCK_N": block_n}, num_warps=4, num_stages=1,
                        meta={"NUM_SPLITS": splits})


CONFIGS = [_config(16, 4), None]  # None: DEFAULT_CONFIG
# (B, Hq, Hkv, L, D): MHA, GQA groups of 2 / 4 / 16 (235B-A22B), a cache shorter than one block, head_dim 128
SHAPES = [(2, 2, 2, 40, 64), (1, 4, 2, 77, 64), (3, 8, 2, 5, 64), (1, 16, 1, 33, 64), (2, 4, 1, 70, 128)]
# head_dims that are not powers of two, run in BLOCK_D 32 / 128 / 128 / 128 with the lanes past D masked
ODD_HEAD_DIMS = [(2, 4, 2, 37, 24), (1, 4, 2, 20, 72), (1, 2, 1, 33, 80), (2, 8, 2, 19, 96)]


def _qkv(b, hq, hkv, length, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, hq, 1, d, generator=g).to(dtype), torch.randn(b, hkv, length, d, generator=g).to(dtype),
            torch.randn(b, hkv, length, d, generator=g).to(dtype))


@pytest.mark.parametrize("config", CONFIGS, ids=["n16s4", "default"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_attention_decode_matches_reference(shape, dtype, atol, rtol, config):
    q, k, v = _qkv(*shape, dtype)
    torch.testing.assert_close(attention_decode(q, k, v, config=config), attention_decode_reference(q, k, v),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("config", CONFIGS, ids=["n16s4", "default"])
@pytest.mark.parametrize("shape", ODD_HEAD_DIMS, ids=lambda s: f"d{s[-1]}")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_attention_decode_head_dims_not_a_power_of_two(shape, dtype, atol, rtol, config):
    q, k, v = _qkv(*shape, dtype, seed=shape[-1])
    kv_lens = torch.tensor([shape[3], shape[3] // 2][: shape[0]])
    torch.testing.assert_close(attention_decode(q, k, v, kv_lens=kv_lens, config=config),
                               attention_decode_reference(q, k, v, kv_lens=kv_lens), atol=atol, rtol=rtol)


@pytest.mark.parametrize("config", [_config(16, 1), _config(32, 32)], ids=["one split", "more splits than blocks"])
def test_attention_decode_split_extremes(config):
    q, k, v = _qkv(2, 4, 2, 45, 64, torch.float32, seed=3)
    torch.testing.assert_close(attention_decode(q, k, v, config=config), attention_decode_reference(q, k, v),
                               atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("config", CONFIGS, ids=["n16s4", "default"])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_attention_decode_batch_with_different_cache_lengths(dtype, atol, rtol, config):
    """A static cache of capacity 64 holding 64, 9, 1 and 0 valid positions, plus left padding in row 0."""
    q, k, v = _qkv(4, 8, 2, 64, 64, dtype, seed=1)
    kv_lens = torch.tensor([64, 9, 1, 0])
    key_mask = torch.ones(4, 64, dtype=torch.bool)
    key_mask[0, :20] = False
    out = attention_decode(q, k, v, kv_lens=kv_lens, key_mask=key_mask, config=config)
    ref = attention_decode_reference(q, k, v, kv_lens=kv_lens, key_mask=key_mask)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    assert (out[3] == 0).all()  # an empty row attends to nothing


def test_attention_decode_agrees_with_prefill_for_one_query():
    q, k, v = _qkv(2, 4, 2, 50, 64, torch.float32, seed=2)
    kv_lens = torch.tensor([50, 23])
    torch.testing.assert_close(attention_decode(q[:, :, 0], k, v, kv_lens=kv_lens, config=_config(16, 2)),
                               attention_prefill(q, k, v, kv_lens=kv_lens)[:, :, 0], atol=2e-5, rtol=2e-5)
