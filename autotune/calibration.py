"""Calibration of the cost model (stage "tune") on public measurements: where vLLM's measured best fused_moe config
(autotune/public_tables.py) lands in our modelled ranking of the whole kept config space, and the free
parameters of autotune/cost_model.py (Calibration) fitted so that it lands near the top.

A sample is one (public table, token bucket M): the GPU's target spec, the shape (E, N = I, and the hidden size
and top-k assumed below), vLLM's config mapped onto our space. Its percentile is the share of our valid configs
the model ranks faster (ties count half): 0 = our model's own pick. The fit is optuna's seeded TPE over the
parameters, minimising a smooth percentile plus a BLOCK_M disagreement term, with whole devices held out.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna

from qwen3export.kernels.compile import compile_report
from qwen3export.kernels.config import KernelConfig
from qwen3export.targets import Target

from .cost_model import UNCALIBRATED, Calibration, Resources, estimate, launch_seconds, resources_from_records
from .public_tables import FP8, KERNEL, UNQUANTIZED, PublicTable, map_config, read_public_tables
from .search import kept_space
from .workloads import TOKEN_BUCKETS, Launch, launches

CALIBRATION_FILE = Path(__file__).parent / "configs" / "calibration.json"
BUCKETS = tuple(b["M"] for b in TOKEN_BUCKETS)  # our tables' buckets: M = 1 .. 4096 tokens
# vLLM's file names key E and N only; its tuner took the hidden size and top-k from the model it ran. Assumed:
# Qwen3-30B-A3B's (hidden 2048, top-8: N 768 at TP1 .. 96 at TP8), Qwen3-235B-A22B's for N 1536 (hidden
# 4096), gpt-oss-120b's for N 2880 (hidden 2880, top-4; its config.json). Others: the Qwen3-30B-A3B default.
ASSUMED_HIDDEN_TOPK = {1536: (4096, 8), 2880: (2880, 4)}
DEFAULT_HIDDEN_TOPK = (2048, 8)
# What the fit varies (log-uniform where the range spans a factor): wide enough to hold every figure quoted in
# cost_model.py's assumptions and the uncalibrated defaults.
EFFICIENCY_RANGE = (0.01, 1.0)
LATENCY_RANGE_S = (0.15e-6, 8e-6)
TENSOR_WARPS_RANGE = (4.0, 32.0)
SMALL_M_RANGE = (0.2, 1.0)
SOFTNESS = 0.05  # the smooth percentile's width: a 5 % time difference counts about half a rank
BLOCK_M_WEIGHT = 1.0  # the BLOCK_M term's weight next to the smooth percentile (both in 0..1)
FIT_TRIALS = 100
# (target, kernel, config, dtype) -> function -> Resources, as tune.ResourcesFn
ResourcesFn = Callable[[Target, str, KernelConfig, str], "dict[str, Resources]"]


@dataclass(frozen=True)
class Sample:
    """vLLM's measured best at one token bucket of one public table, mapped onto our config space."""

    table: PublicTable
    target: Target
    dtype: str  # the model's dtype: bf16 (vLLM's unquantized tables) or fp8 (fp8_w8a8)
    shape: dict[str, int]  # E, H, I, K, M
    m_key: int  # vLLM's M entry used (nearest to M)
    vllm: dict[str, int]
    mapped: KernelConfig
    notes: tuple[str, ...]

    @property
    def device(self) -> str:
        return self.target.name


def model_dtype(table: PublicTable, target: Target) -> str | None:
    """The dtype our model times a table's configs in, or None where we do not model it (int8/int4 weights, fp8
    on a GPU without fp8 tensor cores)."""
    if table.quant == UNQUANTIZED and table.block_shape is None:
        return "bf16"
    if table.quant == FP8 and "fp8" in target.peak_flops:
        return "fp8"
    return None


