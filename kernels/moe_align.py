"""Group (token, expert) pairs by expert, each expert padded to the GEMM tile BLOCK_M, so fused_moe.py can
run one expert per tile (the layout of vLLM's moe_align_block_size); part of `qwen3export::moe`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig
from qwen3export.kernels.launch import launch


@triton.jit
def _moe_align_count_kernel(
    # pointers
    ids_ptr, chunk_counts_ptr,
    # dimensions
    n_pairs, n_experts,
    # meta
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """chunk_counts[c, e] = #{pairs p in chunk c : ids[p] = e}.

    ids [T * k] (the flattened top-k ids, pair p = token * k + slot); chunk_counts [n_chunks, BLOCK_E]
    int32; program c owns pairs [c * BLOCK_PAIRS, (c + 1) * BLOCK_PAIRS) as a one-hot [pairs, experts] tile.
    """
    chunk = tl.program_id(0)
    pairs = chunk * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    ids = tl.load(ids_ptr + pairs, mask=pairs < n_pairs, other=-1).to(tl.int32)
    experts = tl.arange(0, BLOCK_E)
    one_hot = (ids[:, None] == experts[None, :]) & (experts[None, :] < n_experts)  # [BLOCK_PAIRS, BLOCK_E]
    tl.store(chunk_counts_ptr + chunk * BLOCK_E + experts, tl.sum(one_hot.to(tl.int32), axis=0))


@triton.jit
def _moe_align_offsets_kernel(
    # pointers
    chunk_counts_ptr, chunk_starts_ptr, expert_starts_ptr, expert_ids_ptr, n_padded_ptr,
    # dimensions
    n_chunks, n_experts, n_blocks,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    """Prefix sums: where each chunk's pairs of each expert go, and which expert each tile belongs to.

    chunk_starts[c, e] = sum_{c' < c} chunk_counts[c', e]; expert e owns sorted slots
    [expert_starts[e], expert_starts[e] + padded[e]) with padded[e] = roundup(count[e], BLOCK_M)
    (0 for an expert with no pair); n_padded[0] = sum_e padded[e]; expert_ids[blk] = the e whose range
    holds blk * BLOCK_M, -1 past n_padded. One program: E-wide vectors, a sequential loop over chunks.
    """
    experts = tl.arange(0, BLOCK_E)
    running = tl.zeros([BLOCK_E], tl.int32)
    for chunk in range(0, n_chunks):
        tl.store(chunk_starts_ptr + chunk * BLOCK_E + experts, running)
        running += tl.load(chunk_counts_ptr + chunk * BLOCK_E + experts)
    padded = tl.where(experts < n_experts, tl.cdiv(running, BLOCK_M) * BLOCK_M, 0)
    ends = tl.cumsum(padded, axis=0)  # [BLOCK_E] inclusive
    tl.store(expert_starts_ptr + experts, ends - padded)
    n_padded = tl.sum(padded, axis=0)
    tl.store(n_padded_ptr, n_padded)
    ends = tl.where(experts < n_experts, ends, 2147483647)  # padding experts never precede a tile
    for b0 in range(0, n_blocks, BLOCK_B):
        blocks = b0 + tl.arange(0, BLOCK_B)
        first_slot = blocks * BLOCK_M
        owner = tl.sum((ends[None, :] <= first_slot[:, None]).to(tl.int32), axis=1)  # [BLOCK_B]
        tl.store(expert_ids_ptr + blocks, tl.where(first_slot < n_padded, owner, -1), mask=blocks < n_blocks)


@triton.jit
def _moe_align_scatter_kernel(
    # pointers
    ids_ptr, chunk_starts_ptr, expert_starts_ptr, sorted_ids_ptr,
    # dimensions
    n_pairs, n_experts,
    # meta
    BLOCK_PAIRS: tl.constexpr,
    BLOCK_E: tl.constexpr,
):
    """sorted_ids[expert_starts[e] + chunk_starts[c, e] + rank] = p for each pair p of chunk c, where rank
    counts the chunk's earlier pairs with the same expert (a column cumsum of the one-hot tile), so each
    expert's pairs keep ascending p (token-major) order."""
    chunk = tl.program_id(0)
    pairs = chunk * BLOCK_PAIRS + tl.arange(0, BLOCK_PAIRS)
    pair_ok = pairs < n_pairs
    ids = tl.load(ids_ptr + pairs, mask=pair_ok, other=-1).to(tl.int32)
    experts = tl.arange(0, BLOCK_E)
    one_hot = ((ids[:, None] == experts[None, :]) & (experts[None, :] < n_experts)).to(tl.int32)
    rank = tl.sum(one_hot * (tl.cumsum(one_hot, axis=0) - 1), axis=1)  # [BLOCK_PAIRS]
    valid = pair_ok & (ids >= 0) & (ids < n_experts)
    safe_ids = tl.where(valid, ids, 0)
    dest = (tl.load(expert_starts_ptr + safe_ids, mask=valid, other=0)
            + tl.load(chunk_starts_ptr + chunk * BLOCK_E + safe_ids, mask=valid, other=0) + rank)
    tl.store(sorted_ids_ptr + dest, pairs, mask=valid)


