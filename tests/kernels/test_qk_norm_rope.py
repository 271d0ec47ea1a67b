"""kernels/qk_norm_rope.py: the fused per-head RMSNorm + RoPE (interpreted on CPU) against the graph's ops."""

from __future__ import annotations

import pytest
import torch

from qwen3export.graphs.decoder import rope_cos_sin
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference

# bf16: no tl.dot here, so it runs in the interpreter, whose fp32->bf16 casts truncate (GPUs round to
# nearest even): results may sit 1-2 bf16 ulp off, hence the looser bf16 tolerance.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 4e-3, 4e-3), (torch.bfloat16, 3e-2, 3e-2)]
# (B, S, Hq, Hkv, D, first position)
SHAPES = [(1, 1, 2, 1, 64, 37), (2, 5, 4, 2, 64, 0), (1, 7, 3, 1, 128, 5), (2, 3, 16, 8, 128, 1000),
          (1, 2, 5, 5, 96, 3)]
# head_dims that are not powers of two: halves of 12 / 36 / 40 / 10 in BLOCK_HALF 16 / 64 / 64 / 16 lanes, so a
# half read at BLOCK_HALF instead of D / 2, or a padded lane in the mean of squares, shows here
ODD_HEAD_DIMS = [(2, 3, 4, 2, 24, 7), (1, 4, 3, 1, 72, 100), (2, 2, 4, 2, 80, 0), (1, 3, 2, 2, 20, 11)]


def _inputs(b, s, hq, hkv, d, start, dtype, fused_qkv=False):
    torch.manual_seed(b * 100 + s)
    if fused_qkv:  # q and k as views of one fused projection: row strides span q, k and v
        qkv = torch.randn(b, s, (hq + 2 * hkv) * d).to(dtype)
        q = qkv[..., : hq * d].view(b, s, hq, d)
        k = qkv[..., hq * d: (hq + hkv) * d].view(b, s, hkv, d)
    else:
        q, k = torch.randn(b, s, hq, d).to(dtype), torch.randn(b, s, hkv, d).to(dtype)
    qw, kw = (1 + 0.2 * torch.randn(d)).to(dtype), (1 + 0.2 * torch.randn(d)).to(dtype)
    inv_freq = 1.0 / (1e6 ** (torch.arange(0, d, 2).float() / d))  # Qwen3 rope_theta 1e6
    positions = torch.arange(start, start + s)[None].expand(b, s) + torch.arange(b)[:, None]
    cos, sin = rope_cos_sin(positions, inv_freq, dtype)
    return q, k, qw, kw, cos, sin


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_qk_norm_rope_matches_reference(shape, dtype, atol, rtol):
    b, s, hq, hkv, d, start = shape
    args = _inputs(b, s, hq, hkv, d, start, dtype)
    q_out, k_out = qk_norm_rope(*args, 1e-6)
    q_ref, k_ref = qk_norm_rope_reference(*args, 1e-6)
    assert q_out.shape == (b, hq, s, d) and k_out.shape == (b, hkv, s, d)
    torch.testing.assert_close(q_out, q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(k_out, k_ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", ODD_HEAD_DIMS, ids=lambda s: f"d{s[4]}")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_qk_norm_rope_head_dims_not_a_power_of_two(shape, dtype, atol, rtol):
    test_qk_norm_rope_matches_reference(shape, dtype, atol, rtol)


@pytest.mark.parametrize("config", [KernelConfig("qk_norm_rope", {"BLOCK_H": 1}, num_warps=1, num_stages=1),
                                    KernelConfig("qk_norm_rope", {"BLOCK_H": 16}, num_warps=8, num_stages=1)])
def test_qk_norm_rope_fused_qkv_views_and_broadcast_positions(config):
    q, k, qw, kw, cos, sin = _inputs(2, 3, 6, 2, 64, 11, torch.float32, fused_qkv=True)
    cos, sin = cos[:1], sin[:1]  # one position table broadcast over the batch
    got = qk_norm_rope(q, k, qw, kw, cos, sin, 1e-6, config)
    ref = qk_norm_rope_reference(q, k, qw, kw, cos, sin, 1e-6)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)
