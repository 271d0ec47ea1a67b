"""Qwen3-MoE router: logits GEMM, fp32 softmax, top-k and optional renormalisation in one kernel; the first
half of `qwen3export::moe`. Graph: graphs/decoder.py `moe_routing_reference`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, divisibility_hints
from qwen3export.kernels.launch import launch


@triton.jit
def _moe_routing_kernel(
    # pointers
    x_ptr, router_ptr, weights_ptr, ids_ptr,
    # dimensions
    n_tokens, hidden, n_experts,
    # strides (elements; the hidden axis is contiguous)
    stride_xt, stride_re, stride_wt, stride_it,
    # meta
    TOP_K: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """p = softmax_fp32(cast(x W^T)); (w, i) = top-k of p, ties to the lowest expert id; w /= sum(w) if NORMALIZE.

    x [T, H], router [E, H] -> weights [T, k] in x's dtype, ids [T, k] int64, sorted by weight
    descending (transformers Qwen3MoeSparseMoeBlock: softmax(dtype=float) -> topk -> renormalise if
    norm_topk_prob). Logits are accumulated in fp32 and rounded to x's dtype, as F.linear returns them.
    Top-k is k rounds of (row max, lowest column holding it, knock it out): k = 8 of E = 128 costs 8
    row reductions over a [BLOCK_T, BLOCK_E] tile already in registers.
    """
    tokens = tl.program_id(0).to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)  # [BLOCK_T]
    token_ok = tokens < n_tokens
    experts = tl.arange(0, BLOCK_E)  # [BLOCK_E]
    expert_ok = experts < n_experts
    offs_h = tl.arange(0, BLOCK_H)
    logits = tl.zeros([BLOCK_T, BLOCK_E], tl.float32)
    for h0 in range(0, hidden, BLOCK_H):
        h_ok = h0 + offs_h < hidden
        x = tl.load(x_ptr + tokens[:, None] * stride_xt + (h0 + offs_h)[None, :],
                    mask=token_ok[:, None] & h_ok[None, :], other=0.0)  # [BLOCK_T, BLOCK_H]
        w = tl.load(router_ptr + experts[None, :] * stride_re + (h0 + offs_h)[:, None],
                    mask=expert_ok[None, :] & h_ok[:, None], other=0.0)  # [BLOCK_H, BLOCK_E]
        logits = tl.dot(x, w, logits)
    logits = logits.to(x_ptr.dtype.element_ty).to(tl.float32)
    logits = tl.where(expert_ok[None, :], logits, float("-inf"))
    probs = tl.exp(logits - tl.max(logits, axis=1)[:, None])
    probs = probs / tl.sum(probs, axis=1)[:, None]  # [BLOCK_T, BLOCK_E], padded experts 0
    slots = tl.arange(0, BLOCK_K)  # [BLOCK_K]
    top_w = tl.zeros([BLOCK_T, BLOCK_K], tl.float32)
    top_i = tl.zeros([BLOCK_T, BLOCK_K], tl.int32)
    for slot in tl.static_range(TOP_K):
        best = tl.max(probs, axis=1)  # [BLOCK_T]
        best_i = tl.min(tl.where(probs == best[:, None], experts[None, :], BLOCK_E), axis=1)  # lowest id wins ties
        top_w = tl.where(slots[None, :] == slot, best[:, None], top_w)
        top_i = tl.where(slots[None, :] == slot, best_i[:, None], top_i)
        probs = tl.where(experts[None, :] == best_i[:, None], -1.0, probs)  # probabilities are >= 0
    if NORMALIZE:
        top_w = top_w / tl.sum(top_w, axis=1)[:, None]  # unused slots hold 0
    out_mask = token_ok[:, None] & (slots[None, :] < TOP_K)
    tl.store(weights_ptr + tokens[:, None] * stride_wt + slots[None, :],
             top_w.to(weights_ptr.dtype.element_ty), mask=out_mask)
    tl.store(ids_ptr + tokens[:, None] * stride_it + slots[None, :], top_i.to(tl.int64), mask=out_mask)


def moe_routing(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool,
                config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, H], router_weight [E, H] -> (weights [T, k] in x's dtype, expert ids [T, k] int64)."""
    if x.dim() != 2 or router_weight.dim() != 2 or x.shape[1] != router_weight.shape[1]:
        raise InputError(f"moe_routing: x {tuple(x.shape)} must be [T, H] and router "
                         f"{tuple(router_weight.shape)} [E, H]")
    if not 1 <= top_k <= router_weight.shape[0]:
        raise InputError(f"moe_routing: top_k={top_k} must be in 1..{router_weight.shape[0]} experts")
    if router_weight.dtype != x.dtype:
        raise InputError(f"moe_routing: router weight is {router_weight.dtype} but x is {x.dtype}")
    config = config or DEFAULT_CONFIG
    n_tokens, hidden = x.shape
    n_experts = router_weight.shape[0]
    x = x if x.stride(-1) == 1 else x.contiguous()
    router_weight = router_weight.contiguous()
    weights = torch.empty(n_tokens, top_k, dtype=x.dtype, device=x.device)
    ids = torch.empty(n_tokens, top_k, dtype=torch.int64, device=x.device)
    block_t = config["BLOCK_T"]
    launch(_moe_routing_kernel, (triton.cdiv(n_tokens, block_t),),
           x, router_weight, weights, ids,
           n_tokens, hidden, n_experts,
           x.stride(0), router_weight.stride(0), weights.stride(0), ids.stride(0),
           device=x.device, num_warps=config.num_warps, num_stages=config.num_stages,
           TOP_K=top_k, NORMALIZE=norm_topk_prob, BLOCK_T=block_t, BLOCK_H=config["BLOCK_H"],
           BLOCK_E=max(16, triton.next_power_of_2(n_experts)), BLOCK_K=triton.next_power_of_2(top_k))
    return weights, ids


