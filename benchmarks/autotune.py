"""Autotune benchmark: how many trials the seeded search needs to reach the exhaustive optimum of the modelled
objective, per target and kernel, its wall time, how fast this machine cross-compiles configs per arch, and
how the cost model ranks public measurements (vLLM's fused_moe tables) before and after calibration.

Prints one JSON object. Every time from the cost model is labelled "modelled" (keys end in _modelled): no
kernel runs here. The exhaustive optimum needs every config of the kernel's kept space compiled for the
arch (cached on disk by kernels/compile.py, so a second run is fast).

Calibration ("calibration"): per public table and token bucket, the percentile of vLLM's measured best (mapped
onto our space) in our modelled ranking of the whole kept space (0 = our pick; ties count half) and whether our
model's best has vLLM's BLOCK_M; uncalibrated ("before"), fitted on --train-devices and scored on the
held-out devices ("after"), and the shipped calibration (autotune/configs/calibration.json, fitted on every
device: in-sample). Then the shipped tables that import public measurements, bucket by bucket.

    python benchmarks/autotune.py [--targets a100,h100] [--kernels fused_moe,attention_decode] [--seeds 3]
                                  [--compile-sample 6] [--compile-arch sm_90]
                                  [--public-tables ../shared/reference/vllm-fused-moe] [--sections calibration]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import optuna
import torch
import triton

from qwen3export import __version__
from qwen3export.autotune import calibration, search
from qwen3export.autotune.cost_model import estimate, lower_bound, resources_from_records
from qwen3export.autotune.tune import DEFAULT_TRIALS
from qwen3export.autotune.workloads import workload
from qwen3export.kernels.compile import compile_report, kernel_module
from qwen3export.spec import preset
from qwen3export.targets import get_target

optuna.logging.set_verbosity(optuna.logging.WARNING)
GAP_AT = (24, 32)  # the shipped tables' trials and tune's default
MODEL_FOR = {"fused_moe": "qwen3-30b-a3b", "moe_routing": "qwen3-30b-a3b", "moe_align": "qwen3-30b-a3b"}


def machine() -> dict:
    return {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "triton": triton.__version__, "optuna": optuna.__version__,
            "qwen3export": __version__, "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def space_resources(target, kernel: str, dtype: str, workers: int) -> dict:
    """label -> function -> Resources for the whole kept space (one compile_report over it, cached)."""
    records = compile_report(target.arch, [kernel], dtype, configs="space", workers=workers)
    by_label: dict = {}
    for r in records:
        by_label.setdefault(r["config"], []).append(r)
    return {label: resources_from_records(rs) for label, rs in by_label.items()}


def search_figures(target_name: str, kernel: str, dtype: str, seeds: int, workers: int) -> list[dict]:
    target = get_target(target_name)
    space = search.kept_space(kernel, target.arch)
    resources = space_resources(target, kernel, dtype, workers)
    w = workload(kernel)
    shape_fixed = w.fixed(preset(MODEL_FOR.get(kernel, "qwen3-8b")))
    default = kernel_module(kernel).DEFAULT_CONFIG
    rows = []
    for bucket in (w.buckets[0], w.buckets[len(w.buckets) // 2], w.buckets[-1]):
        shape = shape_fixed | bucket

        def evaluate(config):
            est = estimate(target, kernel, shape, config, dtype, resources[config.label])
            return est.microseconds, est.reason

        _, optimum = search.exhaustive_optimum(space, evaluate)
        reached, walls, gaps = [], [], {n: [] for n in GAP_AT}
        for seed in range(seeds):
            # tune's policy: a space within its default budget is enumerated (default first), else seeded TPE;
            # the budget here is the whole space, to see when the optimum is reached
            study = optuna.create_study(sampler=search.make_sampler(seed, len(space)))
            search.seed_study(study, kernel, space, DEFAULT_TRIALS)
            started = time.perf_counter()
            search.run_study(study, search.trial_objective(
                kernel, space, evaluate, lambda c: lower_bound(target, kernel, shape, c, dtype).microseconds),
                len(space))
            walls.append(time.perf_counter() - started)
            reached.append(search.trials_to_reach(study, optimum))
            ordered = sorted(search.finished_trials(study), key=lambda t: t.number)
            for n in GAP_AT:
                values = [t.value for t in ordered[:n] if t.state == optuna.trial.TrialState.COMPLETE]
                gaps[n].append(round(min(values) / optimum, 4) if values else None)
        default_us = evaluate(default)[0] if default in space else None
        found = [r for r in reached if r is not None]
        rows.append({"target": target_name, "kernel": kernel, "dtype": dtype, "shape": shape,
                     "space_size": len(space), "trials_to_optimum": reached,
                     "median_trials_to_optimum": statistics.median(found) if found else None,
                     "fraction_of_space": round(statistics.median(found) / len(space), 3) if found else None,
                     **{f"best_over_optimum_after_{n}_trials_modelled": gaps[n] for n in GAP_AT},
                     "optimum_us_modelled": round(optimum, 3),
                     "default_us_modelled": None if default_us is None else round(default_us, 3),
                     "default_over_optimum_modelled": None if default_us is None else round(default_us / optimum, 3),
                     "search_wall_s": round(statistics.median(walls), 3)})
    return rows


def compile_throughput(arch: str, kernels: list[str], dtype: str, sample: int) -> list[dict]:
    """Configs compiled per minute on this machine: fresh qwen3export AND Triton caches (Triton caches
    compiled kernels under TRITON_CACHE_DIR), in-process, one worker."""
    rows = []
    for kernel in kernels:
        configs = list(search.kept_space(kernel, arch))[:: max(1, len(search.kept_space(kernel, arch)) // sample)][:sample]
        with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as triton_cache:
            saved = os.environ.get("TRITON_CACHE_DIR")
            os.environ["TRITON_CACHE_DIR"] = triton_cache
            try:
                started = time.perf_counter()
                records = compile_report(arch, [kernel], dtype, configs=configs, cache_dir=cache)
                seconds = time.perf_counter() - started
            finally:
                if saved is None:
                    os.environ.pop("TRITON_CACHE_DIR")
                else:
                    os.environ["TRITON_CACHE_DIR"] = saved
        rows.append({"arch": arch, "kernel": kernel, "configs": len(configs), "compiles": len(records),
                     "seconds": round(seconds, 1), "configs_per_minute": round(60 * len(configs) / seconds, 1),
                     "valid": sum(r["valid"] for r in records)})
    return rows


PUBLIC_TABLES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "reference", "vllm-fused-moe")
HOLDOUT_TRAIN = ("a100", "a100-pcie-40gb", "a100-pcie-80gb", "h100")  # the A100s and the H100 SXM; the rest held out


def calibration_figures(folder: str, train_devices: tuple[str, ...], trials: int, seed: int) -> dict:
    """Before / after (held-out fit) / shipped calibration figures per device and bucket, and the shipped tables'
    agreement with the public tables they import."""
    from qwen3export.autotune.public_tables import KERNEL, read_public_tables

    tables = read_public_tables(folder)
    samples, skipped = calibration.make_samples(tables)
    train, held_out = calibration.split(samples, train_devices)
    started = time.perf_counter()
    ranking = calibration.Ranking(samples, calibration.compiled_space_resources())
    prepare_s = time.perf_counter() - started
    started = time.perf_counter()
    fitted = calibration.fit(ranking, train, trials=trials, seed=seed)
    fit_s = time.perf_counter() - started
    shipped = calibration.load_calibration(KERNEL)
    runs = {"before": calibration.UNCALIBRATED, "after": fitted, "shipped": shipped}
    rows = {name: calibration.evaluate(ranking, cal) for name, cal in runs.items()}
    keep = ("percentile", "block_m_model", "block_m_agrees", "model_best")
    per_bucket = [{k: v for k, v in row.items() if k not in keep + ("block_m_vllm",)}
                  | {"block_m_vllm": row["block_m_vllm"]}
                  | {name: {k: rows[name][i][k] for k in keep} for name in runs}
                  for i, row in enumerate(rows["before"])]
    held = [i for i, s in enumerate(samples) if s.device not in train_devices]
    trained = [i for i, s in enumerate(samples) if s.device in train_devices]
    summary = {name: {"train": calibration.summarize([rows[name][i] for i in trained]),
                      "held_out": calibration.summarize([rows[name][i] for i in held])} for name in ("before", "after")}
    summary["shipped"] = {"all_in_sample": calibration.summarize(rows["shipped"])}
    after = summary["after"]["held_out"]
    return {"public_tables": os.path.abspath(folder), "tables_read": len(tables), "skipped": skipped,
            "samples": len(samples), "train_devices": sorted({s.device for s in train}),
            "held_out_devices": sorted({s.device for s in held_out}), "fit_trials": trials, "seed": seed,
            "prepare_s": round(prepare_s, 1), "fit_s": round(fit_s, 1),
            "targets": {"held_out_median_percentile_after": after["median_percentile"],
                        "median_percentile_at_most_10": after["median_percentile"] <= 10,
                        "held_out_block_m_agreement_after": after["block_m_agreement"],
                        "block_m_agreement_at_least_0.7": after["block_m_agreement"] >= 0.7},
            "summary": summary, "fitted": fitted.to_dict(), "shipped_calibration": shipped.to_dict(),
            "shipped_tables": shipped_table_agreement(tables, rows["shipped"], samples), "per_bucket": per_bucket}


def shipped_table_agreement(tables, shipped_rows: list[dict], samples) -> list[dict]:
    """For every shipped fused_moe table a public table measured (same GPU, E, N = I, unquantized): per bucket
    our BLOCK_M and source against vLLM's, and what the shipped calibrated model alone would pick."""
    from qwen3export.autotune.public_tables import DEVICE_TARGETS, is_twin_shape
    from qwen3export.autotune.tables import SHIPPED_DIR, read_table

    out = []
    for path in sorted(SHIPPED_DIR.glob("*/fused_moe,*.json")):
        table = read_table(path)
        twins = [t for t in tables if DEVICE_TARGETS.get(t.device_name) == table["target"]
                 and is_twin_shape(t, table["shape"], table["dtype"])]
        for twin in twins:
            model_pick = {r["M"]: r["block_m_model"] for r, s in zip(shipped_rows, samples) if s.table is twin}
            buckets = []
            for key, entry in sorted(table["entries"].items(), key=lambda kv: int(kv[0].split("=")[1])):
                m = int(key.split("=")[1])
                vllm = twin.entries.get(m, {}).get("BLOCK_SIZE_M")
                buckets.append({"bucket": key, "block_m": entry["BLOCK_M"], "source": entry["source"],
                                "vllm_block_m": vllm, "matches": entry["BLOCK_M"] == min(vllm or 0, 128),
                                "calibrated_model_block_m": model_pick.get(m)})
            out.append({"table": f"{path.parent.name}/{path.name}", "public": twin.file, "commit": twin.commit,
                        "matches": sum(b["matches"] for b in buckets), "buckets": len(buckets),
                        "model_alone_matches": sum(b["calibrated_model_block_m"] == [min(b["vllm_block_m"] or 0, 128)]
                                                   for b in buckets), "per_bucket": buckets})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="a100")
    parser.add_argument("--kernels", default="fused_moe,attention_decode,attention_prefill")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2, help="compile workers for the exhaustive spaces")
    parser.add_argument("--compile-arch", default="sm_90")
    parser.add_argument("--compile-kernels", default="rms_norm,fused_moe")
    parser.add_argument("--compile-sample", type=int, default=4)
    parser.add_argument("--public-tables", default=PUBLIC_TABLES, help="vLLM's fused_moe config folder")
    parser.add_argument("--train-devices", default=",".join(HOLDOUT_TRAIN))
    parser.add_argument("--fit-trials", type=int, default=calibration.FIT_TRIALS)
    parser.add_argument("--sections", default="search,compile,calibration")
    args = parser.parse_args(argv)
    sections = set(args.sections.split(","))
    started = time.perf_counter()
    rows = [row for t in args.targets.split(",") for k in args.kernels.split(",")
            for row in search_figures(t, k, args.dtype, args.seeds, args.workers)] if "search" in sections else []
    out = {"machine": machine(), "objective": "modelled (autotune/cost_model.py); no kernel was run",
           "search": rows,
           "compile_throughput": compile_throughput(args.compile_arch, args.compile_kernels.split(","), args.dtype,
                                                    args.compile_sample)
           if args.compile_sample and "compile" in sections else [],
           "calibration": calibration_figures(args.public_tables, tuple(args.train_devices.split(",")),
                                              args.fit_trials, seed=0)
           if "calibration" in sections else None,
           "wall_s": round(time.perf_counter() - started, 1)}
    json.dump(out, sys.stdout, indent=1)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
