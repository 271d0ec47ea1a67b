"""Modelled time of a kernel config on a target: the tune stage's objective when no matching GPU is present.

time = sum over the config's launches (autotune/workloads.py) of waves x roofline(wave) + launch overhead,
with occupancy taken from the registers and shared memory the config really uses once compiled for the
target's arch (kernels/compile.py compile_report). Assumptions (every figure below is a model, not a
measurement; tables built from it are tagged "modelled"):
1. Programs are spread over SMs first, then stacked up to the occupancy limit B (blocks per SM, from
   warps, registers with per-warp allocation rounding, shared memory plus the 1 KB per block CUDA
   reserves on cc 8.x/9.0, and the blocks-per-SM cap). A launch of P programs runs in ceil(P / (SMs x B))
   waves; a wave with n programs keeps min(SMs, n) SMs busy and the others idle.
2. A busy SM gets 1/SMs of the peak FLOP/s; the busy SMs share the DRAM bandwidth, each drawing at most
   32 bytes per clock, so a few busy SMs cannot use all of it: an A100 or H100 needs ~40% of its SMs
   to saturate HBM, an L4 or A10G (GDDR6) ~10-15%. (An assumption: the A100 whitepaper's L2 delivers
   5120 B/clock to 108 SMs, ~47 B/clock each, and DRAM latency keeps one SM below its L2 share.)
   Every byte a program loads, L2 hits included (a GEMM's re-read tiles, the router every routing program
   reads), passes its SM's port. Compute and memory overlap fully within a wave (roofline: the longer).
3. Tensor-core FLOPs reach peak only if (a) at least 4 warps are resident (one per SM sub-partition) and
   (b) shared memory can feed the warp tiles: a warp tile wm x wn (the block's MMA tile split over its
   warps) loads (wm + wn) elements per 2 wm wn FLOPs, at 128 bytes per clock per SM (32 banks x 4 B).
   SIMT FLOPs use the fp32 peak.
4. DRAM latency is hidden only by bytes in flight (Little's law): an SM needs bandwidth/SMs x 0.6 us of
   requests outstanding; fewer resident programs or shallower pipelines (num_stages) slow it
   proportionally. 0.6 us is the order of the global-memory load latency that microbenchmarks report for
   A100/H100 (~500-800 cycles; Jia et al., "Dissecting the Ampere GPU architecture through
   microbenchmarking", GTC 2021; Luo et al., "Benchmarking and Dissecting the Nvidia Hopper GPU
   Architecture", arXiv:2402.13499).
5. Each launch costs 2 us of fixed overhead (launch + tail drain).
6. A config whose compile records are invalid (spills, over the per-block limits, compile error) or that
   fits zero blocks per SM is invalid: it has no time and must never be chosen.

The free parameters of 2-4 (the tensor peak reached per arch, how far compute and memory overlap, the latency
that bytes in flight must cover, the warps that keep the tensor cores busy, what a tile of under 64 rows loses
on Hopper) are a Calibration. UNCALIBRATED is the model as written above; autotune/calibration.py fits a
kernel's parameters to public measurements of its twin (autotune/public_tables.py) and the tune stage uses
the fitted ones for that kernel (autotune/configs/calibration.json).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qwen3export.kernels.compile import compile_report
from qwen3export.kernels.config import KernelConfig, arch_limits
from qwen3export.targets import Target

from .workloads import ELEMENT_BYTES, Launch, launches

MEMORY_LATENCY_S = 0.6e-6
LAUNCH_OVERHEAD_S = 2e-6
SMEM_BYTES_PER_CLOCK = 128
SM_LOAD_BYTES_PER_CLOCK = 32  # what one SM can draw from DRAM (assumption 2)
SHARED_RESERVED_PER_BLOCK = 1024  # CUDA Programming Guide, tech specs: 1 KB shared memory per block for the system
TENSOR_WARPS_PER_SM = 4
WGMMA_MIN_ROWS = 64  # Hopper's warpgroup MMA (wgmma) is m64nNk16: Triton issues it for tiles of >= 64 rows


@dataclass(frozen=True)
class Calibration:
    """The cost model's free parameters; the defaults (UNCALIBRATED) are assumptions 2-4 as written.

    compute_efficiency: arch -> fraction of the datasheet tensor peak Triton's tl.dot reaches; archs not
    listed take default_efficiency. overlap: the fraction of the shorter of compute and memory time hidden
    under the longer within a wave (1: the roofline of assumption 2; 0: they add up, as when the padded rows
    of a small-M tile cost MMA time on top of the weight stream). memory_latency_s: the latency bytes in flight
    must cover (assumption 4). tensor_warps_per_sm: resident warps for the full tensor rate (assumption 3a).
    small_m_efficiency: the tensor rate of a tile with fewer than WGMMA_MIN_ROWS rows on sm_90 relative to a
    warpgroup-MMA tile (Triton falls back to mma.sync there). `fit` records how it was fitted."""

    compute_efficiency: tuple[tuple[str, float], ...] = ()
    default_efficiency: float = 1.0
    overlap: float = 1.0
    memory_latency_s: float = MEMORY_LATENCY_S
    tensor_warps_per_sm: float = TENSOR_WARPS_PER_SM
    small_m_efficiency: float = 1.0
    fit: tuple[tuple[str, Any], ...] = ()

    def efficiency(self, arch: str | None) -> float:
        return dict(self.compute_efficiency).get(arch or "", self.default_efficiency)

    @property
    def parameters(self) -> dict[str, Any]:
        return {"compute_efficiency": dict(self.compute_efficiency), "default_efficiency": self.default_efficiency,
                "overlap": self.overlap, "memory_latency_s": self.memory_latency_s,
                "tensor_warps_per_sm": self.tensor_warps_per_sm, "small_m_efficiency": self.small_m_efficiency}

    def to_dict(self) -> dict[str, Any]:
        return self.parameters | {"fit": dict(self.fit)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Calibration":
        known = set(cls().to_dict())
        if set(data) - known:
            raise ValueError(f"calibration fields {sorted(set(data) - known)} unknown; known: {sorted(known)}")
        return cls(compute_efficiency=tuple(sorted(data.get("compute_efficiency", {}).items())),
                   fit=tuple(sorted(data.get("fit", {}).items())),
                   **{k: float(data[k]) for k in ("default_efficiency", "overlap", "memory_latency_s",
                                                  "tensor_warps_per_sm", "small_m_efficiency") if k in data})


UNCALIBRATED = Calibration()


@dataclass(frozen=True)
class Resources:
    """What one compiled Triton function uses (worst case over the compile shapes)."""

    registers: int
    shared_bytes: int
    valid: bool = True
    reason: str = "ok"


@dataclass(frozen=True)
class Estimate:
    """Modelled seconds (None when invalid) with the reason and per-launch details."""

    seconds: float | None
    reason: str = "ok"
    launches: tuple[dict[str, Any], ...] = field(default=())

    @property
    def valid(self) -> bool:
        return self.seconds is not None

    @property
    def microseconds(self) -> float | None:
        return None if self.seconds is None else self.seconds * 1e6


def resources_from_records(records: list[dict[str, Any]]) -> dict[str, Resources]:
    """compile_report records of ONE config -> function name -> Resources (max over shapes, valid if all are)."""
    out: dict[str, Resources] = {}
    for r in records:
        prev = out.get(r["function"])
        regs, shared = r.get("registers") or 0, r.get("shared_bytes") or 0
        if prev is not None:
            regs, shared = max(regs, prev.registers), max(shared, prev.shared_bytes)
        valid = r["valid"] and (prev is None or prev.valid)
        reason = r["reason"] if not r["valid"] else (prev.reason if prev is not None else "ok")
        out[r["function"]] = Resources(regs, shared, valid, reason)
    return out


def compiled_resources(target: Target, kernel: str, config: KernelConfig, dtype: str,
                       cache_dir: str | Path | None = None) -> dict[str, Resources]:
    """Cross-compile `config` for the target's arch (cached on disk by compile_report) and read its usage."""
    records = compile_report(target.arch, [kernel], dtype, configs=[config], cache_dir=cache_dir)
    return resources_from_records(records)