def moe_routing_reference(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool,
                          config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """graphs/decoder.py `router_topk` with a defined tie rule: lowest expert id first.

    The graph's torch.topk leaves ties unordered: on CPU (torch 2.13) topk([.1, .3, .3, .2, .3, .1, .3], 3)
    returns ids [1, 6, 4]. A stable descending sort keeps equal probabilities in id order, which is also
    ONNX TopK's documented rule ("the element with lower index appears first"). `config` is ignored.
    """
    logits = F.linear(x, router_weight)  # [T, E] in x's dtype
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_w, top_i = torch.sort(probs, dim=-1, descending=True, stable=True)
    top_w, top_i = top_w[:, :top_k], top_i[:, :top_k]  # [T, k]
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w.to(x.dtype), top_i


CONFIG_SPACE = [KernelConfig("moe_routing", {"BLOCK_T": bt, "BLOCK_H": bh}, num_warps=w, num_stages=st)
                for bt in (16, 32, 64) for bh in (32, 64, 128) for w in (2, 4, 8) for st in (1, 2, 3)]
DEFAULT_CONFIG = KernelConfig("moe_routing", {"BLOCK_T": 16, "BLOCK_H": 64}, num_warps=4, num_stages=2)

COMPILE_SHAPES = ({"hidden": 2048, "experts": 128, "top_k": 8},)  # Qwen3-30B-A3B's router


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """Prune [BLOCK_T, 128-expert] fp32 tiles above 64 registers per thread (the top-k rounds hold
    probabilities, selections and masks of that size at once)."""
    return config["BLOCK_T"] * 128 // config.threads <= 64


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    return [CompileSpec(
        _moe_routing_kernel,
        pointers={"x_ptr": dtype, "router_ptr": dtype, "weights_ptr": dtype, "ids_ptr": "i64"},
        constexprs={"TOP_K": shape["top_k"], "NORMALIZE": bool(shape.get("normalize", True)),
                    "BLOCK_E": max(16, triton.next_power_of_2(shape["experts"])),
                    "BLOCK_K": triton.next_power_of_2(shape["top_k"])} | config.constexprs,
        **divisibility_hints(dict.fromkeys(("hidden", "stride_xt", "stride_re"), shape["hidden"])),
        num_warps=config.num_warps, num_stages=config.num_stages,
        shape=f"hidden={shape['hidden']},experts={shape['experts']},top_k={shape['top_k']}")]
