"""kernels/fused_moe_wq.py: fused MoE with int8 / int4 experts (interpreted on CPU) against quant.dequantize +
fused_moe's loop-over-experts reference."""

from __future__ import annotations

import pytest
import torch

from qwen3export.errors import InputError
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.fused_moe_wq import fused_moe_wq, fused_moe_wq_reference
from qwen3export.quant_format import quantize_weight

from quant_cases import cross_compile, partial_weight

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


# (T, H, I, E, k, group): partial last groups in both weights (H 72 = 2 x 32 + 8, I 40 = 32 + 8), in gate_up only
# (H 96 over 64, I 64), one partial group each (128 over H 72 and I 24), odd H and I (71, 33 over 16)
PARTIAL_SHAPES = [(9, 72, 40, 4, 2, 32), (7, 96, 64, 4, 2, 64), (6, 72, 24, 4, 4, 128), (5, 71, 33, 4, 2, 16)]


def _partial_inputs(t, h, i, e, k, group, mode, zero_points, dtype, seed):
    gate_up = partial_weight((e,), 2 * i, h, mode, group, zero_points, seed, scale_dtype=torch.float16)
    down = partial_weight((e,), h, i, mode, group, zero_points, seed + 1, scale_dtype=torch.float16)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])
    weights = torch.softmax(torch.randn(t, k, generator=g), -1).to(dtype)
    return (x, (gate_up.qweight, gate_up.scales.to(dtype), gate_up.zero_points),
            (down.qweight, down.scales.to(dtype), down.zero_points), weights, ids, gate_up.bits)


@pytest.mark.parametrize("shape", PARTIAL_SHAPES)
@pytest.mark.parametrize("mode,zero_points", MODES + [("int8", True)])
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_partial_last_groups(shape, mode, zero_points, dtype, atol, rtol):
    """Groups that do not divide H or I: the expert rows hold whole groups, the last one padded; the group size
    follows from the stored width over the scales' groups, K from x (H) and gate_up's rows (I). int8 in groups
    is a GPTQ 8-bit layout."""
    args = _partial_inputs(*shape, mode, zero_points, dtype, seed=shape[0])
    assert args[1][0].shape[-1] * 8 // args[5] > shape[1]  # gate_up padded
    torch.testing.assert_close(fused_moe_wq(*args, config=SMALL), fused_moe_wq_reference(*args), atol=atol, rtol=rtol)


def test_partial_groups_default_config():
    """DEFAULT_CONFIG's BLOCK_K 64 over H 72 in groups of 32: capped at the group, the tail masked."""
    args = _partial_inputs(70, 72, 40, 4, 2, 32, "int4", True, torch.float16, seed=8)
    torch.testing.assert_close(fused_moe_wq(*args), fused_moe_wq_reference(*args), atol=1e-2, rtol=1e-2)


def test_partial_groups_cross_compile():
    """The compile shape H 72 / I 40 in groups of 32: BLOCK_K capped at 32 in both kernels, no divisibility hint on
    H, I or what they make, and both functions compile for sm_80 without spills."""
    from qwen3export.kernels.fused_moe_wq import DEFAULT_CONFIG, compile_specs

    shape = {"bits": 4, "hidden": 72, "inter": 40, "group": 32, "zero_points": 0}
    specs = compile_specs(DEFAULT_CONFIG, "fp16", shape)
    assert [s.constexprs["BLOCK_K"] for s in specs] == [32, 32]
    # rows of 48 (3 groups) / 32 bytes, scales' expert strides 80 x 3 / 72 x 2: multiples of 16; H, I, act's are not
    assert [set(s.aligned) for s in specs] == [{"group_size", "stride_qn", "stride_qe", "stride_se"}] * 2
    for measured in cross_compile("fused_moe_wq", DEFAULT_CONFIG, "fp16", shape):
        assert "error" not in measured and measured["spill_bytes"] == 0, measured


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