def make_samples(tables: list[PublicTable], buckets: tuple[int, ...] = BUCKETS
                 ) -> tuple[list[Sample], list[dict[str, str]]]:
    """(samples, skipped tables with the reason) for every table we can model, one sample per bucket."""
    samples, skipped = [], []
    for table in tables:
        target = table.target
        if target is None:
            skipped.append({"file": table.file, "why": f"no target spec for {table.device_name}"})
            continue
        dtype = model_dtype(table, target)
        if dtype is None:
            skipped.append({"file": table.file, "why": f"{table.quant} weights are not modelled"})
            continue
        hidden, top_k = ASSUMED_HIDDEN_TOPK.get(table.n, DEFAULT_HIDDEN_TOPK)
        space = kept_space(KERNEL, target.arch)
        for m in buckets:
            m_key, vllm = table.nearest(m)
            mapped, notes = map_config(vllm, space)
            samples.append(Sample(table, target, dtype, {"E": table.experts, "H": hidden, "I": table.n, "K": top_k,
                                                         "M": m}, m_key, vllm, mapped, tuple(notes)))
    return samples, skipped


def compiled_space_resources(cache_dir: str | Path | None = None, workers: int = 1) -> ResourcesFn:
    """Resources of every kept config from kernels/compile.py's cross-compile (disk-cached, bf16). fp8 twins
    reuse the bf16 compile with half the shared memory: their staged operand tiles are 1-byte (an
    approximation; the fp32 accumulators that set the registers are the same)."""
    by_arch: dict[str, dict[str, dict[str, Resources]]] = {}

    def resources(target: Target, kernel: str, config: KernelConfig, dtype: str) -> dict[str, Resources]:
        if target.arch not in by_arch:
            records = compile_report(target.arch, [kernel], "bf16", configs="space", cache_dir=cache_dir,
                                     workers=workers)
            grouped: dict[str, list] = {}
            for r in records:
                grouped.setdefault(r["config"], []).append(r)
            by_arch[target.arch] = {label: resources_from_records(rs) for label, rs in grouped.items()}
        found = by_arch[target.arch][config.label]
        if dtype == "fp8":
            return {f: Resources(r.registers, r.shared_bytes // 2, r.valid, r.reason) for f, r in found.items()}
        return found

    return resources


class Ranking:
    """Modelled times of a sample's whole kept space under a calibration. What no parameter changes (the
    launches, the compiled resources, validity) is worked out once; a calibration only re-times the launches."""

    def __init__(self, samples: list[Sample], resources: ResourcesFn):
        self.samples = samples
        self.prepared: dict[int, list[tuple[KernelConfig, list[tuple[Launch, Resources]]]]] = {}
        found: dict[tuple[str, str, str], dict[str, Resources]] = {}
        for s in samples:
            rows = []
            for config in kept_space(KERNEL, s.target.arch):
                key = (s.target.name, s.dtype, config.label)
                if key not in found:
                    found[key] = resources(s.target, KERNEL, config, s.dtype)
                if estimate(s.target, KERNEL, s.shape, config, s.dtype, found[key]).valid:
                    rows.append((config, [(launch, found[key][launch.function])
                                          for launch in launches(KERNEL, s.shape, config, s.dtype)]))
            self.prepared[id(s)] = rows

    def times(self, sample: Sample, calibration: Calibration) -> list[tuple[KernelConfig, float]]:
        """(config, modelled us) for every valid config of the sample's kept space, in space order."""
        return [(config, 1e6 * sum(launch_seconds(sample.target, launch, res, sample.dtype, calibration)[0]
                                   for launch, res in prepared))
                for config, prepared in self.prepared[id(sample)]]


def percentile(times: list[tuple[KernelConfig, float]], config: KernelConfig, rel: float = 1e-9) -> float | None:
    """Share (%) of the valid configs modelled faster than `config`, ties counted half; None if it is invalid."""
    mine = next((t for c, t in times if c == config), None)
    if mine is None:
        return None
    faster = sum(t < mine * (1 - rel) for _, t in times)
    tied = sum(abs(t - mine) <= mine * rel for c, t in times if c != config)
    return 100.0 * (faster + 0.5 * tied) / len(times)


def best_block_m(times: list[tuple[KernelConfig, float]], rel: float = 1e-9) -> list[int]:
    """The BLOCK_M values of the configs tied for the model's best (more than one: the model cannot tell them
    apart, and the search keeps whichever it met first)."""
    best = min(t for _, t in times)
    return sorted({c["BLOCK_M"] for c, t in times if t <= best * (1 + rel)})


def rank_row(sample: Sample, times: list[tuple[KernelConfig, float]]) -> dict[str, Any]:
    """One sample's figures: the percentile of vLLM's (mapped) best and whether the model's best has its BLOCK_M
    (only if every config tied for the best has it: a tie with another BLOCK_M does not count as agreement)."""
    best = min(times, key=lambda ct: ct[1])[0]
    block_ms = best_block_m(times)
    pct = percentile(times, sample.mapped)
    return {"device": sample.device, "file": sample.table.file, "dtype": sample.dtype, "N": sample.shape["I"],
            "M": sample.shape["M"], "vllm_M": sample.m_key, "vllm_config": sample.mapped.label,
            "mapping": list(sample.notes), "percentile": None if pct is None else round(pct, 1),
            "vllm_valid": pct is not None, "block_m_vllm": sample.mapped["BLOCK_M"], "block_m_model": block_ms,
            "block_m_agrees": block_ms == [sample.mapped["BLOCK_M"]], "model_best": best.label,
            "valid_configs": len(times)}


def evaluate(ranking: Ranking, calibration: Calibration, samples: list[Sample] | None = None) -> list[dict[str, Any]]:
    return [rank_row(s, ranking.times(s, calibration)) for s in (samples if samples is not None else ranking.samples)]


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Median percentile (an invalid vLLM config counts 100) and BLOCK_M agreement, overall and per device."""
    def figures(part: list[dict[str, Any]]) -> dict[str, Any]:
        pcts = [100.0 if r["percentile"] is None else r["percentile"] for r in part]
        return {"samples": len(part), "median_percentile": round(statistics.median(pcts), 1) if pcts else None,
                "top_decile": round(sum(p <= 10 for p in pcts) / len(pcts), 3) if pcts else None,
                "block_m_agreement": round(sum(r["block_m_agrees"] for r in part) / len(part), 3) if part else None}

    devices = sorted({r["device"] for r in rows})
    per_device = {d: figures([r for r in rows if r["device"] == d]) for d in devices}
    medians = [f["median_percentile"] for f in per_device.values()]
    # the pooled median weighs each device by its samples (vLLM measured the H200 at 14 shapes, the L4 at 1)
    return figures(rows) | {"median_of_device_medians": round(statistics.median(medians), 1) if medians else None,
                            "devices": per_device}


def _soft_loss(sample: Sample, times: list[tuple[KernelConfig, float]]) -> float:
    """Smooth percentile of vLLM's config (1 if our model finds it invalid) + BLOCK_M_WEIGHT x how clearly
    another BLOCK_M beats vLLM's; both in 0..1."""
    mine = next((t for c, t in times if c == sample.mapped), None)
    if mine is None:
        return 1.0 + BLOCK_M_WEIGHT
    def sigmoid(x: float) -> float:
        return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))
    log_mine = math.log(mine)
    soft = sum(sigmoid((log_mine - math.log(t)) / SOFTNESS) for _, t in times) / len(times)
    bm = sample.mapped["BLOCK_M"]
    same = min(t for c, t in times if c["BLOCK_M"] == bm)
    other = min((t for c, t in times if c["BLOCK_M"] != bm), default=None)
    disagree = 0.0 if other is None else sigmoid((math.log(same) - math.log(other)) / SOFTNESS)
    return soft + BLOCK_M_WEIGHT * disagree


