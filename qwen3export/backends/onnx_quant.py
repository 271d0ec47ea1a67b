"""ONNX translations of a weight-only quantized linear (qwen3export/quant.py QuantizedWeight, int4 / int8), for the
emit stage: ONNX Runtime's com.microsoft MatMulNBits (the `ort` flavour) and standard DequantizeLinear (opset 21,
blocked) + MatMul (the TensorRT flavour). Each returns (nodes, initializers) for y = x @ W^T, x [..., K] -> [..., N].

A group size that does not divide K (quant.QuantizedWeight: the last group partial, its codes padded) maps onto
what each op takes, checked in ONNX Runtime 1.31 CPU: MatMulNBits' B [N, ceil(K/block), blob] with the last block
padded; DequantizeLinear-21's blocked scales [ceil(K/block), N] over codes [K, N]; QMoE's codes [E, N, K*bits/8]
unpadded with scales [E, N, ceil(K/block)] (it dequantizes such weights itself, then SGEMM; its int4 needs an even
K: moe_helper.h "hidden_size must be divisible by pack_size").
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import torch
from onnx import NodeProto, TensorProto, helper
from onnxscript import opset21 as op21

from qwen3export.errors import InputError
from qwen3export.quant_format import (ACCURACY_LEVELS, FP8_MAX, QuantizedWeight, nbits_block, pack_int4,
                                      qmoe_block)

from .onnx_ops import FLAVOURS, FLOAT, float_const, int64s, ort_op, static_dim, moe

# DequantizeLinear's block_size and the INT4 / UINT4 types arrived in opset 21 (onnx Changelog, DequantizeLinear-21);
# the quantized translations below are written against it, so a decoder holding them is exported at 21
OPSET = 21
ONNX_FLOAT = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16}


def _check(qw: QuantizedWeight) -> tuple[int, int]:
    if qw.mode not in ("int4", "int8") or len(qw.shape) != 2:
        raise InputError(f"ONNX quantized linear: a 2-D int4/int8 weight is needed, got {qw.mode} {list(qw.shape)} "
                         "(fp8 and stacked experts take other translations)")
    return qw.shape


def matmul_nbits_block(qw: QuantizedWeight) -> int:
    """nbits_block of a QuantizedWeight."""
    return nbits_block(qw.group_size, qw.in_features, qw.n_groups)


def _per_block(t: torch.Tensor, group: int, n_groups: int, block: int, k: int) -> torch.Tensor:
    """Per-group values [..., G] -> per-block [..., ceil(K/block)]: block b lies in group b * block // group."""
    index = torch.arange(-(-k // block)) * block // group if n_groups > 1 else torch.zeros(-(-k // block),
                                                                                          dtype=torch.long)
    return t[..., index]


def _blocked_codes(qw: QuantizedWeight, block: int) -> torch.Tensor:
    """Codes [..., N, ceil(K/block) * block]: the real K columns, the last block padded with its zero point (as
    ONNX Runtime's quantizer pads; MatMulNBits reads no column past K)."""
    k = qw.in_features
    zeros = _per_block(qw.zeros(), qw.group_size, qw.n_groups, block, k)  # [..., N, blocks]
    return torch.cat([qw.codes(), zeros.repeat_interleave(block, -1)[..., k:]], -1)


def _tensor(name: str, array: np.ndarray, data_type: int) -> TensorProto:
    return helper.make_tensor(name, data_type, array.shape, np.ascontiguousarray(array).tobytes(), raw=True)


def _float_tensor(name: str, values: torch.Tensor, dtype: torch.dtype) -> TensorProto:
    """A float initializer in the activation dtype (bf16 via its raw bits: numpy has no bfloat16)."""
    t = values.to(dtype).contiguous()
    raw = t.view(torch.int16).numpy() if dtype == torch.bfloat16 else t.numpy()
    return _tensor(name, raw, ONNX_FLOAT[dtype])


def matmul_nbits(x: str, y: str, qw: QuantizedWeight, name: str, act_dtype: torch.dtype = torch.float32,
                 accuracy_level: int = 0) -> tuple[list[NodeProto], list[TensorProto]]:
    """One com.microsoft MatMulNBits node (ContribOperators.md): B = qweight viewed [N, k_blocks, blob], scales
    [N * k_blocks] in the activation dtype, zero points (only when asymmetric) packed like B, low nibble first,
    as [N * ceil(k_blocks * bits / 8)] (ONNX Runtime's default zero point 2^(bits-1) is our symmetric one).
    accuracy_level 0 keeps A unquantized: the parity gate's setting; 4 (A quantized to int8) is the fast CPU path."""
    n, k = _check(qw)
    block = matmul_nbits_block(qw)
    blocks = -(-k // block)  # the last one padded when block does not divide K
    codes = _blocked_codes(qw, block)  # [N, blocks * block]
    codes = (pack_int4(codes) if qw.bits == 4 else codes).numpy().reshape(n, blocks, block * qw.bits // 8)
    scales = _per_block(qw.scales, qw.group_size, qw.n_groups, block, k)  # [N, k_blocks]
    inits = [_tensor(f"{name}.B", codes, TensorProto.UINT8),
             _float_tensor(f"{name}.scales", scales.reshape(-1), act_dtype)]
    inputs = [x, inits[0].name, inits[1].name]
    if qw.zero_points is not None:
        zeros = _per_block(qw.zero_points, qw.group_size, qw.n_groups, block, k)  # [N, k_blocks]
        if qw.bits == 4:
            if blocks % 2:
                zeros = torch.cat([zeros, torch.zeros(n, 1, dtype=torch.uint8)], -1)  # each row padded to a byte
            zeros = zeros[:, 0::2] | (zeros[:, 1::2] << 4)
        inits.append(_tensor(f"{name}.zero_points", zeros.reshape(-1).numpy(), TensorProto.UINT8))
        inputs.append(inits[-1].name)
    node = helper.make_node("MatMulNBits", inputs, [y], name=name, domain="com.microsoft", K=k, N=n, bits=qw.bits,
                            block_size=block, accuracy_level=accuracy_level)
    return [node], inits


def dequantize_matmul(x: str, y: str, qw: QuantizedWeight, name: str, act_dtype: torch.dtype = torch.float32
                      ) -> tuple[list[NodeProto], list[TensorProto]]:
    """Standard ONNX (opset 21): W^T = DequantizeLinear(codes [K, N], scale [G, N], zero [G, N], axis=0,
    block_size=g), then MatMul(x, W^T): the Q/DQ weight-only pattern TensorRT fuses into its int4/int8 GEMMs.
    G = ceil(K/g): a partial last group is DequantizeLinear-21's own rule (scale's blocked dim ceil(K/g)).
    Symmetric weights store signed codes (INT4 / INT8, code - 2^(bits-1)) with no zero point; asymmetric ones
    unsigned codes (UINT4 / UINT8) with their zero points. INT4 / UINT4 pack two values a byte, low nibble first
    (onnx.proto), over the flattened [K, N] tensor."""
    n, k = _check(qw)
    codes = qw.codes().t().contiguous()  # [K, N] uint8 in 0..2^bits-1
    symmetric = qw.zero_points is None
    if symmetric:
        codes = (codes.to(torch.int16) - 2 ** (qw.bits - 1)).to(torch.int8)
    kinds = {(4, True): TensorProto.INT4, (4, False): TensorProto.UINT4,
             (8, True): TensorProto.INT8, (8, False): TensorProto.UINT8}
    data_type = kinds[(qw.bits, symmetric)]

    def packed(values: torch.Tensor) -> np.ndarray:
        flat = values.reshape(-1).view(torch.uint8) & 0xF
        if flat.numel() % 2:
            flat = torch.cat([flat, torch.zeros(1, dtype=torch.uint8)])
        return (flat[0::2] | (flat[1::2] << 4)).numpy()

    def init(suffix: str, values: torch.Tensor) -> TensorProto:
        if qw.bits == 4:
            return helper.make_tensor(f"{name}.{suffix}", data_type, list(values.shape), packed(values).tobytes(),
                                      raw=True)
        return _tensor(f"{name}.{suffix}", values.numpy(), data_type)

    inits = [init("weight_q", codes), _float_tensor(f"{name}.weight_scale", qw.scales.t().contiguous(), act_dtype)]
    dq_inputs = [inits[0].name, inits[1].name]
    if not symmetric:
        inits.append(init("weight_zero_point", qw.zero_points.t().contiguous()))
        dq_inputs.append(inits[-1].name)
    weight = f"{name}.weight_t"
    nodes = [helper.make_node("DequantizeLinear", dq_inputs, [weight], name=f"{name}.dequantize", axis=0,
                              block_size=qw.group_size),
             helper.make_node("MatMul", [x, weight], [y], name=f"{name}.matmul")]
    return nodes, inits


def _check_even(bits: int, *ks: int) -> None:
    """QMoE packs int4 codes two a byte along K with no padding: ONNX Runtime refuses an odd hidden or
    intermediate size ("hidden_size must be divisible by pack_size", moe_helper.h)."""
    odd = [k for k in ks if bits == 4 and k % 2]
    if odd:
        raise InputError(f"QMoE (--onnx-ops ort) packs int4 experts two codes a byte and ONNX Runtime refuses the odd "
                         f"in_features {odd[0]}; use --onnx-ops standard or --quant int8")


def _interleave_rows(t: torch.Tensor) -> torch.Tensor:
    """[E, 2I, …] rows gate 0..I-1 then up 0..I-1 -> g0 u0 g1 u1 … (ONNX Runtime's swiglu_fusion=1 layout)."""
    e, two_i = t.shape[:2]
    return t.reshape(e, 2, two_i // 2, *t.shape[2:]).transpose(1, 2).reshape(t.shape).contiguous()


def qmoe(x: str, router_logits: str, y: str, gate_up: QuantizedWeight, down: QuantizedWeight, top_k: int,
         norm_topk_prob: bool, name: str, act_dtype: torch.dtype = torch.float32
         ) -> tuple[list[NodeProto], list[TensorProto]]:
    """One com.microsoft QMoE node for Qwen3's experts: x [T, H], router_logits [T, E] (QMoE applies the softmax
    and top-k, renormalising when norm_topk_prob) -> y [T, H]. gate_up [E, 2I, H] and down [E, H, I] int4 / int8:
    one block_size for both (per-channel int8 omits it: column-wise scales); fc1 rows
    interleaved gate/up (swiglu_fusion=1, as CPU MoE requires: DESIGN §5), swiglu with alpha 1 and beta 0 =
    silu(g) * u. Zero points, when asymmetric, packed along K like the weights."""
    for what, qw in (("gate_up", gate_up), ("down", down)):
        if qw.mode not in ("int4", "int8") or len(qw.shape) != 3:
            raise InputError(f"QMoE: {what} must be stacked int4/int8 experts [E, N, K], got {qw.mode} "
                             f"{list(qw.shape)}")
    if gate_up.mode != down.mode:
        raise InputError(f"QMoE: gate_up is {gate_up.mode} but down is {down.mode}; one expert_weight_bits")
    # int8 per channel maps onto QMoE's column-wise scales; otherwise one block size for both weights
    # (qmoe_block), each group's scale / zero repeated over its blocks
    per_channel = gate_up.n_groups == 1 and down.n_groups == 1 and gate_up.bits == 8
    _check_even(gate_up.bits, gate_up.in_features, down.in_features)
    block = None if per_channel else qmoe_block([(qw.group_size, qw.in_features, qw.n_groups) for qw in (gate_up,
                                                                                                       down)])
    attrs = dict(k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=int(norm_topk_prob), expert_weight_bits=gate_up.bits, quant_type="int")
    if not per_channel:
        attrs["block_size"] = block
    inits: list[TensorProto] = []

    def add(suffix: str, qw: QuantizedWeight, interleave: bool) -> list[str]:
        def order(t: torch.Tensor) -> torch.Tensor:
            return _interleave_rows(t) if interleave else t.contiguous()

        def blocks(t: torch.Tensor) -> torch.Tensor:  # [E, N, groups] -> [E, N, ceil(K / block)]
            return t if per_channel else _per_block(t, qw.group_size, qw.n_groups, block, qw.in_features)

        scales = blocks(order(qw.scales))
        scales = scales[..., 0] if per_channel else scales  # [E, N] column-wise, else [E, N, ceil(K/block)]
        codes = qw.codes()  # [E, N, K]: QMoE takes the codes unpadded
        codes = pack_int4(codes) if qw.bits == 4 else codes
        inits.append(_tensor(f"{name}.{suffix}_weights", order(codes).numpy(), TensorProto.UINT8))
        inits.append(_float_tensor(f"{name}.{suffix}_scales", scales, act_dtype))
        names = [inits[-2].name, inits[-1].name]
        if qw.zero_points is None:
            return names + [""]
        zeros = blocks(order(qw.zero_points))
        if qw.bits == 4:
            if zeros.shape[-1] % 2:
                zeros = torch.cat([zeros, torch.zeros(*zeros.shape[:-1], 1, dtype=torch.uint8)], -1)
            zeros = zeros[..., 0::2] | (zeros[..., 1::2] << 4)
        zeros = zeros[..., 0] if per_channel else zeros
        inits.append(_tensor(f"{name}.{suffix}_zero_points", zeros.numpy(), TensorProto.UINT8))
        return names + [inits[-1].name]

    fc1_w, fc1_s, fc1_z = add("fc1", gate_up, True)
    fc2_w, fc2_s, fc2_z = add("fc2", down, False)
    inputs = [x, router_logits, fc1_w, fc1_s, "", fc2_w, fc2_s, "", "", "", "", fc1_z, fc2_z]
    while inputs[-1] == "":
        inputs.pop()
    node = helper.make_node("QMoE", inputs, [y], name=name, domain="com.microsoft", **attrs)
    return [node], inits


# ====================================================================== translations of the quantized ops
# onnxscript translations of qwen3export::wq_linear / wq_moe / fp8_linear for torch.onnx.export's
# custom_translation_table, merged with backends/onnx_ops.py custom_translation_table(flavour). They read the
# module's buffers as stored (graphs/quantized.py: qweight uint8 [..., N, G*g*bits/8], whole groups, scales in the
# model dtype [..., N, G], zero points uint8 or absent; G = ceil(K/g), K the input's last dim, static in the
# export) and reach each node's layout with plain ONNX ops on those
# initializers (valid as they stand: ONNX Runtime folds them when a session loads); `bake_quantized_weights`
# then stores the folded layouts as initializers, as INT4 where the standard flavour asks for it.

def _repeat_last(t, times: int, rank: int):
    """[..., G] -> [..., G * times], each value repeated `times` times (a group's scale over its blocks)."""
    if times == 1:
        return t
    return op21.Reshape(op21.Expand(op21.Unsqueeze(t, int64s(-1)), int64s(times)), int64s(*[0] * (rank - 1), -1))


def _pack_nibbles(t, rank: int, b: int):
    """uint8 [..., B] values 0..15 -> [..., ceil(B/2)], even index in the low nibble (MatMulNBits / QMoE zero
    points); an odd B is padded with a zero nibble per row. B is given: computed values carry no shape."""
    if b % 2:
        pad = [0] * (2 * rank)
        pad[2 * rank - 1] = 1
        t = op21.Pad(t, int64s(*pad))
        b += 1
    even = op21.Slice(t, int64s(0), int64s(b), int64s(-1), int64s(2))
    odd = op21.Slice(t, int64s(1), int64s(b), int64s(-1), int64s(2))
    return op21.BitwiseOr(even, op21.BitShift(odd, op21.Constant(value=ir.tensor(np.uint8(4))), direction="LEFT"))


def _unpack_nibbles(q, rank: int):
    """uint8 [..., K/2] -> codes uint8 [..., K] (quant.QuantizedWeight.codes: low nibble = even k)."""
    low = op21.BitwiseAnd(q, op21.Constant(value=ir.tensor(np.uint8(15))))
    high = op21.BitShift(q, op21.Constant(value=ir.tensor(np.uint8(4))), direction="RIGHT")
    both = op21.Concat(op21.Unsqueeze(low, int64s(-1)), op21.Unsqueeze(high, int64s(-1)), axis=-1)
    return op21.Reshape(both, int64s(*[0] * (rank - 1), -1))


def _codes(qweight, bits: int, rank: int):
    return _unpack_nibbles(qweight, rank) if bits == 4 else qweight


def _last(t, n: int, width: int):
    """[..., width] -> [..., n]: the first n along the last axis (no node when n == width)."""
    return t if n == width else op21.Slice(t, int64s(0), int64s(n), int64s(-1))


def _blocks(t, group: int, n_groups: int, block: int, k: int, rank: int):
    """Per-group [..., G] -> per-block [..., ceil(K/block)] (as `_per_block`): each group repeated over its
    blocks, a partial last group's blocks past K dropped."""
    n_blocks = -(-k // block)
    if n_groups == 1:
        return _repeat_last(t, n_blocks, rank)
    return _last(_repeat_last(t, group // block, rank), n_blocks, n_groups * group // block)


def _weight_dims(qweight, scales, bits: int) -> tuple[int, int, int]:
    """(stored width in codes, groups, group size) of a stored quantized weight (whole groups)."""
    rank = len(qweight.shape)
    width, n_groups = static_dim(qweight, rank - 1) * 8 // bits, static_dim(scales, rank - 1)
    return width, n_groups, width // n_groups


# ---------------------------------------------------------------------- "ort": MatMulNBits, QMoE
def ort_wq_linear(x, qweight, scales, zero_points=None, bits: int = 4, group_size: int = 128):
    """com.microsoft MatMulNBits (as `matmul_nbits`): B [N, ceil(K/block), blob], 1-D scales in x's dtype, packed
    zero points only when asymmetric; accuracy_level 0 here, set after export (set_accuracy_level). The stored
    rows cover whole groups; B takes the blocks that reach into K, the last one padded. Only a single group
    with no power-of-two block in it (int8 per channel, K = 72) needs B wider than stored: padded with the
    symmetric zero point, which MatMulNBits never reads against A (columns past K)."""
    n, k = static_dim(qweight, 0), static_dim(x, len(x.shape) - 1)
    width, n_groups, group = _weight_dims(qweight, scales, bits)
    block = nbits_block(group, k, n_groups)
    n_blocks = -(-k // block)
    row = n_blocks * block * bits // 8
    stored = width * bits // 8
    if row <= stored:
        b = _last(qweight, row, stored)
    else:
        pad_byte = 0x88 if bits == 4 else 0x80
        b = op21.Pad(qweight, int64s(0, 0, 0, row - stored), op21.Constant(value=ir.tensor(np.uint8(pad_byte))))
    inputs = [x, op21.Reshape(b, int64s(n, n_blocks, block * bits // 8)),
              op21.Reshape(_blocks(op21.CastLike(scales, x), group, n_groups, block, k, 2), int64s(-1))]
    if zero_points is not None:
        zeros = _blocks(zero_points, group, n_groups, block, k, 2)
        inputs.append(op21.Reshape(_pack_nibbles(zeros, 2, n_blocks) if bits == 4 else zeros, int64s(-1)))
    return ort_op("MatMulNBits")(*inputs, K=k, N=n, bits=bits, block_size=block, accuracy_level=0)


def _interleave(t, e: int, two_i: int):
    """[E, 2I, …] gate rows then up rows -> g0 u0 g1 u1 … (as `_interleave_rows`)."""
    halves = op21.Reshape(t, int64s(e, 2, two_i // 2, -1))
    return op21.Reshape(op21.Transpose(halves, perm=[0, 2, 1, 3]), int64s(e, two_i, -1))


def ort_wq_moe(x, router_weight, gate_up_qweight, gate_up_scales, gate_up_zero_points, down_qweight, down_scales,
               down_zero_points, bits: int, top_k: int, norm_topk_prob: bool):
    """com.microsoft QMoE (as `qmoe`): router logits from an fp Gemm (QMoE applies softmax + top-k), fc1 rows
    interleaved for swiglu_fusion=1, int8 per channel as column-wise scales, else one block size for both; the
    codes cut to K (QMoE takes them unpadded), H from x, I from gate_up's rows."""
    e, two_i = static_dim(gate_up_qweight, 0), static_dim(gate_up_qweight, 1)
    h, inter = static_dim(x, len(x.shape) - 1), two_i // 2
    w1, n1, g1 = _weight_dims(gate_up_qweight, gate_up_scales, bits)
    w2, n2, g2 = _weight_dims(down_qweight, down_scales, bits)
    per_channel = bits == 8 and n1 == 1 and n2 == 1
    _check_even(bits, h, inter)
    block = None if per_channel else qmoe_block([(g1, h, n1), (g2, inter, n2)])

    def weights(qweight, scales, zeros, width, n_groups, group, k, interleave):
        order = (lambda t: _interleave(t, e, two_i)) if interleave else (lambda t: t)
        scales = order(op21.CastLike(scales, x))
        scales = (op21.Squeeze(scales, int64s(-1)) if per_channel
                  else _blocks(scales, group, n_groups, block, k, 3))
        if zeros is not None:
            zeros = order(zeros)
            if per_channel:
                zeros = op21.Squeeze(zeros, int64s(-1))
            else:
                zeros = _blocks(zeros, group, n_groups, block, k, 3)
                zeros = _pack_nibbles(zeros, 3, -(-k // block)) if bits == 4 else zeros
        return order(_last(qweight, k * bits // 8, width * bits // 8)), scales, zeros

    fc1_w, fc1_s, fc1_z = weights(gate_up_qweight, gate_up_scales, gate_up_zero_points, w1, n1, g1, h, True)
    fc2_w, fc2_s, fc2_z = weights(down_qweight, down_scales, down_zero_points, w2, n2, g2, inter, False)
    t = op21.Reshape(x, int64s(-1, h))  # [T, H]
    logits = op21.Gemm(t, router_weight, transB=1)  # [T, E]
    attrs = dict(k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=int(norm_topk_prob), expert_weight_bits=bits, quant_type="int")
    if block is not None:
        attrs["block_size"] = block
    inputs = [t, logits, fc1_w, fc1_s, None, fc2_w, fc2_s, None, None, None, None, fc1_z, fc2_z]
    while inputs[-1] is None:
        inputs.pop()
    return op21.Reshape(ort_op("QMoE")(*inputs, **attrs), op21.Shape(x))


# ---------------------------------------------------------------------- "standard": DequantizeLinear (opset 21)
def _dequantize(qweight, scales, zero_points, bits: int, like, transpose: bool, k: int):
    """W = DequantizeLinear(codes, scales, zero points) in `like`'s dtype, as `dequantize_matmul` stores it:
    symmetric weights as signed INT4 / INT8 codes without a zero point, asymmetric ones as UINT4 / UINT8 with
    theirs; blocked along K (block_size = group size), a 2-D int8 per-channel weight per-axis. transpose: a 2-D [N, K]
    weight as W^T [K, N] (the MatMul's B: the layout TensorRT's weight-only Q/DQ fusion reads), else [..., N, K].
    The codes are cut to K; a partial last group keeps its scale (DequantizeLinear's ceil(K / block_size))."""
    rank = len(qweight.shape)
    n = static_dim(qweight, rank - 2)
    width, groups, group = _weight_dims(qweight, scales, bits)
    perm = [1, 0] if transpose else None
    t = (lambda v: op21.Transpose(v, perm=perm)) if transpose else (lambda v: v)
    codes = t(_last(_codes(qweight, bits, rank), k, width))
    narrow = {4: (ir.DataType.INT4, ir.DataType.UINT4), 8: (ir.DataType.INT8, ir.DataType.UINT8)}[bits]
    scales = op21.CastLike(scales, like)
    axis = 0 if transpose else rank - 1
    if zero_points is None:
        offset = op21.Constant(value=ir.tensor(np.int16(2 ** (bits - 1))))
        dq_inputs = [op21.Cast(op21.Sub(op21.Cast(codes, to=ir.DataType.INT16), offset), to=narrow[0])]
    else:
        dq_inputs = [op21.Cast(codes, to=narrow[1]) if bits == 4 else codes]
    if groups == 1 and bits == 8 and transpose:  # per output channel: per-axis scales [N] (stacked experts: blocked)
        dq_inputs.append(op21.Reshape(scales, int64s(-1)))
        if zero_points is not None:
            dq_inputs.append(op21.Reshape(zero_points, int64s(-1)))
        attrs = {"axis": 1}
    else:
        dq_inputs.append(t(scales))
        if zero_points is not None:
            zeros = t(zero_points)
            dq_inputs.append(op21.Cast(zeros, to=narrow[1]) if bits == 4 else zeros)
        attrs = {"axis": axis, "block_size": group}
    w = op21.DequantizeLinear(*dq_inputs, **attrs)
    lead = [static_dim(qweight, i) for i in range(rank - 2)]
    w.shape = ir.Shape([k, n] if transpose else [*lead, n, k])
    return w


def wq_linear(x, qweight, scales, zero_points=None, bits: int = 4, group_size: int = 128):
    """DequantizeLinear + MatMul (as `dequantize_matmul`): y = x @ W^T."""
    k = static_dim(x, len(x.shape) - 1)
    return op21.MatMul(x, _dequantize(qweight, scales, zero_points, bits, x, transpose=True, k=k))


def wq_moe(x, router_weight, gate_up_qweight, gate_up_scales, gate_up_zero_points, down_qweight, down_scales,
           down_zero_points, bits: int, top_k: int, norm_topk_prob: bool):
    """The experts dequantized ([E, 2I, H], [E, H, I], blocked along K) into backends/onnx_ops.py `moe`, the
    standard translation of the unquantized block (every expert on every token, dense top-k combination)."""
    h, inter = static_dim(x, len(x.shape) - 1), static_dim(gate_up_qweight, 1) // 2
    gate_up = _dequantize(gate_up_qweight, gate_up_scales, gate_up_zero_points, bits, x, transpose=False, k=h)
    down = _dequantize(down_qweight, down_scales, down_zero_points, bits, x, transpose=False, k=inter)
    return moe(x, router_weight, gate_up, down, top_k, norm_topk_prob)


def fp8_linear(x, weight, weight_scales):
    """kernels/fp8_matmul.py fp8_matmul_reference: x quantized per token (scale = absmax / 448, 1 for a zero row,
    Cast to FLOAT8E4M3FN rounds to nearest even as torch does), W^T = DequantizeLinear(FLOAT8E4M3FN [K, N],
    per-channel scales [N], axis 1), fp32 MatMul, times the token scales. ONNX Runtime's CPU provider runs it
    (DequantizeLinear and Cast for float8, 1.31); there is no CPU contrib op for fp8 GEMMs (GemmFloat8 is
    CUDA-only), so both flavours use this."""
    xf = op21.Cast(x, to=FLOAT)
    scale = op21.Div(op21.ReduceMax(op21.Abs(xf), int64s(-1), keepdims=1), float_const(FP8_MAX))  # [..., 1]
    scale = op21.Where(op21.Greater(scale, float_const(0.0)), scale, float_const(1.0))
    codes = op21.Cast(op21.Clip(op21.Div(xf, scale), float_const(-FP8_MAX), float_const(FP8_MAX)),
                      to=ir.DataType.FLOAT8E4M3FN)
    w_t = op21.DequantizeLinear(op21.Transpose(weight, perm=[1, 0]), op21.Reshape(weight_scales, int64s(-1)), axis=1)
    y = op21.Mul(op21.MatMul(op21.Cast(codes, to=FLOAT), w_t), scale)
    return op21.CastLike(y, x)


def quant_translation_table(flavour: str) -> dict[Any, Callable]:
    """{torch.ops.qwen3export.<quantized op>.default: translation} for `flavour` ("ort" | "standard"), to merge
    with backends/onnx_ops.py custom_translation_table(flavour). Both need `OPSET` 21 (DequantizeLinear's
    block_size, INT4 / UINT4; ops of opset 21 in an opset-18 export make an invalid model); "ort" emits
    DequantizeLinear only for fp8."""
    # lazy: registering the qwen3export:: ops imports the Triton kernels; only an export needs them
    import qwen3export.kernels.ops  # noqa: F401  (registers the ops named below)

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown ONNX op flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    ops = torch.ops.qwen3export
    linear, experts = {"ort": (ort_wq_linear, ort_wq_moe), "standard": (wq_linear, wq_moe)}[flavour]
    return {ops.wq_linear.default: linear, ops.wq_moe.default: experts, ops.fp8_linear.default: fp8_linear}


# ---------------------------------------------------------------------- after export: the accuracy level
def set_accuracy_level(model: ir.Model, level: int) -> int:
    """Set every MatMulNBits and QMoE node's accuracy_level to `level` (quant_format.ACCURACY_LEVELS; the build's
    QuantConfig.accuracy_level, recorded in the manifest's quantization section). Returns how many nodes.

    QMoE (ONNX Runtime 1.31 CPU, its schema: "Minimum accuracy level of the expert GEMMs on CPU, with the
    MatMulNBits meaning") runs block-wise int4 experts through the MatMulNBits kernels when K is a multiple of
    block_size, else it dequantizes and runs SGEMM on fp32 activations whatever the level
    (moe_quantization_cpu.cc PrePackQNBitExperts warns so); quant_parity's reference follows the same rule.
    Measured here (2 cores, AVX-512 VNNI; one QMoE layer of Qwen3-30B-A3B's shape, 128 experts, top-8, block
    128; a one-node session, random codes, 2026-11-30): decode T=1 10.4 ms at level 0 -> 2.0 ms at level 4,
    prefill T=128 385 -> 126 ms. A decode-path gather of the routed experts' int4 codes into MatMulNBits is no alternative: a
    MatMulNBits whose B is not an initializer is not prepacked, 40 ms for one [1536 x 2048] GEMV.

    4 on CPU: MLAS quantizes A to int8 per block of block_size (quant_format.quantize_activation_int8_blocks) and
    runs integer dot products (AVX-512 VNNI / AVX2 here), the path ONNX Runtime GenAI's CPU int4 models take.
    ORT falls back to a more accurate level when a CPU lacks the kernel (matmul_nbits.cc GetAccuracyLevel),
    which the parity gate would then catch as a mismatch against the emulated reference. ORT's CUDA
    MatMulNBits reads only K, N, bits and block_size (contrib_ops/cuda/quantization/matmul_nbits.h): the
    attribute means nothing there, so GPU targets build with 0 (options.plan_build)."""
    if level not in ACCURACY_LEVELS:
        raise InputError(f"MatMulNBits accuracy level {level!r}; choose one of {', '.join(map(str, ACCURACY_LEVELS))}")
    nodes = [n for n in model.graph.all_nodes() if n.domain == "com.microsoft" and n.op_type in ("MatMulNBits", "QMoE")]
    for node in nodes:
        node.attributes["accuracy_level"] = ir.AttrInt64("accuracy_level", level)
    return len(nodes)


# ---------------------------------------------------------------------- after export: bake the weight layouts
def _attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    return default if a is None else a.value


def _reshape(x: np.ndarray, shape: np.ndarray) -> np.ndarray:
    dims = [x.shape[i] if d == 0 else int(d) for i, d in enumerate(shape.tolist())]  # allowzero=0: 0 copies
    return x.reshape(dims)


def _unsqueeze(x: np.ndarray, axes: np.ndarray) -> np.ndarray:
    rank = x.ndim + len(axes)
    for a in sorted(int(a) % rank for a in axes.tolist()):
        x = np.expand_dims(x, a)
    return x


def _slice(x: np.ndarray, starts, ends, axes=None, steps=None) -> np.ndarray:
    index = [slice(None)] * x.ndim
    axes = range(len(starts)) if axes is None else axes.tolist()
    steps = [1] * len(starts) if steps is None else steps.tolist()
    for a, s, e, st in zip(axes, starts.tolist(), ends.tolist(), steps):
        index[int(a)] = slice(int(s), int(e), int(st))
    return x[tuple(index)]


def _pad(x: np.ndarray, pads: np.ndarray, value=None, axes=None) -> np.ndarray:
    begin, end = pads[:x.ndim].tolist(), pads[x.ndim:].tolist()
    return np.pad(x, list(zip(begin, end)), constant_values=0 if value is None else value.item())


# the ops the translations above put between a stored buffer and its quantized consumer, in numpy
_NUMPY: dict[str, Callable[..., np.ndarray]] = {
    "Identity": lambda n, x: x,
    "Reshape": lambda n, x, shape: _reshape(x, shape),
    "Transpose": lambda n, x: np.transpose(x, _attr(n, "perm")),
    "Cast": lambda n, x: x.astype(ir.DataType(_attr(n, "to")).numpy()),
    "CastLike": lambda n, x, like: x.astype(like.dtype),
    "BitwiseAnd": lambda n, a, b: np.bitwise_and(a, b),
    "BitwiseOr": lambda n, a, b: np.bitwise_or(a, b),
    "BitShift": lambda n, a, b: (np.left_shift if _attr(n, "direction") == "LEFT" else np.right_shift)(a, b),
    "Sub": lambda n, a, b: np.subtract(a, b),
    "Concat": lambda n, *xs: np.concatenate(xs, axis=_attr(n, "axis")),
    "Unsqueeze": lambda n, x, axes: _unsqueeze(x, axes),
    "Squeeze": lambda n, x, axes: np.squeeze(x, axis=tuple(int(a) for a in axes.tolist())),
    "Expand": lambda n, x, shape: np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(shape.tolist()))),
    "Slice": lambda n, *xs: _slice(*xs),
    "Pad": lambda n, *xs: _pad(*xs),
}
_CONSUMERS = {("com.microsoft", "MatMulNBits"): ("A", "B", "scales", "zero_points"),
              ("com.microsoft", "QMoE"): ("input", "router_probs", "fc1_weights", "fc1_scales", "fc1_bias",
                                          "fc2_weights", "fc2_scales", "fc2_bias", "fc3_weights", "fc3_scales",
                                          "fc3_bias", "fc1_zero_points", "fc2_zero_points"),
              ("", "DequantizeLinear"): ("x", "x_scale", "x_zero_point")}


def _constant(value: ir.Value, chain: list[ir.Node]) -> Callable[[], np.ndarray] | None:
    """A function computing `value` from initializers and Constant nodes only, or None when it reads anything
    else (a graph input, an op not in _NUMPY). The nodes it passes through are appended to `chain`."""
    if value.const_value is not None:
        return lambda: np.asarray(value.const_value.numpy())
    node = value.producer()
    if node is None or value.is_graph_input() or node.domain not in ("", "ai.onnx"):
        return None
    if node.op_type == "Constant":
        chain.append(node)
        return lambda: np.asarray(_attr(node, "value").numpy())
    fn = _NUMPY.get(node.op_type)
    if fn is None:
        return None
    args = [None if v is None else _constant(v, chain) for v in node.inputs]
    if any(a is None for v, a in zip(node.inputs, args) if v is not None):
        return None
    chain.append(node)
    return lambda: fn(node, *[None if a is None else a() for a in args])


def _root(value: ir.Value) -> ir.Value:
    """The stored tensor a layout chain starts from (each op's first input, back to an initializer)."""
    while value.const_value is None and value.producer() is not None and value.producer().inputs:
        value = value.producer().inputs[0]
    return value


def bake_quantized_weights(model: ir.Model) -> int:
    """Store every input of a MatMulNBits, QMoE or DequantizeLinear node that the translations compute from
    initializers (nibble unpacking, interleaving, repeated scales, casts to INT4 / UINT4 …) as an initializer
    holding the result, computed lazily when the model is saved, one tensor at a time; the chains and the
    stored tensors nothing else reads are removed. What the exporter's optimizer already folded (small
    tensors) is left as it is. Returns how many initializers were baked. Run it after weights are bound
    (streaming.bind_lazy_initializers), as bake_weight_layouts."""
    graph, baked, chains = model.graph, 0, []
    for node in list(graph):
        names = _CONSUMERS.get((node.domain, node.op_type))
        if names is None:
            continue
        for i, value in enumerate(node.inputs):
            if value is None or value.const_value is not None or value.producer() is None:
                continue
            chain: list[ir.Node] = []
            produce = _constant(value, chain)
            if produce is None or value.dtype is None or value.shape is None or not value.shape.is_static():
                continue
            shape, dtype = tuple(value.shape.numpy()), value.dtype
            name = f"{_root(value).name}.{node.op_type}.{names[i] if i < len(names) else i}"
            while name in graph.initializers:
                name += "_"

            def tensor(produce=produce, shape=shape, dtype=dtype, name=name):
                array = np.ascontiguousarray(produce())
                if array.shape != shape:
                    raise ValueError(f"baked {name}: computed {array.shape}, the graph says {shape}")
                return ir.tensor(array.astype(dtype.numpy(), copy=False), dtype=dtype, name=name)

            baked_value = ir.Value(name=name, shape=ir.Shape(shape), type=ir.TensorType(dtype),
                                   const_value=ir.LazyTensor(tensor, dtype=dtype, shape=ir.Shape(shape), name=name))
            graph.register_initializer(baked_value)
            node.replace_input_with(i, baked_value)
            chains.append(chain)
            baked += 1
    for chain in chains:  # consumers first: a node goes once nothing reads its outputs
        for n in reversed(chain):
            if n.graph is graph and not any(out.uses() or out.is_graph_output() for out in n.outputs):
                sources = [v for v in n.inputs if v is not None]
                graph.remove(n, safe=True)
                for v in sources:
                    if v.name in graph.initializers and not v.uses() and not v.is_graph_output():
                        del graph.initializers[v.name]
    return baked
