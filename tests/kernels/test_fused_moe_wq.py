"""kernels/fused_moe_wq.py: fused MoE with int8 / int4 experts (interpreted on CPU) against quant.dequantize +
fused_moe's loop-over-experts reference."""

from __future__ import annotations

import pytest
import torch

from qwen3export.errors import InputError
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.fused_moe_wq import fused_moe_wq, fused_moe_wq_reference
from qwen3export.quant import quantize_weight

# fp16 rounds each dequantized weight, gate/up, act and each slot's output; the reference stays fp32.
DTYPES = [(torch.float32, 1e-4, 1e-4), (torch.float16, 1e-2, 1e-2)]
SMALL = KernelConfig("fused_moe_wq", {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32}, num_warps=4, num_stages=2,
                     meta={"GROUP_SIZE_M": 2})
# (T, H, I, E, k, group): one decode token, ragged T and I off the tiles, every expert holding every token
# (k = E), more tokens than one 64-row tile; group 16 below BLOCK_K (capped)
SHAPES = [(1, 64, 32, 8, 2, 32), (37, 96, 48, 16, 4, 16), (20, 64, 32, 4, 4, 32), (70, 32, 64, 4, 2, 32)]


def _inputs(t, h, i, e, k, group, mode, dtype, zero_points=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    packed = []
    for w in (torch.randn(e, 2 * i, h, generator=g) * h**-0.5, torch.randn(e, h, i, generator=g) * i**-0.5):
        qw = quantize_weight(w, mode, group)
        zeros = ((2 ** (qw.bits - 1) + torch.randint(-2, 3, qw.scales.shape, generator=g)).to(torch.uint8)
                 if zero_points else None)
        packed.append((qw.qweight, qw.scales.to(dtype), zeros))
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(dtype)
    return x, packed[0], packed[1], weights, ids, 4 if mode == "int4" else 8


MODES = [("int4", False), ("int4", True), ("int8", False)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode,zero_points", MODES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_fused_moe_wq_matches_reference(shape, mode, zero_points, dtype, atol, rtol):
    args = _inputs(*shape, mode, dtype, zero_points, seed=shape[0])
    torch.testing.assert_close(fused_moe_wq(*args, config=SMALL), fused_moe_wq_reference(*args),
                               atol=atol, rtol=rtol)


@pytest.mark.parametrize("mode,zero_points", MODES)
def test_default_config(mode, zero_points):
    """DEFAULT_CONFIG's 32-row tiles over 70 tokens x 2 slots; BLOCK_K 64 capped at the group size 32."""
    args = _inputs(70, 64, 32, 4, 2, 32, mode, torch.float16, zero_points, seed=7)
    torch.testing.assert_close(fused_moe_wq(*args), fused_moe_wq_reference(*args), atol=1e-2, rtol=1e-2)


def test_int8_per_channel_groups_differ_between_gate_up_and_down():
    """int8 is per channel: one group of H in gate_up, of I in down; both follow from the scales' shapes."""
    x, gate_up, down, weights, ids, bits = _inputs(9, 64, 48, 4, 2, None, "int8", torch.float32, seed=2)
    assert gate_up[1].shape == (4, 96, 1) and down[1].shape == (4, 64, 1)
    torch.testing.assert_close(fused_moe_wq(x, gate_up, down, weights, ids, bits, SMALL),
                               fused_moe_wq_reference(x, gate_up, down, weights, ids, bits), atol=1e-4, rtol=1e-4)


def test_one_expert_takes_every_token_others_none():
    x, gate_up, down, _, _, bits = _inputs(33, 64, 32, 8, 2, 32, "int4", torch.float32, seed=4)
    ids = torch.full((33, 2), 6)
    ids[:, 1] = torch.arange(33) % 2  # experts 0 and 1 share slot 1; experts 2-5 and 7 get nothing
    weights = torch.full((33, 2), 0.5)
    torch.testing.assert_close(fused_moe_wq(x, gate_up, down, weights, ids, bits, SMALL),
                               fused_moe_wq_reference(x, gate_up, down, weights, ids, bits), atol=1e-4, rtol=1e-4)


def test_bf16_values_by_casting():
    """bf16 tl.dot is wrong in the Triton 3.9 interpreter (DESIGN.md §5): bf16 data checked through fp32."""
    x, gu, dn, weights, ids, bits = _inputs(9, 64, 32, 8, 2, 32, "int4", torch.bfloat16, True, seed=5)
    as_fp32 = [(q, s.float(), z) for q, s, z in (gu, dn)]
    got = fused_moe_wq(x.float(), *as_fp32, weights.float(), ids, bits, SMALL)
    torch.testing.assert_close(got, fused_moe_wq_reference(x, gu, dn, weights, ids, bits).float(),
                               atol=3e-2, rtol=3e-2)


def test_shape_errors():
    x, gu, dn, weights, ids, bits = _inputs(3, 64, 32, 4, 2, 32, "int4", torch.float32)
    with pytest.raises(InputError, match="must be \\[T, H\\]"):
        fused_moe_wq(x[:, :32], gu, dn, weights, ids, bits)
    with pytest.raises(InputError, match="gate_up scales"):
        fused_moe_wq(x, (gu[0][0], gu[1][0], None), dn, weights, ids, bits)
