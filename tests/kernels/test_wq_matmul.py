"""kernels/wq_matmul.py: the W8A16 / W4A16 dequantize-GEMM (interpreted on CPU) against quant.dequantize + matmul."""

from __future__ import annotations

import pytest
import torch

from qwen3export.errors import InputError, WeightsError
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.wq_matmul import wq_matmul, wq_matmul_reference
from qwen3export.quant import quantize_weight

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


def test_int8_per_channel_with_k_off_the_tile():
    """int8's one group spans all of K, so K need not be a multiple of BLOCK_K (here 100)."""
    args = _case(9, 48, 100, None, "int8", torch.float32, seed=3)
    assert args[5] == 100
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
