"""What each kernel launches for a problem shape: grid size, executed FLOPs, DRAM bytes, bytes in flight.

Input of the cost model (autotune/cost_model.py); one function per kernel, each mirroring the launcher
in kernels/<op>.py (grid, loop bounds, padding). Shapes are dicts: the model's fixed dims (file-name key
of a table) plus the bucket dims the table is keyed by (e.g. M tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

from qwen3export.errors import InputError
from qwen3export.kernels.attention_decode import MIN_DOT_ROWS, REDUCE_WARPS
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.moe_align import OFFSETS_BLOCK_B, padded_capacity
from qwen3export.spec import ModelSpec

ELEMENT_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2, "fp8": 1}  # fp8: public fp8_w8a8 twins (calibration.py) only
MOE_ALIGN_BLOCK_M = 64  # moe_align's tile in the workload (kernels/moe_align.py COMPILE_SHAPES block_m)


@dataclass(frozen=True)
class Launch:
    """One Triton launch. flops/bytes are totals over the grid; inflight_bytes is what one program has
    requested from memory before it must wait (a loop's tile times its pipeline stages)."""

    function: str  # the @triton.jit function's name, as compile_report records it
    programs: int
    flops: float  # executed, padding included
    bytes: float  # DRAM traffic
    inflight_bytes: float
    num_warps: int
    tensor_core: bool = False  # FLOPs issued by tl.dot (else fp32 SIMT)
    mma_tile: tuple[int, int] | None = None  # (M, N) of the tl.dot tile, for the shared-memory feed model
    program_bytes: float | None = None  # what one program loads, L2 hits included (default bytes / programs)

    @property
    def bytes_per_program(self) -> float:
        return self.program_bytes if self.program_bytes is not None else self.bytes / self.programs


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def rms_norm(shape: dict, config: KernelConfig, e: int) -> list[Launch]:
    """add_rms_norm (the residual variant every layer runs twice): x, residual in; out, sum out."""
    m, n = shape["M"], shape["N"]
    rows = config["BLOCK_ROWS"]
    grid = _cdiv(m, rows)
    return [Launch("_rms_norm_kernel", grid, flops=6.0 * grid * rows * _pow2(n), bytes=4.0 * m * n * e + n * e,
                   inflight_bytes=2.0 * min(rows, m) * n * e, num_warps=config.num_warps)]


def qk_norm_rope(shape: dict, config: KernelConfig, e: int) -> list[Launch]:
    m, hq, hkv, d = shape["M"], shape["Hq"], shape["Hkv"], shape["D"]
    bh = config["BLOCK_H"]
    grid = m * (_cdiv(hq, bh) + _cdiv(hkv, bh))
    moved = m * (hq + hkv) * d * e * 2 + m * d * e * 2  # q/k in and out, cos/sin rows
    return [Launch("_qk_norm_rope_kernel", grid, flops=12.0 * grid * bh * _pow2(d), bytes=moved,
                   inflight_bytes=bh * d * e + 2 * d * e, num_warps=config.num_warps)]


def attention_prefill(shape: dict, config: KernelConfig, e: int) -> list[Launch]:
    """Causal, no past (L = S); each program walks key blocks up to its causal bound."""
    b, s, hq, hkv, d = shape.get("B", 1), shape["S"], shape["Hq"], shape["Hkv"], shape["D"]
    length = shape.get("L", s)
    bm, bn = config["BLOCK_M"], config["BLOCK_N"]
    bd = max(16, _pow2(d))
    tiles_m = _cdiv(s, bm)
    steps = sum(_cdiv(min(length, length - s + (i + 1) * bm), bn) for i in range(tiles_m))  # per (b, h)
    flops = 4.0 * b * hq * steps * bm * bn * bd  # q k^T and p v per key block
    moved = b * hq * s * d * e * 2 + b * hkv * length * d * e * 2  # q in, out; k, v once (L2 keeps GQA re-reads)
    return [Launch("_attention_prefill_kernel", tiles_m * b * hq, flops=flops, bytes=moved,
                   inflight_bytes=2.0 * bn * d * e * config.num_stages + bm * d * e, num_warps=config.num_warps,
                   tensor_core=True, mma_tile=(bm, bn), program_bytes=(steps / tiles_m * 2 * bn + 2 * bm) * d * e)]


def attention_decode(shape: dict, config: KernelConfig, e: int) -> list[Launch]:
    """Split kernel over (B * Hkv, NUM_SPLITS) then the log-sum-exp reduce over B * Hq."""
    b, length, hq, hkv, d = shape["B"], shape["L"], shape["Hq"], shape["Hkv"], shape["D"]
    bn, splits = config["BLOCK_N"], config["NUM_SPLITS"]
    bd = max(16, _pow2(d))
    block_h = max(MIN_DOT_ROWS, _pow2(hq // hkv))
    chunk = _cdiv(_cdiv(length, splits), bn) * bn
    busy_splits = min(splits, _cdiv(length, chunk))  # the others find no key and exit at once
    steps = chunk // bn
    split_programs = b * hkv * busy_splits
    split = Launch("_attention_decode_split_kernel", split_programs,
                   flops=4.0 * split_programs * steps * block_h * bn * bd,
                   bytes=b * hkv * length * d * e * 2 + b * hq * (d * e + splits * (d + 1) * 4),
                   inflight_bytes=2.0 * bn * d * e * config.num_stages, num_warps=config.num_warps,
                   tensor_core=True, mma_tile=(block_h, bn))
    reduce = Launch("_attention_decode_reduce_kernel", b * hq, flops=4.0 * b * hq * splits * bd,
                    bytes=b * hq * (splits * (d + 1) * 4 + d * e), inflight_bytes=splits * (bd + 1) * 4.0,
                    num_warps=REDUCE_WARPS)
    return [split, reduce]


def moe_routing(shape: dict, config: KernelConfig, e: int) -> list[Launch]:
    m, h, n_exp, k = shape["M"], shape["H"], shape["E"], shape["K"]
    bt, bh = config["BLOCK_T"], config["BLOCK_H"]
    be = max(16, _pow2(n_exp))
    grid = _cdiv(m, bt)
    flops = 2.0 * grid * bt * be * _cdiv(h, bh) * bh + 4.0 * grid * bt * be * k  # logits GEMM + k top-k rounds
    moved = m * h * e + n_exp * h * e + m * k * (e + 8)  # x, router (L2-resident across programs), outputs
    return [Launch("_moe_routing_kernel", grid, flops=flops, bytes=moved,
                   inflight_bytes=(bt + be) * bh * e * config.num_stages, num_warps=config.num_warps,
                   tensor_core=True, mma_tile=(bt, be), program_bytes=(bt + n_exp) * h * e)]  # every program: router


def moe_align(shape: dict, config: KernelConfig, e: int) -> list[Launch]:
    """count (per chunk) -> offsets (one program, serial over chunks) -> scatter (per chunk)."""
    pairs, n_exp = shape["M"] * shape["K"], shape["E"]
    bp = config["BLOCK_PAIRS"]
    be = max(16, _pow2(n_exp))
    chunks = max(1, _cdiv(pairs, bp))
    blocks = _cdiv(padded_capacity(pairs, n_exp, MOE_ALIGN_BLOCK_M), MOE_ALIGN_BLOCK_M)
    warps = config.num_warps
    count = Launch("_moe_align_count_kernel", chunks, flops=2.0 * chunks * bp * be,
                   bytes=pairs * 8 + chunks * be * 4, inflight_bytes=bp * 8.0, num_warps=warps)
    offsets_bytes = chunks * be * 8 + be * 4 + blocks * 4
    offsets_steps = chunks + _cdiv(blocks, OFFSETS_BLOCK_B)  # each step waits on the last: latency-bound
    offsets = Launch("_moe_align_offsets_kernel", 1, flops=2.0 * chunks * be + 4.0 * blocks * be,
                     bytes=offsets_bytes, inflight_bytes=offsets_bytes / offsets_steps, num_warps=warps)
    scatter = Launch("_moe_align_scatter_kernel", chunks, flops=2.0 * chunks * bp * be * math.log2(bp),
                     bytes=pairs * (8 + 4) + chunks * be * 4, inflight_bytes=bp * 8.0, num_warps=warps)
    return [count, offsets, scatter]


def expected_expert_tiles(pairs: int, n_experts: int, block_m: int) -> tuple[float, int]:
    """(experts hit, BLOCK_M tiles) for `pairs` (token, expert) pairs routed uniformly at random."""
    hit = n_experts * (1.0 - (1.0 - 1.0 / n_experts) ** pairs)
    per_expert = pairs / hit
    return hit, max(1, round(hit * math.ceil(per_expert / block_m)))


def fused_moe(shape: dict, config: KernelConfig, e: int) -> list[Launch]:
    """gate/up (two dots sharing the x tile) then down; uniform routing assumed (moe_align pads each
    expert's pairs to BLOCK_M). Weight tiles are re-read from DRAM once per GROUP_SIZE_M group of M tiles
    of the same expert (the L2 reuse that grouping exists for). Padding rows cost MMA FLOPs (tl.dot runs on
    the whole tile) but no loads (their x/act loads are masked off), so bytes count the real rows only."""
    m, h, inter, n_exp, k = shape["M"], shape["H"], shape["I"], shape["E"], shape["K"]
    bm, bn, bk, group = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"], config["GROUP_SIZE_M"]
    pairs = m * k
    hit, tiles_m = expected_expert_tiles(pairs, n_exp, bm)
    rows = min(float(bm), pairs / tiles_m)  # real (token, expert) rows in an average tile
    rereads = max(1.0, math.ceil(tiles_m / hit / group))
    n_gate = _cdiv(inter, bn)
    n_down = _cdiv(h, bn)
    gate_up = Launch("_fused_moe_gate_up_kernel", tiles_m * n_gate,
                     flops=2.0 * tiles_m * bm * (2 * n_gate * bn) * _cdiv(h, bk) * bk,
                     bytes=hit * 2 * inter * h * e * rereads + pairs * (h + inter) * e,
                     inflight_bytes=(rows + 2 * bn) * bk * e * config.num_stages, num_warps=config.num_warps,
                     tensor_core=True, mma_tile=(bm, 2 * bn), program_bytes=(rows + 2 * bn) * h * e)
    down = Launch("_fused_moe_down_kernel", tiles_m * n_down,
                  flops=2.0 * tiles_m * bm * n_down * bn * _cdiv(inter, bk) * bk,
                  bytes=hit * h * inter * e * rereads + pairs * (inter + h) * e,
                  inflight_bytes=(rows + bn) * bk * e * config.num_stages, num_warps=config.num_warps,
                  tensor_core=True, mma_tile=(bm, bn), program_bytes=(rows + bn) * inter * e)
    return [gate_up, down]


@dataclass(frozen=True)
class Workload:
    """A kernel's problem family: the dims a model fixes (in a table's file name), the dims a table is
    keyed by (bucket), the buckets tuned by default, and the launches for one shape."""

    kernel: str
    fixed: Callable[[ModelSpec], dict]
    bucket_keys: tuple[str, ...]
    buckets: tuple[dict, ...]
    launches: Callable[[dict, KernelConfig, int], list[Launch]]
    moe_only: bool = False


TOKEN_BUCKETS = tuple({"M": m} for m in (1, 4, 16, 64, 256, 1024, 4096))  # decode batch .. prefill chunk


def _heads(spec: ModelSpec) -> dict:
    return {"Hq": spec.num_attention_heads, "Hkv": spec.num_key_value_heads, "D": spec.head_dim}


def _moe(spec: ModelSpec) -> dict:
    return {"E": spec.num_experts, "H": spec.hidden_size, "K": spec.num_experts_per_tok}


WORKLOADS: dict[str, Workload] = {w.kernel: w for w in (
    Workload("rms_norm", lambda s: {"N": s.hidden_size}, ("M",), TOKEN_BUCKETS, rms_norm),
    Workload("qk_norm_rope", _heads, ("M",), TOKEN_BUCKETS, qk_norm_rope),
    Workload("attention_prefill", _heads, ("S",), tuple({"S": s} for s in (128, 512, 2048, 8192)),
             attention_prefill),
    Workload("attention_decode", _heads, ("B", "L"),
             tuple({"B": b, "L": n} for b in (1, 8, 32) for n in (1024, 8192, 32768)), attention_decode),
    Workload("moe_routing", _moe, ("M",), TOKEN_BUCKETS, moe_routing, moe_only=True),
    Workload("moe_align", lambda s: {"E": s.num_experts, "K": s.num_experts_per_tok}, ("M",), TOKEN_BUCKETS,
             moe_align, moe_only=True),
    Workload("fused_moe", lambda s: _moe(s) | {"I": s.moe_intermediate_size}, ("M",), TOKEN_BUCKETS, fused_moe,
             moe_only=True),
)}


def workload(kernel: str) -> Workload:
    if kernel not in WORKLOADS:
        raise InputError(f"unknown kernel {kernel!r}; tunable kernels: {', '.join(WORKLOADS)}")
    return WORKLOADS[kernel]


def kernels_for(spec: ModelSpec) -> list[str]:
    """The tunable kernels a model's graph runs (the MoE ones only for MoE models)."""
    return [k for k, w in WORKLOADS.items() if spec.is_moe or not w.moe_only]


def launches(kernel: str, shape: dict, config: KernelConfig, dtype: str) -> list[Launch]:
    if dtype not in ELEMENT_BYTES:
        raise InputError(f"no workload model for dtype {dtype!r}; choose from {', '.join(ELEMENT_BYTES)}")
    return workload(kernel).launches(shape, config, ELEMENT_BYTES[dtype])