def blocks_per_sm(target: Target, resources: Resources, num_warps: int) -> tuple[int, str]:
    """Resident programs per SM and the limit that sets it."""
    limits = arch_limits(target.arch)
    by = {"warps": target.max_warps_per_sm // num_warps, "blocks": target.max_blocks_per_sm}
    block_regs = limits.block_registers(max(resources.registers, 1), num_warps)
    by["registers"] = target.registers_per_sm // block_regs
    if resources.shared_bytes:
        by["shared"] = target.shared_mem_per_sm // (resources.shared_bytes + SHARED_RESERVED_PER_BLOCK)
    limiter = min(by, key=lambda k: by[k])
    return by[limiter], limiter


def mma_efficiency(target: Target, tile: tuple[int, int], num_warps: int, element_bytes: int, dtype: str) -> float:
    """Fraction of tensor peak shared memory can feed (assumption 3)."""
    area = tile[0] * tile[1] / num_warps
    wm = min(float(tile[0]), max(16.0, math.sqrt(area)))
    wn = area / wm
    flops_per_element = 2 * wm * wn / (wm + wn)
    feed = SMEM_BYTES_PER_CLOCK / element_bytes * flops_per_element * target.clock_hz  # FLOP/s per SM
    return min(1.0, feed / (target.peak_flops[dtype] / target.sm_count))


def tensor_rate_factor(target: Target, launch: Launch, calibration: Calibration) -> float:
    """The calibrated share of the tensor peak a launch's tile can reach (before the shared-memory feed)."""
    factor = calibration.efficiency(target.arch)
    if launch.mma_tile and target.compute_capability == 90 and launch.mma_tile[0] < WGMMA_MIN_ROWS:
        factor *= calibration.small_m_efficiency
    return factor


def _wave_seconds(target: Target, launch: Launch, n: int, dtype: str, mma_eff: float,
                  calibration: Calibration = UNCALIBRATED) -> float:
    busy = min(target.sm_count, n)
    resident = math.ceil(n / busy)  # programs on the busiest SM
    warps = resident * launch.num_warps
    if launch.tensor_core:
        rate = target.peak_flops[dtype] * mma_eff * min(1.0, warps / calibration.tensor_warps_per_sm) \
            * tensor_rate_factor(target, launch, calibration)
    else:
        rate = target.peak_flops["fp32"]
    compute = resident * (launch.flops / launch.programs) / (rate / target.sm_count)  # SMs compute privately
    # DRAM is shared: the wave's bytes at the busy SMs' combined draw, and no SM faster than its own port
    sm_port = SM_LOAD_BYTES_PER_CLOCK * target.clock_hz
    bandwidth = min(target.memory_bandwidth, busy * sm_port)
    latency_hidden = min(1.0, resident * launch.inflight_bytes / (bandwidth / busy * calibration.memory_latency_s))
    memory = max(n * launch.bytes / launch.programs / bandwidth, resident * launch.bytes_per_program / sm_port)
    memory /= max(latency_hidden, 1e-9)
    return max(compute, memory) + (1.0 - calibration.overlap) * min(compute, memory)


def launch_seconds(target: Target, launch: Launch, resources: Resources, dtype: str,
                   calibration: Calibration = UNCALIBRATED) -> tuple[float, dict[str, Any]]:
    per_sm, limiter = blocks_per_sm(target, resources, launch.num_warps)
    if per_sm < 1:
        raise ValueError(f"{launch.function}: 0 blocks fit an SM ({limiter})")
    e = ELEMENT_BYTES[dtype]
    mma_eff = mma_efficiency(target, launch.mma_tile, launch.num_warps, e, dtype) if launch.mma_tile else 1.0
    slots = target.sm_count * per_sm
    full, tail = divmod(launch.programs, slots)
    seconds = full * _wave_seconds(target, launch, slots, dtype, mma_eff, calibration) if full else 0.0
    if tail:
        seconds += _wave_seconds(target, launch, tail, dtype, mma_eff, calibration)
    seconds += LAUNCH_OVERHEAD_S
    waves = full + (1 if tail else 0)
    detail = {"function": launch.function, "programs": launch.programs, "blocks_per_sm": per_sm,
              "occupancy_limit": limiter, "waves": waves, "last_wave_sms": min(target.sm_count, tail or slots),
              "mma_efficiency": round(mma_eff, 3), "us": round(seconds * 1e6, 3)}
    return seconds, detail


def estimate(target: Target, kernel: str, shape: dict, config: KernelConfig, dtype: str,
             resources: dict[str, Resources], calibration: Calibration = UNCALIBRATED) -> Estimate:
    """Modelled time of `config` for `shape`; invalid (seconds None) when any launched function is."""
    total, details = 0.0, []
    for launch in launches(kernel, shape, config, dtype):
        res = resources.get(launch.function)
        if res is None:
            return Estimate(None, f"no compile record for {launch.function}")
        if not res.valid:
            return Estimate(None, f"{launch.function}: {res.reason}")
        try:
            seconds, detail = launch_seconds(target, launch, res, dtype, calibration)
        except ValueError as exc:
            return Estimate(None, str(exc))
        total += seconds
        details.append(detail)
    return Estimate(total, "ok", tuple(details))


def lower_bound(target: Target, kernel: str, shape: dict, config: KernelConfig, dtype: str,
                calibration: Calibration = UNCALIBRATED) -> Estimate:
    """What no compile of `config` can beat: each launch's total FLOPs at the whole GPU's peak (scaled by the
    tile's shared-memory feed and the calibrated rate, which depend on the config alone) or its DRAM bytes at
    the full bandwidth, plus the launch overhead. Every wave in estimate() is at least its share of this, so
    the search may skip compiling a config whose bound is above the best time found."""
    total = 0.0
    e = ELEMENT_BYTES[dtype]
    for launch in launches(kernel, shape, config, dtype):
        if launch.tensor_core:
            eff = mma_efficiency(target, launch.mma_tile, launch.num_warps, e, dtype) if launch.mma_tile else 1.0
            rate = target.peak_flops[dtype] * eff * tensor_rate_factor(target, launch, calibration)
        else:
            rate = target.peak_flops["fp32"]
        total += max(launch.flops / rate, launch.bytes / target.memory_bandwidth) + LAUNCH_OVERHEAD_S
    return Estimate(total, "lower bound")


def modelled_seconds(target: Target, kernel: str, shape: dict, config: KernelConfig, dtype: str,
                     cache_dir: str | Path | None = None, calibration: Calibration = UNCALIBRATED) -> Estimate:
    """estimate() with the config compiled for the target's arch (compile_report's disk cache)."""
    return estimate(target, kernel, shape, config, dtype, compiled_resources(target, kernel, config, dtype, cache_dir),
                    calibration)
