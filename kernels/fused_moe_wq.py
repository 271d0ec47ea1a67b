"""Fused MoE with int8 / int4 weight-only experts: kernels/fused_moe.py's grouped gate/up (SiLU·mul) and down
GEMMs over the moe_align-sorted (token, expert) pairs, each expert's weight tile dequantized in registers
(kernels/wq_matmul.py `dequantize_tile`), fp32 accumulation. The planned `qwen3export::wq_moe` op runs it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, aligned_args
from qwen3export.kernels.fused_moe import fused_moe_reference
from qwen3export.kernels.launch import launch
from qwen3export.kernels.tiles import grouped_tile
from qwen3export.kernels.moe_align import moe_align
from qwen3export.kernels.wq_matmul import dequantize_tile, block_k_for
from qwen3export.quant_format import QuantizedWeight, dequantize

# the @triton.jit helper these kernels call lives in wq_matmul.py: its source is part of this kernel's
# compile-cache key (kernels/compile.py)
JIT_DEPENDS = ("qwen3export.kernels.wq_matmul",)


@triton.jit
def _fused_moe_wq_gate_up_kernel(
    # pointers
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, n_padded_ptr,
    # dimensions
    n_pairs, top_k, hidden, inter, n_tiles_m, group_size,
    # strides (elements; the hidden axis of x, qweight, scales and zeros is contiguous)
    stride_xt, stride_qe, stride_qn, stride_se, stride_sn, stride_ap,
    # meta
    BITS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """act[p, n] = silu(x[t] . Wg[e, n]) * (x[t] . Wu[e, n]) for pair p = t * k + slot of expert e, W dequantized.

    x [T, H]; gate_up quantized [E, 2I, H] (qweight uint8 [E, 2I, G*g * BITS / 8], G = ceil(H/g) groups stored
    whole, scales / zeros [E, 2I, G]; rows [0, I) gate, [I, 2I) up); act [T * k, I]. Tiling, grouping and
    rounding as kernels/fused_moe.py's gate/up kernel; each K tile lies in one quantization group
    (wq_matmul.block_k_for); k >= H is masked, so a partial last group's padding is never read.
    """
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(inter, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_SIZE_M)
    if pid_m * BLOCK_M >= tl.load(n_padded_ptr):
        return
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + slots).to(tl.int64)  # [BLOCK_M], padding holds n_pairs
    pair_ok = pairs < n_pairs
    tokens = pairs // top_k
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    gate_q = qweight_ptr + expert * stride_qe + offs_n[None, :] * stride_qn + offs_k[:, None] // (8 // BITS)
    up_q = gate_q + inter * stride_qn
    gate_s = scales_ptr + expert * stride_se + offs_n * stride_sn  # [BLOCK_N], group 0
    up_s = gate_s + inter * stride_sn
    gate_z = zeros_ptr + expert * stride_se + offs_n * stride_sn
    up_z = gate_z + inter * stride_sn
    shift = (offs_k[:, None] % 2) * 4
    dtype = act_ptr.dtype.element_ty
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        a = tl.load(x_ptrs, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        g = k0 // group_size
        acc_gate = tl.dot(a, dequantize_tile(gate_q, gate_s + g, gate_z + g, shift, w_mask, n_ok, dtype, BITS,
                                              HAS_ZP), acc_gate)
        acc_up = tl.dot(a, dequantize_tile(up_q, up_s + g, up_z + g, shift, w_mask, n_ok, dtype, BITS, HAS_ZP),
                        acc_up)
        x_ptrs += BLOCK_K
        gate_q += BLOCK_K // (8 // BITS)
        up_q += BLOCK_K // (8 // BITS)
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up
    tl.store(act_ptr + pairs[:, None] * stride_ap + offs_n[None, :], act.to(dtype),
             mask=pair_ok[:, None] & n_ok[None, :])


@triton.jit
def _fused_moe_wq_down_kernel(
    # pointers
    act_ptr, qweight_ptr, scales_ptr, zeros_ptr, topk_weights_ptr, partial_ptr, sorted_ids_ptr, expert_ids_ptr,
    n_padded_ptr,
    # dimensions
    n_pairs, hidden, inter, n_tiles_m, group_size,
    # strides (elements; the inter axis of act, qweight, scales and zeros is contiguous)
    stride_ap, stride_qe, stride_qn, stride_se, stride_sn, stride_pp,
    # meta
    BITS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """partial[p, n] = w[p] * (act[p] . Wd[e, n]) for pair p of expert e, n in [0, H), Wd dequantized.

    act [T * k, I]; down quantized [E, H, I] (qweight uint8 [E, H, G*g * BITS / 8], scales / zeros [E, H, G],
    G = ceil(I/g), the last group padded as in the gate/up kernel);
    topk_weights [T * k]; partial [T * k, H], summed over each token's k slots by the launcher.
    """
    pid = tl.program_id(0)
    n_tiles_n = tl.cdiv(hidden, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_SIZE_M)
    if pid_m * BLOCK_M >= tl.load(n_padded_ptr):
        return
    slots = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    pairs = tl.load(sorted_ids_ptr + slots).to(tl.int64)
    pair_ok = pairs < n_pairs
    expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    a_ptrs = act_ptr + pairs[:, None] * stride_ap + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    q_ptrs = qweight_ptr + expert * stride_qe + offs_n[None, :] * stride_qn + offs_k[:, None] // (8 // BITS)
    s_ptrs = scales_ptr + expert * stride_se + offs_n * stride_sn
    z_ptrs = zeros_ptr + expert * stride_se + offs_n * stride_sn
    shift = (offs_k[:, None] % 2) * 4
    dtype = partial_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = offs_k < inter - k0
        a = tl.load(a_ptrs, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        g = k0 // group_size
        acc = tl.dot(a, dequantize_tile(q_ptrs, s_ptrs + g, z_ptrs + g, shift, k_ok[:, None] & n_ok[None, :], n_ok,
                                         dtype, BITS, HAS_ZP), acc)
        a_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // (8 // BITS)
    weight = tl.load(topk_weights_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)  # [BLOCK_M]
    acc = acc.to(dtype).to(tl.float32) * weight[:, None]
    tl.store(partial_ptr + pairs[:, None] * stride_pp + offs_n[None, :], acc.to(dtype),
             mask=pair_ok[:, None] & n_ok[None, :])


def _experts(qweight, scales, zero_points, bits, what, in_features: int) -> QuantizedWeight:
    """(qweight, scales, zero_points) of stacked experts -> QuantizedWeight over K = in_features (H for gate_up,
    I for down). The codes hold whole groups (quant.QuantizedWeight), so the group size is their width over
    scales' last dim, G = ceil(K / g): int8 per channel means H for gate_up and I for down."""
    if bits not in (4, 8):
        raise InputError(f"fused_moe_wq: bits={bits} must be 4 or 8")
    width = qweight.shape[-1] * (8 // bits)
    if scales.dim() != 3 or width % scales.shape[-1]:
        raise InputError(f"fused_moe_wq: {what} scales {tuple(scales.shape)} must be [E, N, G] with G dividing "
                         f"the {width} stored columns")
    group = width // scales.shape[-1]
    if not width - group < in_features <= width:
        raise InputError(f"fused_moe_wq: x, gate_up and down must be [T, H], [E, 2I, H] and [E, H, I]; {what} "
                         f"stores {scales.shape[-1]} group(s) of {group}, which do not cover K={in_features} with "
                         "at most the last one partial")
    qw = QuantizedWeight("int4" if bits == 4 else "int8", qweight, scales, zero_points, group, in_features)
    if len(qw.shape) != 3:
        raise InputError(f"fused_moe_wq: {what} must be stacked experts [E, N, K], got {list(qw.shape)}")
    return qw


def _expert_pair(x: torch.Tensor, gate_up: tuple, down: tuple, bits: int) -> tuple[QuantizedWeight, QuantizedWeight]:
    """gate_up over K = H (x's last dim), down over K = I (half gate_up's rows)."""
    if x.dim() != 2:
        raise InputError(f"fused_moe_wq: x {tuple(x.shape)} must be [T, H]")
    gu = _experts(*gate_up, bits, "gate_up", x.shape[1])
    return gu, _experts(*down, bits, "down", gu.shape[1] // 2)


def fused_moe_wq(x: torch.Tensor, gate_up: tuple, down: tuple, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                 bits: int, config: KernelConfig | None = None) -> torch.Tensor:
    """fused_moe with quantized experts: x [T, H]; gate_up = (qweight, scales, zero_points | None) of the
    stacked [E, 2I, H] weight, down = the same for [E, H, I] (quant.QuantizedWeight layout, `bits` 4 or 8;
    group sizes follow from the stored widths and the scales' shapes, H from x, I from gate_up's rows);
    topk_weights / topk_ids [T, k] -> out [T, H] in x's dtype."""
    gu, dn = _expert_pair(x, gate_up, down, bits)
    n_experts, two_i, hidden = gu.shape
    inter = two_i // 2
    if two_i % 2 or dn.shape != (n_experts, hidden, inter):
        raise InputError(f"fused_moe_wq: x {tuple(x.shape)}, gate_up {list(gu.shape)} and down {list(dn.shape)} "
                         "must be [T, H], [E, 2I, H] and [E, H, I]")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise InputError(f"fused_moe_wq: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{x.shape[0]}, k]")
    config = config or DEFAULT_CONFIG
    n_tokens, top_k = x.shape[0], topk_ids.shape[1]
    n_pairs = n_tokens * top_k
    x = x if x.stride(-1) == 1 else x.contiguous()
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    sorted_ids, expert_ids, n_padded = moe_align(topk_ids, n_experts, block_m)
    n_tiles_m = expert_ids.shape[0]  # an upper bound: tiles past n_padded return at once
    act = torch.empty(n_pairs, inter, dtype=x.dtype, device=x.device)
    partial = torch.empty(n_pairs, hidden, dtype=x.dtype, device=x.device)
    run = {"device": x.device, "num_warps": config.num_warps, "num_stages": config.num_stages, "BITS": bits,
           "BLOCK_M": block_m, "BLOCK_N": block_n, "GROUP_SIZE_M": config["GROUP_SIZE_M"]}
    for qw, grid_n, kernel in ((gu, inter, _fused_moe_wq_gate_up_kernel), (dn, hidden, _fused_moe_wq_down_kernel)):
        qweight, scales = qw.qweight.contiguous(), qw.scales.contiguous()
        zeros = qw.zero_points.contiguous() if qw.zero_points is not None else qweight  # uint8 dummy
        group_size = qw.group_size
        meta = dict(run, HAS_ZP=qw.zero_points is not None, BLOCK_K=block_k_for(config, group_size, qw.n_groups))
        grid = (n_tiles_m * triton.cdiv(grid_n, block_n),)
        if kernel is _fused_moe_wq_gate_up_kernel:
            launch(kernel, grid, x, qweight, scales, zeros, act, sorted_ids, expert_ids, n_padded,
                   n_pairs, top_k, hidden, inter, n_tiles_m, group_size,
                   x.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
                   act.stride(0), **meta)
        else:
            launch(kernel, grid, act, qweight, scales, zeros, topk_weights.reshape(-1).contiguous(), partial,
                   sorted_ids, expert_ids, n_padded, n_pairs, hidden, inter, n_tiles_m, group_size,
                   act.stride(0), qweight.stride(0), qweight.stride(1), scales.stride(0), scales.stride(1),
                   partial.stride(0), **meta)
    return partial.view(n_tokens, top_k, hidden).sum(1, dtype=torch.float32).to(x.dtype)


def fused_moe_wq_reference(x: torch.Tensor, gate_up: tuple, down: tuple, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, bits: int, config: KernelConfig | None = None) -> torch.Tensor:
    """quant.dequantize both expert stacks (fp32), then fused_moe's loop-over-experts reference."""
    gu, dn = (dequantize(qw) for qw in _expert_pair(x, gate_up, down, bits))
    return fused_moe_reference(x.float(), gu, dn, topk_weights.float(), topk_ids).to(x.dtype)


CONFIG_SPACE = [KernelConfig("fused_moe_wq", {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                             num_stages=st, meta={"GROUP_SIZE_M": gm})
                for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (32, 64, 128) for gm in (1, 8)
                for w in (4, 8) for st in (2, 3, 4)]
# 32 x 64 tiles: fused_moe's 64 x 64 default holds two fp32 accumulators plus two dequantized weight tiles and
# spilled here (gate/up kernel, 255 registers, 16-112 B stack on sm_80/86/89 bf16; 32 x 64 compiles to 157-199)
DEFAULT_CONFIG = KernelConfig("fused_moe_wq", {"BLOCK_M": 32, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4,
                              num_stages=3, meta={"GROUP_SIZE_M": 8})

COMPILE_SHAPES = ({"bits": 4, "hidden": 2048, "inter": 768, "group": 128, "zero_points": 0},
                  {"bits": 8, "hidden": 2048, "inter": 768, "group": 0, "zero_points": 0})


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """The gate/up kernel keeps two fp32 [BLOCK_M, BLOCK_N] accumulators and dequantizes two [BLOCK_K, BLOCK_N]
    weight tiles: at most 96 such values a thread (128 spilled on sm_80-89, see DEFAULT_CONFIG); one x and two
    weight tiles of 2-byte elements staged per pipeline stage."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    shared = 2 * config.num_stages * (bm * bk + 2 * bk * bn)
    live = (2 * bm * bn + 2 * bk * bn) // config.threads
    return live <= 96 and shared <= arch.max_shared_per_block and bm * bn >= 8 * config.threads


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    """Both kernels; group 0 in a shape means per channel (one group over each kernel's K). A group that does
    not divide K (a partial last group) pads the rows of qweight to whole groups; the divisibility hints go
    to the dimensions and strides that are multiples of 16 for this shape only (config.aligned_args)."""
    hidden, inter, bits = shape["hidden"], shape["inter"], shape["bits"]
    specs = []
    for fn, k, rows, pointers in (
            (_fused_moe_wq_gate_up_kernel, hidden, 2 * inter, {"x_ptr": dtype, "act_ptr": dtype}),
            (_fused_moe_wq_down_kernel, inter, hidden, {"act_ptr": dtype, "topk_weights_ptr": dtype,
                                                        "partial_ptr": dtype})):
        group = shape["group"] or k
        n_groups = -(-k // group)
        row_bytes = n_groups * group * bits // 8  # [E, N, whole groups] codes
        aligned = aligned_args({"hidden": hidden, "inter": inter, "group_size": group, "stride_qe": rows * row_bytes,
                                "stride_qn": row_bytes, "stride_se": rows * n_groups, "stride_ap": inter})
        specs.append(CompileSpec(
            fn, pointers=pointers | {"qweight_ptr": "u8", "scales_ptr": dtype, "zeros_ptr": "u8",
                                     "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "n_padded_ptr": "i32"},
            constexprs=config.constexprs | {"BLOCK_K": block_k_for(config, group, n_groups), "BITS": bits,
                                            "HAS_ZP": bool(shape["zero_points"])},
            aligned=aligned, num_warps=config.num_warps, num_stages=config.num_stages,
            shape=",".join(f"{key}={v}" for key, v in shape.items())))
    return specs
