"""ONNX translations of a weight-only quantized linear (qwen3export/quant.py QuantizedWeight, int4 / int8), for the
emit stage: ONNX Runtime's com.microsoft MatMulNBits (the `ort` flavour) and standard DequantizeLinear (opset 21,
blocked) + MatMul (the TensorRT flavour). Each returns (nodes, initializers) for y = x @ W^T, x [..., K] -> [..., N].
"""

from __future__ import annotations

import numpy as np
import torch
from onnx import NodeProto, TensorProto, helper

from qwen3export.errors import InputError
from qwen3export.quant import QuantizedWeight

MATMUL_NBITS_MAX_BLOCK = 256  # blocks above this gain nothing; MLAS's CPU kernels take 16..256 (2^k)
ONNX_FLOAT = {torch.float32: TensorProto.FLOAT, torch.float16: TensorProto.FLOAT16,
              torch.bfloat16: TensorProto.BFLOAT16}


def _check(qw: QuantizedWeight) -> tuple[int, int]:
    if qw.mode not in ("int4", "int8") or len(qw.shape) != 2:
        raise InputError(f"ONNX quantized linear: a 2-D int4/int8 weight is needed, got {qw.mode} {list(qw.shape)} "
                         "(fp8 and stacked experts take other translations)")
    return qw.shape


def matmul_nbits_block(qw: QuantizedWeight) -> int:
    """MatMulNBits' block_size for a weight: its group size when that is a power of two in 16..256, else the
    largest power of two <= 256 dividing it (an int8 per-channel weight with K = 3072 -> 256), the group's
    scale (and zero point) repeated over its blocks, which dequantizes to the same values."""
    block = min(qw.group_size & -qw.group_size, MATMUL_NBITS_MAX_BLOCK)
    if block < 16:
        raise InputError(f"MatMulNBits needs blocks of >= 16 (a power of two); group size {qw.group_size} has none")
    return block


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
    repeat = qw.group_size // block
    blocks = k // block
    codes = qw.qweight.numpy().reshape(n, blocks, block * qw.bits // 8)
    inits = [_tensor(f"{name}.B", codes, TensorProto.UINT8),
             _float_tensor(f"{name}.scales", qw.scales.repeat_interleave(repeat, -1).reshape(-1), act_dtype)]
    inputs = [x, inits[0].name, inits[1].name]
    if qw.zero_points is not None:
        zeros = qw.zero_points.repeat_interleave(repeat, -1)  # [N, k_blocks]
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
    """Standard ONNX (opset 21): W^T = DequantizeLinear(codes [K, N], scale [K/g, N], zero [K/g, N], axis=0,
    block_size=g), then MatMul(x, W^T): the Q/DQ weight-only pattern TensorRT fuses into its int4/int8 GEMMs.
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
    # int8 per channel maps onto QMoE's column-wise scales; otherwise one block size for both weights: the
    # largest power of two <= 256 dividing both group sizes, each group's scale / zero repeated over its blocks
    per_channel = gate_up.n_groups == 1 and down.n_groups == 1 and gate_up.bits == 8
    block = min(gate_up.group_size & -gate_up.group_size, down.group_size & -down.group_size, MATMUL_NBITS_MAX_BLOCK)
    if not per_channel and block < 16:
        raise InputError(f"QMoE needs blocks of >= 16 (a power of two); group sizes {gate_up.group_size} and "
                         f"{down.group_size} have no common one")
    attrs = dict(k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0, activation_beta=0.0,
                 normalize_routing_weights=int(norm_topk_prob), expert_weight_bits=gate_up.bits, quant_type="int")
    if not per_channel:
        attrs["block_size"] = block
    inits: list[TensorProto] = []

    def add(suffix: str, qw: QuantizedWeight, interleave: bool) -> list[str]:
        def order(t: torch.Tensor) -> torch.Tensor:
            return _interleave_rows(t) if interleave else t.contiguous()

        def blocks(t: torch.Tensor) -> torch.Tensor:  # [E, N, groups] -> [E, N, K / block]
            return t if per_channel else t.repeat_interleave(qw.group_size // block, -1)

        scales = blocks(order(qw.scales))
        scales = scales[..., 0] if per_channel else scales  # [E, N] column-wise, else [E, N, K/block]
        inits.append(_tensor(f"{name}.{suffix}_weights", order(qw.qweight).numpy(), TensorProto.UINT8))
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