def padded_capacity(n_pairs: int, n_experts: int, block_m: int) -> int:
    """Slots needed in the worst case: every non-empty expert wastes at most BLOCK_M - 1."""
    return n_pairs + min(n_experts, n_pairs) * (block_m - 1)


def moe_align(topk_ids: torch.Tensor, n_experts: int, block_m: int,
              config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """topk_ids [T, k] ints in [0, E) -> (sorted_ids [cap] int32, expert_ids [cap / BLOCK_M] int32,
    n_padded [1] int32), cap = padded_capacity(T * k, E, BLOCK_M).

    sorted_ids lists pair indices p = token * k + slot grouped by expert in ascending p, each expert's
    group padded with the sentinel T * k to a multiple of BLOCK_M; expert_ids gives each BLOCK_M tile's
    expert, -1 for tiles past n_padded. Everything stays on the device: no host sync.
    """
    if topk_ids.dim() != 2 or topk_ids.dtype.is_floating_point or n_experts < 1 or block_m < 1:
        raise InputError(f"moe_align: topk_ids {tuple(topk_ids.shape)} {topk_ids.dtype} must be integer [T, k] "
                         f"with n_experts, block_m >= 1")
    config = config or DEFAULT_CONFIG
    ids = topk_ids.reshape(-1).contiguous()
    n_pairs = ids.numel()
    cap = padded_capacity(n_pairs, n_experts, block_m)
    n_blocks = triton.cdiv(cap, block_m)
    block_pairs, block_e = config["BLOCK_PAIRS"], max(16, triton.next_power_of_2(n_experts))
    n_chunks = max(1, triton.cdiv(n_pairs, block_pairs))
    device = ids.device
    chunk_counts = torch.empty(n_chunks, block_e, dtype=torch.int32, device=device)
    chunk_starts = torch.empty_like(chunk_counts)
    expert_starts = torch.empty(block_e, dtype=torch.int32, device=device)
    sorted_ids = torch.full((max(cap, 1),), n_pairs, dtype=torch.int32, device=device)[:cap]
    expert_ids = torch.empty(n_blocks, dtype=torch.int32, device=device)
    n_padded = torch.empty(1, dtype=torch.int32, device=device)
    run = {"device": device, "num_warps": config.num_warps, "num_stages": config.num_stages}
    launch(_moe_align_count_kernel, (n_chunks,), ids, chunk_counts, n_pairs, n_experts,
           BLOCK_PAIRS=block_pairs, BLOCK_E=block_e, **run)
    launch(_moe_align_offsets_kernel, (1,), chunk_counts, chunk_starts, expert_starts, expert_ids, n_padded,
           n_chunks, n_experts, n_blocks, BLOCK_M=block_m, BLOCK_E=block_e, BLOCK_B=OFFSETS_BLOCK_B, **run)
    launch(_moe_align_scatter_kernel, (n_chunks,), ids, chunk_starts, expert_starts, sorted_ids, n_pairs, n_experts,
           BLOCK_PAIRS=block_pairs, BLOCK_E=block_e, **run)
    return sorted_ids, expert_ids, n_padded


def moe_align_reference(topk_ids: torch.Tensor, n_experts: int, block_m: int,
                        config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """moe_align in plain torch (stable argsort by expert, then padding); `config` is ignored."""
    ids = topk_ids.reshape(-1).to(torch.int64)
    n_pairs = ids.numel()
    cap = padded_capacity(n_pairs, n_experts, block_m)
    counts = torch.bincount(ids, minlength=n_experts)  # [E]
    padded = (counts + block_m - 1) // block_m * block_m
    starts = torch.cumsum(padded, 0) - padded
    order = torch.argsort(ids, stable=True)  # pair indices grouped by expert, ascending within each
    expert_of = ids[order]
    rank = torch.arange(n_pairs, device=ids.device) - (torch.cumsum(counts, 0) - counts)[expert_of]
    sorted_ids = torch.full((cap,), n_pairs, dtype=torch.int32, device=ids.device)
    sorted_ids[starts[expert_of] + rank] = order.to(torch.int32)
    n_padded = int(padded.sum())
    expert_ids = torch.full((triton.cdiv(cap, block_m),), -1, dtype=torch.int32, device=ids.device)
    expert_ids[: n_padded // block_m] = torch.repeat_interleave(torch.arange(n_experts, device=ids.device),
                                                                padded // block_m).to(torch.int32)
    return sorted_ids, expert_ids, torch.tensor([n_padded], dtype=torch.int32, device=ids.device)


OFFSETS_BLOCK_B = 64  # tiles labelled per step of the offsets kernel's loop
CONFIG_SPACE = [KernelConfig("moe_align", {"BLOCK_PAIRS": bp}, num_warps=w, num_stages=1)
                for bp in (16, 32, 64, 128) for w in (1, 2, 4, 8)]
DEFAULT_CONFIG = KernelConfig("moe_align", {"BLOCK_PAIRS": 64}, num_warps=4, num_stages=1)

COMPILE_SHAPES = ({"experts": 128, "block_m": 64},)  # Qwen3-30B-A3B / 235B-A22B: 128 experts


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """Prune one-hot [pairs, 128] int32 tiles above 64 registers per thread."""
    return config["BLOCK_PAIRS"] * 128 // config.threads <= 64


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    """The three kernels for int64 top-k ids (torch.topk's dtype); `dtype` does not apply."""
    block_e = max(16, triton.next_power_of_2(shape["experts"]))
    label = f"experts={shape['experts']},block_m={shape['block_m']}"
    common = {"num_warps": config.num_warps, "num_stages": config.num_stages, "shape": label}
    chunked = {"BLOCK_E": block_e} | config.constexprs
    return [
        CompileSpec(_moe_align_count_kernel, pointers={"ids_ptr": "i64", "chunk_counts_ptr": "i32"},
                    constexprs=chunked, **common),
        CompileSpec(_moe_align_offsets_kernel,
                    pointers={p: "i32" for p in ("chunk_counts_ptr", "chunk_starts_ptr", "expert_starts_ptr",
                                                 "expert_ids_ptr", "n_padded_ptr")},
                    constexprs={"BLOCK_M": shape["block_m"], "BLOCK_E": block_e, "BLOCK_B": OFFSETS_BLOCK_B},
                    num_warps=config.num_warps, num_stages=config.num_stages, shape=label),
        CompileSpec(_moe_align_scatter_kernel,
                    pointers={"ids_ptr": "i64", "chunk_starts_ptr": "i32", "expert_starts_ptr": "i32",
                              "sorted_ids_ptr": "i32"},
                    constexprs=chunked, **common),
    ]