def loss(ranking: Ranking, calibration: Calibration, samples: list[Sample]) -> float:
    return sum(_soft_loss(s, ranking.times(s, calibration)) for s in samples) / len(samples)


def fit(ranking: Ranking, train: list[Sample], trials: int = FIT_TRIALS, seed: int = 0) -> Calibration:
    """Fit the Calibration on `train` samples: per-arch efficiency for the archs they cover (others take the
    geometric mean), overlap, memory latency, tensor warps, and Hopper's small-M efficiency if sm_90 is in
    them. Seeded TPE, the uncalibrated model as its first trial, so the fit never scores worse on `train`."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    archs = sorted({s.target.arch for s in train})
    hopper = "sm_90" in archs

    def calibration_of(params: dict[str, float], extra: dict[str, Any] | None = None) -> Calibration:
        eff = {a: params[f"efficiency_{a}"] for a in archs}
        mean = math.exp(sum(math.log(v) for v in eff.values()) / len(eff))
        return Calibration(compute_efficiency=tuple(sorted(eff.items())), default_efficiency=round(mean, 4),
                           overlap=params["overlap"], memory_latency_s=params["memory_latency_s"],
                           tensor_warps_per_sm=params["tensor_warps_per_sm"],
                           small_m_efficiency=params.get("small_m_efficiency", 1.0),
                           fit=tuple(sorted((extra or {}).items())))

    def objective(trial: optuna.Trial) -> float:
        params = {f"efficiency_{a}": trial.suggest_float(f"efficiency_{a}", *EFFICIENCY_RANGE, log=True)
                  for a in archs}
        params["overlap"] = trial.suggest_float("overlap", 0.0, 1.0)
        params["memory_latency_s"] = trial.suggest_float("memory_latency_s", *LATENCY_RANGE_S, log=True)
        params["tensor_warps_per_sm"] = trial.suggest_float("tensor_warps_per_sm", *TENSOR_WARPS_RANGE, log=True)
        if hopper:
            params["small_m_efficiency"] = trial.suggest_float("small_m_efficiency", *SMALL_M_RANGE)
        return loss(ranking, calibration_of(params), train)

    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(
        seed=seed, multivariate=True, n_startup_trials=min(20, trials // 4)))
    start = {f"efficiency_{a}": UNCALIBRATED.default_efficiency for a in archs} | {
        "overlap": UNCALIBRATED.overlap, "memory_latency_s": UNCALIBRATED.memory_latency_s,
        "tensor_warps_per_sm": UNCALIBRATED.tensor_warps_per_sm}
    study.enqueue_trial(start | ({"small_m_efficiency": UNCALIBRATED.small_m_efficiency} if hopper else {}))
    study.optimize(objective, n_trials=trials)
    best = study.best_trial
    devices = sorted({s.device for s in train})
    return calibration_of({k: round(v, 4) if k != "memory_latency_s" else float(f"{v:.4g}")
                           for k, v in best.params.items()},
                          {"kernel": KERNEL, "train_devices": devices, "train_samples": len(train), "trials": trials,
                           "seed": seed, "loss": round(best.value, 4), "loss_uncalibrated": round(study.trials[0].value, 4)})


def load_calibration(kernel: str, path: Path = CALIBRATION_FILE) -> Calibration:
    """The fitted Calibration for `kernel` from the shipped file; UNCALIBRATED for a kernel it has none for."""
    if not Path(path).is_file():
        return UNCALIBRATED
    data = json.loads(Path(path).read_text())
    return Calibration.from_dict(data[kernel]) if kernel in data else UNCALIBRATED


def save_calibration(kernel: str, calibration: Calibration, path: Path = CALIBRATION_FILE) -> Path:
    data = json.loads(Path(path).read_text()) if Path(path).is_file() else {}
    data[kernel] = calibration.to_dict()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    return Path(path)


def split(samples: list[Sample], train_devices: tuple[str, ...] | list[str]) -> tuple[list[Sample], list[Sample]]:
    """(train, held out): whole devices go one way or the other."""
    return [s for s in samples if s.device in train_devices], [s for s in samples if s.device not in train_devices]


def fit_shipped(folder: str | Path, trials: int = FIT_TRIALS, seed: int = 0, path: Path = CALIBRATION_FILE,
                resources: ResourcesFn | None = None) -> Calibration:
    """Fit fused_moe's Calibration on every public table we can model (the held-out figures of the same
    procedure are in benchmarks/autotune.py) and write it where the tune stage reads it."""
    samples, _ = make_samples(read_public_tables(folder))
    ranking = Ranking(samples, resources or compiled_space_resources())
    calibration = fit(ranking, samples, trials=trials, seed=seed)
    save_calibration(KERNEL, calibration, path)
    return calibration


if __name__ == "__main__":  # python -m qwen3export.autotune.calibration DIR  (vLLM's fused_moe configs folder)
    import sys

    print(json.dumps(fit_shipped(sys.argv[1]).to_dict(), indent=1, sort_keys=True))
