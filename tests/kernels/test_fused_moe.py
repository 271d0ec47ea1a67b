"""kernels/fused_moe.py: grouped expert GEMMs (interpreted on CPU) against a loop over experts."""

from __future__ import annotations

import pytest
import torch

from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.fused_moe import fused_moe, fused_moe_reference

# fp16 rounds gate/up, act and each slot's output like the graph does; the reference stays fp32 throughout.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 5e-3, 5e-3)]
SMALL = KernelConfig("fused_moe", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2,
                     meta={"GROUP_SIZE_M": 2})
# (T, H, I, E, k): one decode token, sizes off the tiles, every expert holding every token (k = E), more
# tokens than one 64-row tile
SHAPES = [(1, 64, 32, 8, 2), (37, 96, 48, 16, 4), (20, 64, 32, 4, 4), (5, 48, 40, 8, 2), (70, 32, 32, 4, 2)]
# hidden / moe_intermediate sizes off every tile: the failing checkpoint's 80 / 40 over 6 experts top-2, 136 / 40,
# 72 / 136 (act's rows padded to 48 / 144 elements, act_row_stride)
ODD_SIZES = [(11, 80, 40, 6, 2), (6, 136, 40, 6, 2), (9, 72, 136, 6, 2)]


def _inputs(t, h, i, e, k, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g)
    gate_up = torch.randn(e, 2 * i, h, generator=g) * h ** -0.5
    down = torch.randn(e, h, i, generator=g) * i ** -0.5
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.softmax(torch.randn(t, k, generator=g), -1)
    return x.to(dtype), gate_up.to(dtype), down.to(dtype), weights.to(dtype), ids


@pytest.mark.parametrize("config", [SMALL, None], ids=["16x32x32", "default"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_fused_moe_matches_reference(shape, dtype, atol, rtol, config):
    args = _inputs(*shape, dtype, seed=shape[0])
    torch.testing.assert_close(fused_moe(*args, config=config), fused_moe_reference(*args), atol=atol, rtol=rtol)


@pytest.mark.parametrize("config", [SMALL, None], ids=["16x32x32", "default"])
@pytest.mark.parametrize("shape", ODD_SIZES, ids=lambda s: f"h{s[1]}i{s[2]}")
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_fused_moe_sizes_not_a_power_of_two(shape, dtype, atol, rtol, config):
    test_fused_moe_matches_reference(shape, dtype, atol, rtol, config)


@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_fused_moe_one_expert_takes_every_token_others_none(dtype, atol, rtol):
    x, gate_up, down, _, _ = _inputs(33, 64, 32, 8, 2, dtype, seed=4)
    ids = torch.full((33, 2), 6)
    ids[:, 1] = torch.arange(33) % 2  # experts 0 and 1 share slot 1; experts 2-5 and 7 get nothing
    weights = torch.full((33, 2), 0.5).to(dtype)
    torch.testing.assert_close(fused_moe(x, gate_up, down, weights, ids, SMALL),
                               fused_moe_reference(x, gate_up, down, weights, ids), atol=atol, rtol=rtol)


def test_fused_moe_bf16_values_by_casting():
    """tl.dot on bf16 operands returns garbage in the Triton 3.9 interpreter (DESIGN.md §5), so bf16 data
    is checked by casting to fp32 (exact) and the bf16 specialisation is covered by test_compile.py."""
    args = _inputs(9, 64, 32, 8, 2, torch.bfloat16, seed=5)
    as_fp32 = [a.float() if a.is_floating_point() else a for a in args]
    torch.testing.assert_close(fused_moe(*as_fp32, config=SMALL), fused_moe_reference(*args).float(),
                               atol=2e-2, rtol=2e-2)
