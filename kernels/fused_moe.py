"""Grouped expert GEMMs over expert-sorted (token, expert) pairs: gate/up with SiLU·mul, then down scaled by
the routing weight; the second half of `qwen3export::moe`. Graph: graphs/decoder.py SparseMoeBlock/Experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, divisibility_hints
from qwen3export.kernels.launch import launch
from qwen3export.kernels.tiles import grouped_tile
from qwen3export.kernels.moe_align import moe_align


@triton.jit
def _fused_moe_gate_up_kernel(
    # pointers
    x_ptr, gate_up_ptr, act_ptr, sorted_ids_ptr, expert_ids_ptr, n_padded_ptr,
    # dimensions
    n_pairs, top_k, hidden, inter, n_tiles_m,
    # strides (elements; the hidden axis of x and gate_up is contiguous)
    stride_xt, stride_ge, stride_gn, stride_ap,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """act[p, n] = silu(x[t] . gate_up[e, n]) * (x[t] . gate_up[e, I + n]) for pair p = t * k + slot of expert e.

    x [T, H]; gate_up [E, 2I, H] (rows [0, I) gate, [I, 2I) up: transformers' Qwen3MoeExperts layout);
    act [T * k, I] (rows act_row_stride(I) apart); sorted_ids / expert_ids / n_padded from moe_align.
    Program (tile of BLOCK_M sorted slots, all of one expert) x (BLOCK_N columns of I) computes the gate
    and the up tile from the same x tile, so SiLU·mul happens in registers and only act reaches memory
    (vLLM's fused_moe_kernel writes the [T*k, 2I] product and runs silu_and_mul separately). Gate and up
    are rounded to x's dtype before the SiLU, where the graph's F.linear output would be. Tiles are visited
    in groups of GROUP_SIZE_M along M for L2 reuse of the weight columns (Triton tutorial 03).
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
    gate_ptrs = gate_up_ptr + expert * stride_ge + offs_n[None, :] * stride_gn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    up_ptrs = gate_ptrs + inter * stride_gn
    acc_gate = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_up = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, hidden, BLOCK_K):
        k_ok = offs_k < hidden - k0
        a = tl.load(x_ptrs, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        w_mask = k_ok[:, None] & n_ok[None, :]
        acc_gate = tl.dot(a, tl.load(gate_ptrs, mask=w_mask, other=0.0), acc_gate)
        acc_up = tl.dot(a, tl.load(up_ptrs, mask=w_mask, other=0.0), acc_up)
        x_ptrs += BLOCK_K
        gate_ptrs += BLOCK_K
        up_ptrs += BLOCK_K
    dtype = act_ptr.dtype.element_ty
    gate = acc_gate.to(dtype).to(tl.float32)
    up = acc_up.to(dtype).to(tl.float32)
    act = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up
    tl.store(act_ptr + pairs[:, None] * stride_ap + offs_n[None, :], act.to(dtype),
             mask=pair_ok[:, None] & n_ok[None, :])


@triton.jit
def _fused_moe_down_kernel(
    # pointers
    act_ptr, down_ptr, topk_weights_ptr, partial_ptr, sorted_ids_ptr, expert_ids_ptr, n_padded_ptr,
    # dimensions
    n_pairs, hidden, inter, n_tiles_m,
    # strides (elements; the inter axis of act and down is contiguous)
    stride_ap, stride_de, stride_dn, stride_pp,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """partial[p, n] = w[p] * (act[p] . down[e, n]) for pair p of expert e, n in [0, H).

    act [T * k, I]; down [E, H, I]; topk_weights [T * k] (pair order); partial [T * k, H] in act's
    dtype, summed over the k slots of each token by the launcher. Same tiling as the gate/up kernel.
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
    w_ptrs = down_ptr + expert * stride_de + offs_n[None, :] * stride_dn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, inter, BLOCK_K):
        k_ok = offs_k < inter - k0
        a = tl.load(a_ptrs, mask=pair_ok[:, None] & k_ok[None, :], other=0.0)
        acc = tl.dot(a, tl.load(w_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0), acc)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    weight = tl.load(topk_weights_ptr + pairs, mask=pair_ok, other=0.0).to(tl.float32)  # [BLOCK_M]
    acc = acc.to(partial_ptr.dtype.element_ty).to(tl.float32) * weight[:, None]
    tl.store(partial_ptr + pairs[:, None] * stride_pp + offs_n[None, :], acc.to(partial_ptr.dtype.element_ty),
             mask=pair_ok[:, None] & n_ok[None, :])


def _check(x, gate_up, down, topk_weights, topk_ids):
    if x.dim() != 2 or gate_up.dim() != 3 or down.dim() != 3:
        raise InputError(f"fused_moe: x {tuple(x.shape)} must be [T, H], gate_up [E, 2I, H], down [E, H, I]")
    e, two_i, h = gate_up.shape
    if h != x.shape[1] or two_i % 2 or down.shape != (e, h, two_i // 2):
        raise InputError(f"fused_moe: gate_up {tuple(gate_up.shape)} and down {tuple(down.shape)} do not match "
                         f"[E, 2I, {x.shape[1]}] and [E, {x.shape[1]}, I]")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x.shape[0]:
        raise InputError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [{x.shape[0]}, k]")
    if gate_up.dtype != x.dtype or down.dtype != x.dtype:
        raise InputError(f"fused_moe: weights ({gate_up.dtype}, {down.dtype}) must have x's dtype {x.dtype}")


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, config: KernelConfig | None = None,
              align_config: KernelConfig | None = None) -> torch.Tensor:
    """x [T, H], gate_up [E, 2I, H], down [E, H, I], topk_weights/topk_ids [T, k] -> out [T, H] in x's dtype:
    out[t] = sum_j w[t, j] * down[e] silu(gate[e] x[t]) * (up[e] x[t]), e = topk_ids[t, j]."""
    _check(x, gate_up, down, topk_weights, topk_ids)
    config = config or DEFAULT_CONFIG
    n_tokens, hidden = x.shape
    n_experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    top_k = topk_ids.shape[1]
    n_pairs = n_tokens * top_k
    x = x if x.stride(-1) == 1 else x.contiguous()
    gate_up, down = gate_up.contiguous(), down.contiguous()
    block_m, block_n, block_k = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    sorted_ids, expert_ids, n_padded = moe_align(topk_ids, n_experts, block_m, align_config)
    n_tiles_m = expert_ids.shape[0]  # an upper bound: tiles past n_padded return at once
    act = torch.empty(n_pairs, act_row_stride(inter), dtype=x.dtype, device=x.device)[:, :inter]
    partial = torch.empty(n_pairs, hidden, dtype=x.dtype, device=x.device)
    run = {"device": x.device, "num_warps": config.num_warps, "num_stages": config.num_stages,
           "BLOCK_M": block_m, "BLOCK_N": block_n, "BLOCK_K": block_k, "GROUP_SIZE_M": config["GROUP_SIZE_M"]}
    launch(_fused_moe_gate_up_kernel, (n_tiles_m * triton.cdiv(inter, block_n),),
           x, gate_up, act, sorted_ids, expert_ids, n_padded,
           n_pairs, top_k, hidden, inter, n_tiles_m,
           x.stride(0), gate_up.stride(0), gate_up.stride(1), act.stride(0), **run)
    launch(_fused_moe_down_kernel, (n_tiles_m * triton.cdiv(hidden, block_n),),
           act, down, topk_weights.reshape(-1).contiguous(), partial, sorted_ids, expert_ids, n_padded,
           n_pairs, hidden, inter, n_tiles_m,
           act.stride(0), down.stride(0), down.stride(1), partial.stride(0), **run)
    return partial.view(n_tokens, top_k, hidden).sum(1, dtype=torch.float32).to(x.dtype)


def act_row_stride(inter: int) -> int:
    """act's row stride: I rounded up to 16 elements, so it earns the full divisibility hint whatever I is (act
    is this launcher's own buffer; the pad, at most 15 elements a (token, slot) row, is never read). Default
    config, sm_80 bf16, registers padded / unpadded: I 36 down kernel 120 / 156, hidden 100 / I 50 gate/up
    187 / 255; with no hint at all on an I of 40 the down kernel spilled 16 B."""
    return -(-inter // ACT_ROW_ALIGN) * ACT_ROW_ALIGN


def fused_moe_reference(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor, config: KernelConfig | None = None) -> torch.Tensor:
    """A loop over experts in fp32 (as vLLM's tests/kernels/moe torch_moe), cast to x's dtype at the end.
    Equal to the graph's dense SparseMoeBlock sum for the same weights and ids. `config` is ignored."""
    n_experts, inter = gate_up.shape[0], gate_up.shape[1] // 2
    xf = x.float()
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in range(n_experts):
        token, slot = (topk_ids == e).nonzero(as_tuple=True)
        if token.numel() == 0:
            continue
        gu = xf[token] @ gate_up[e].float().t()  # [n, 2I]
        y = (F.silu(gu[:, :inter]) * gu[:, inter:]) @ down[e].float().t()  # [n, H]
        out.index_add_(0, token, y * topk_weights[token, slot].float()[:, None])
    return out.to(x.dtype)


ACT_ROW_ALIGN = 16  # elements: what Triton's divisibility hint (tt.divisibility 16) asks of a stride
CONFIG_SPACE = [KernelConfig("fused_moe", {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                             num_stages=st, meta={"GROUP_SIZE_M": gm})
                for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (64, 128) for gm in (1, 8)
                for w in (4, 8) for st in (2, 3, 4)]
# vLLM's get_default_config for fp16/bf16 when M > E: 64 x 64 tiles, GROUP_SIZE_M 8, here with BLOCK_K 64
DEFAULT_CONFIG = KernelConfig("fused_moe", {"BLOCK_M": 64, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4,
                              num_stages=3, meta={"GROUP_SIZE_M": 8})

COMPILE_SHAPES = ({"hidden": 2048, "inter": 768},)  # Qwen3-30B-A3B experts (moe_intermediate_size 768)


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """Prune tiles that cannot fit: the gate/up kernel keeps two fp32 [BLOCK_M, BLOCK_N] accumulators
    (<= 128 registers per thread) and stages one x and two weight tiles of 2-byte elements."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    accumulators = 2 * bm * bn // config.threads
    shared = 2 * config.num_stages * (bm * bk + 2 * bk * bn)
    return accumulators <= 128 and shared <= arch.max_shared_per_block and bm * bn >= 8 * config.threads


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    """Both kernels for one (hidden, inter): each dimension and stride gets the divisibility hint its value
    earns at this shape (config.divisibility_hints: an inter of 40 is a multiple of 8, not 16); act's row
    stride always is a multiple of 16 (act_row_stride)."""
    h, i = shape["hidden"], shape["inter"]
    ap = act_row_stride(i)
    common = {"constexprs": config.constexprs, "num_warps": config.num_warps, "num_stages": config.num_stages,
              "shape": f"hidden={shape['hidden']},inter={shape['inter']}"}
    return [
        CompileSpec(_fused_moe_gate_up_kernel,
                    pointers={"x_ptr": dtype, "gate_up_ptr": dtype, "act_ptr": dtype, "sorted_ids_ptr": "i32",
                              "expert_ids_ptr": "i32", "n_padded_ptr": "i32"},
                    **divisibility_hints({"hidden": h, "inter": i, "stride_xt": h, "stride_ge": 2 * i * h,
                                          "stride_gn": h, "stride_ap": ap}), **common),
        CompileSpec(_fused_moe_down_kernel,
                    pointers={"act_ptr": dtype, "down_ptr": dtype, "topk_weights_ptr": dtype, "partial_ptr": dtype,
                              "sorted_ids_ptr": "i32", "expert_ids_ptr": "i32", "n_padded_ptr": "i32"},
                    **divisibility_hints({"hidden": h, "inter": i, "stride_ap": ap, "stride_de": h * i,
                                          "stride_dn": i, "stride_pp": h}), **common),
    ]
