"""kernels/fp8_matmul.py: per-token fp8 activation quantization and the fp8 GEMM (interpreted on CPU) against
quant.quantize_activation_fp8 + an fp32 product; GPUs before sm_89 are refused."""

from __future__ import annotations

import pytest
import torch

from qwen3export.errors import InputError, TargetError
from qwen3export.kernels import fp8_matmul as fp8
from qwen3export.kernels.config import ARCH_LIMITS, KernelConfig
from qwen3export.quant_format import quantize_activation_fp8, quantize_weight

SMALL = KernelConfig("fp8_matmul", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2,
                     meta={"GROUP_SIZE_M": 2})
# (M, N, K): one decode token, ragged M / N / K off the tiles, K over the quantize kernel's 1024 chunk
SHAPES = [(1, 64, 128), (37, 72, 96), (70, 33, 200), (3, 16, 1100)]
# the codes are identical (same fp32 division and round-to-nearest-even cast); products sum in another order,
# and the output is rounded to x's dtype
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 5e-3)]


def _case(m, n, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 4).to(dtype)
    qw = quantize_weight(torch.randn(n, k, generator=g) * k**-0.5, "fp8")
    return x, qw.qweight, qw.scales


@pytest.mark.parametrize("config", [SMALL, None], ids=["16x32x32", "default"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_fp8_matmul_matches_reference(shape, dtype, atol, rtol, config):
    args = _case(*shape, dtype, seed=shape[0])
    torch.testing.assert_close(fp8.fp8_matmul(*args, config=config), fp8.fp8_matmul_reference(*args),
                               atol=atol, rtol=rtol)


def test_quantize_rows_rounds_like_torch_at_the_edges():
    """Scale 1 (row absmax 448): binade crossings (125.9 -> 128, where the interpreter's own cast gives 64), ties
    to even (124 -> 128, 116 -> 112), subnormals (step 2^-9: 2^-7 + 2^-10 is a tie -> 2^-7), the clamp at 448 and
    negative values: the codes equal torch's round-to-nearest-even cast (a negative value that rounds to zero
    may come out +0 instead of -0)."""
    row = torch.tensor([448.0, 447.0, 125.9, 124.0, 116.0, 2**-7 + 2**-10, 2**-10, 3e-3, -125.9, -0.07, 0.0, 1.0])
    x = torch.stack([row, row / 7, -row * 1e-3])
    codes, scales = fp8.quantize_rows_fp8(x)
    want_codes, want_scales = quantize_activation_fp8(x)
    torch.testing.assert_close(scales, want_scales.view(-1), rtol=0, atol=0)
    assert torch.equal(codes.float(), want_codes.float())
    assert codes[0, 2].item() == 128.0


def test_zero_rows_and_leading_dims():
    x, w, s = _case(6, 32, 64, torch.float32, seed=1)
    x[2] = 0
    out = fp8.fp8_matmul(x.view(2, 3, 64), w, s, SMALL)
    assert out.shape == (2, 3, 32) and torch.equal(out[0, 2], torch.zeros(32))
    torch.testing.assert_close(out, fp8.fp8_matmul_reference(x.view(2, 3, 64), w, s), atol=1e-4, rtol=1e-4)


def test_close_to_the_unquantized_product():
    """Sanity of the whole scheme: e4m3 on both sides keeps a K=256 product within a few percent."""
    g = torch.Generator().manual_seed(2)
    x, w = torch.randn(8, 256, generator=g), torch.randn(48, 256, generator=g) / 16
    qw = quantize_weight(w, "fp8")
    exact = x @ w.t()
    err = (fp8.fp8_matmul(x, qw.qweight, qw.scales, SMALL) - exact).norm() / exact.norm()
    assert err < 0.05


def test_refusals(monkeypatch):
    x, w, s = _case(2, 16, 64, torch.float32)
    with pytest.raises(InputError, match="float8_e4m3fn"):
        fp8.fp8_matmul(x, w.float(), s)
    with pytest.raises(InputError, match="one scale per output channel"):
        fp8.fp8_matmul(x, w, s[:3])
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(TargetError, match="sm_89 or sm_90 GPU .* sm_80: use --quant int8"):
        fp8.check_device(torch.device("cuda", 0))
    assert [a for a, limits in ARCH_LIMITS.items() if fp8.keep(fp8.DEFAULT_CONFIG, limits)] == ["sm_89", "sm_90"]
