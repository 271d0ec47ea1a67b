"""kernels/wq_matmul.py: the W8A16 / W4A16 dequantize-GEMM (interpreted on CPU) against quant.dequantize + matmul."""

from __future__ import annotations

import pytest
import torch

from qwen3export.errors import InputError, WeightsError
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.wq_matmul import wq_matmul, wq_matmul_reference
from qwen3export.quant_format import quantize_weight

from quant_cases import PARTIAL, cross_compile, partial_weight

# The kernel rounds each dequantized weight to x's dtype before tl.dot (fp16: 2^-11 relative), the reference
# keeps it fp32; fp32 sums in a different order.
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 2e-2, 1e-2)]
SMALL = KernelConfig("wq_matmul", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2,
                     meta={"GROUP_SIZE_M": 2})
# (M, N, K, group): one decode token, ragged M and N off the tiles, several K tiles per group, groups smaller
# than the default BLOCK_K (capped), per-channel int8 with K off the tile
SHAPES = [(1, 64, 128, 32), (37, 72, 256, 64), (5, 40, 64, 16), (70, 33, 128, 128)]


def _case(m, n, k, group, mode, dtype, zero_points=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g).to(dtype)
    qw = quantize_weight(torch.randn(n, k, generator=g) * k**-0.5, mode, group, scale_dtype=torch.float16)
    zeros = None
    if zero_points:  # asymmetric (AWQ / GPTQ style): random zero points, codes kept
        zeros = (2 ** (qw.bits - 1) + torch.randint(-2, 3, qw.scales.shape, generator=g)).to(torch.uint8)
    return x, qw.qweight, qw.scales.to(dtype), zeros, qw.bits, qw.group_size


@pytest.mark.parametrize("config", [SMALL, None], ids=["16x32x32", "default"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode,zero_points", [("int4", False), ("int4", True), ("int8", False), ("int8", True)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_wq_matmul_matches_reference(shape, mode, zero_points, dtype, atol, rtol, config):
    args = _case(*shape, mode, dtype, zero_points, seed=shape[0])
    torch.testing.assert_close(wq_matmul(*args, config=config), wq_matmul_reference(*args), atol=atol, rtol=rtol)


@pytest.mark.parametrize("config", [SMALL, None], ids=["16x32x32", "default"])
@pytest.mark.parametrize("k,group", PARTIAL)
@pytest.mark.parametrize("mode,zero_points", [("int4", False), ("int4", True), ("int8", False), ("int8", True)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_partial_last_group(k, group, mode, zero_points, dtype, atol, rtol, config):
    """A group size that does not divide K: qweight rows hold whole groups, the last one padded; the kernel
    masks k >= K (x's last dim), so it reads the partial group's scale and never the padding. int8 in groups
    is a GPTQ 8-bit layout (RTN int8 is per channel)."""
    qw = partial_weight((), 40, k, mode, group, zero_points, seed=k, scale_dtype=torch.float16)
    assert qw.qweight.shape[-1] * 8 // qw.bits > k  # padded
    x = torch.randn(9, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    args = (x, qw.qweight, qw.scales.to(dtype), qw.zero_points, qw.bits, group)
    torch.testing.assert_close(wq_matmul(*args, config=config), wq_matmul_reference(*args), atol=atol, rtol=rtol)


@pytest.mark.parametrize("k", [71, 72, 100])
def test_int8_per_channel_with_k_off_the_tile(k):
    """int8's one group spans all of K, so K need not be a multiple of BLOCK_K (or even, or of 16)."""
    args = _case(9, 48, k, None, "int8", torch.float32, seed=3)
    assert args[5] == k
    torch.testing.assert_close(wq_matmul(*args, config=SMALL), wq_matmul_reference(*args), atol=1e-4, rtol=1e-4)


def test_leading_dims_are_kept():
    x, *rest = _case(6, 32, 64, 32, "int4", torch.float32, seed=4)
    x3 = x.view(2, 3, 64)
    out = wq_matmul(x3, *rest, config=SMALL)
    assert out.shape == (2, 3, 32)
    torch.testing.assert_close(out, wq_matmul_reference(x3, *rest), atol=1e-4, rtol=1e-4)


def test_bf16_values_by_casting():
    """tl.dot on bf16 operands is wrong in the Triton 3.9 interpreter (DESIGN.md §5): bf16 activations and scales
    are checked through fp32 (exact casts); the bf16 specialisation is compiled by test_compile.py."""
    x, qweight, scales, zeros, bits, group = _case(7, 64, 128, 32, "int4", torch.bfloat16, True, seed=5)
    got = wq_matmul(x.float(), qweight, scales.float(), zeros, bits, group, SMALL)
    torch.testing.assert_close(got, wq_matmul_reference(x, qweight, scales, zeros, bits, group).float(),
                               atol=3e-2, rtol=2e-2)


def test_bad_arguments():
    x, qweight, scales, zeros, bits, group = _case(2, 32, 64, 32, "int4", torch.float32)
    with pytest.raises(InputError, match="must be floating point"):
        wq_matmul(x[:, :32], qweight, scales, zeros, bits, group)
    with pytest.raises(InputError, match="bits=3"):
        wq_matmul(x, qweight, scales, zeros, 3, group)
    with pytest.raises(WeightsError, match="scales"):
        wq_matmul(x, qweight, scales[:, :1], zeros, bits, group)
    # K = 72 with groups of 32 is 3 groups, the last partial; 60 leaves the third one empty
    qw = quantize_weight(torch.randn(8, 72), "int4", 32)
    with pytest.raises(InputError, match="K in 65..96"):
        wq_matmul(torch.randn(2, 60), qw.qweight, qw.scales.float(), None, 4, 32)


def test_partial_group_cross_compiles():
    """The compile shape of a partial last group (K = 72, groups of 32) gives BLOCK_K capped at the group
    (3 groups), no divisibility hint on K, x's or the output's row stride, and compiles for sm_80 without
    spills: the kernels backend's binary for such a model."""
    from qwen3export.kernels.wq_matmul import DEFAULT_CONFIG, compile_specs

    shape = {"bits": 4, "K": 72, "N": 200, "group": 32, "zero_points": 1}
    spec, = compile_specs(DEFAULT_CONFIG, "fp16", shape)
    assert spec.constexprs["BLOCK_K"] == 32
    assert set(spec.aligned) == {"group_size", "stride_qn"}  # 3 x 32 codes = 48 bytes a row
    measured, = cross_compile("wq_matmul", DEFAULT_CONFIG, "fp16", shape)
    assert "error" not in measured and measured["spill_bytes"] == 0, measured
    exact, = compile_specs(DEFAULT_CONFIG, "fp16", {"bits": 4, "K": 4096, "N": 4096, "group": 128, "zero_points": 0})
    assert set(exact.aligned) == {"N", "K", "group_size", "stride_xm", "stride_qn", "stride_om"}
