"""kernels/rms_norm.py: the Triton kernel (interpreted on CPU) against the graph's RMSNorm."""

from __future__ import annotations

import pytest
import torch

from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference

# bf16 runs through the interpreter here (no tl.dot in this kernel), but the interpreter truncates
# fp32->bf16 casts (triton/runtime/interpreter.py cast_impl passes no rounding mode) where GPUs round to
# nearest even: bf16 results may sit 1 ulp (2^-8 relative) off, which the bf16 tolerance admits.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 2e-3, 2e-3), (torch.bfloat16, 1.6e-2, 1.6e-2)]
# hidden sizes off the power-of-two block: 123, 1000, and 80 / 136 / 72 (BLOCK_N 128 / 256 / 128, so a padded
# column counted in the mean of squares would show)
SHAPES = [(2, 3, 64), (5, 123), (1, 1, 1), (3, 1000), (2, 2, 1024), (3, 80), (2, 2, 136), (4, 72)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_rms_norm_matches_reference(shape, dtype, atol, rtol):
    torch.manual_seed(0)
    x = torch.randn(shape).mul(3).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    torch.testing.assert_close(rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6), atol=atol, rtol=rtol)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_add_rms_norm_matches_reference(shape, dtype, atol, rtol):
    torch.manual_seed(1)
    x, r = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    w = (1 + 0.1 * torch.randn(shape[-1])).to(dtype)
    out, total = add_rms_norm(x, r, w, 1e-6)
    ref_out, ref_total = add_rms_norm_reference(x, r, w, 1e-6)
    # one rounding of an exact sum either way (bf16: the interpreter truncates, see DTYPES)
    exact = dtype != torch.bfloat16
    torch.testing.assert_close(total, ref_total, atol=0 if exact else atol, rtol=0 if exact else rtol)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)


@pytest.mark.parametrize("config", [KernelConfig("rms_norm", {"BLOCK_ROWS": 4}, num_warps=1, num_stages=1),
                                    KernelConfig("rms_norm", {"BLOCK_ROWS": 2}, num_warps=16, num_stages=1)])
def test_rms_norm_configs_and_strided_rows(config):
    torch.manual_seed(2)
    base = torch.randn(7, 2, 96)
    x = base[:, 1]  # rows 192 elements apart: a strided [7, 96] view
    w = torch.randn(96)
    torch.testing.assert_close(rms_norm(x, w, 1e-5, config), rms_norm_reference(x, w, 1e-5), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("x_dtype,w_dtype", [(torch.float16, torch.float32), (torch.float32, torch.float16)])
def test_rms_norm_mixed_dtypes_write_the_weights_dtype_like_the_graph(x_dtype, w_dtype):
    """fp32 x with fp16 weights is an fp16 decoder's residual stream entering a norm (graphs/decoder.py)."""
    x = torch.randn(3, 64, dtype=x_dtype) * 300
    w = torch.randn(64, dtype=w_dtype)
    out = rms_norm(x, w, 1e-6)
    assert out.dtype == w_dtype
    torch.testing.assert_close(out, rms_norm_reference(x, w, 1e-6), atol=1e-3, rtol=1e-3)
