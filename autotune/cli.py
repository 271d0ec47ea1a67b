"""`qwen3export tune`: the command-line face of autotune/tune.py (registered by qwen3export/cli.py)."""

from __future__ import annotations

import argparse
import json
from typing import Any, Callable


def add_tune_parser(add: Callable[..., argparse.ArgumentParser]) -> argparse.ArgumentParser:
    """Register `tune` with the CLI's `add(name, help, fn)` (which adds --json and --debug)."""
    from .tune import DEFAULT_TRIALS  # lazy: tune imports optuna and Triton; `qwen3export --help` must not

    t = add("tune", "tune the Triton kernels' configs for a GPU target with optuna; write tuned tables", cmd_tune)
    t.add_argument("--target", required=True, help="GPU target name (see `qwen3export targets`)")
    t.add_argument("--kernel", help="one kernel (default: every kernel the model runs)")
    t.add_argument("--model", help="Hugging Face Qwen3 folder or preset whose shapes to tune (default: the shipped "
                                   "shapes of qwen3-0.6b, qwen3-8b, qwen3-30b-a3b, qwen3-235b-a22b)")
    t.add_argument("--trials", type=int, default=DEFAULT_TRIALS,
                   help=f"finished trials per study, capped at the config space (default {DEFAULT_TRIALS})")
    t.add_argument("--storage", help="optuna storage URL (default sqlite:///<out>/tune.db; resumable; "
                                     "postgresql://... lets workers on several machines share the studies)")
    t.add_argument("--workers", type=int, default=1, help="local worker processes on the storage (default 1)")
    t.add_argument("--dtype", default="bf16", help="fp16 | bf16 (default bf16)")
    t.add_argument("--out", help="tables folder (default $QWEN3EXPORT_TABLES or ~/.cache/qwen3export/tables; "
                                 "build looks there before the shipped tables)")
    t.add_argument("--source", choices=("modelled", "measured"),
                   help="objective: measured on a CUDA GPU of the target's arch, else modelled (default: measured "
                        "iff such a GPU is present)")
    t.add_argument("--seed", type=int, default=0, help="sampler seed (default 0)")
    t.add_argument("--no-plots", action="store_true", help="skip the optimisation-history/importance PNGs")
    return t


def cmd_tune(args: argparse.Namespace) -> int:
    from .tune import tune  # lazy: as above (optuna, Triton)

    summary = tune(args.target, kernel=args.kernel, model=args.model, trials=args.trials, storage=args.storage,
                   workers=args.workers, out_dir=args.out, progress=not args.json, dtype=args.dtype, seed=args.seed,
                   source=args.source, plots=not args.no_plots)
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        print(text_summary(summary))
    return 0


def text_summary(summary: dict[str, Any]) -> str:
    lines = [f"tuned {summary['studies']} studies for {summary['target']} ({summary['arch']}, {summary['dtype']}) in "
             f"{summary['seconds']} s; objective {summary['source']}"
             + (" (a cost model of the target, not a measurement)" if summary["source"] == "modelled" else ""),
             f"  storage {summary['storage']}", f"  tables in {summary['out_dir']}:"]
    lines += [f"    {t}" for t in summary["tables"]]
    lines.append(f"  {'kernel':18s} {'bucket':16s} {'best config':48s} {'us':>10s} trials")
    for r in summary["results"]:
        lines.append(f"  {r['kernel']:18s} {r['bucket']:16s} {r['config']:48s} {r['objective_us']:>10.3f} "
                     f"{r['trials']:>6d}  {r['source']}")
    if summary.get("plots"):
        lines.append(f"  {summary['plots']} plots (optimisation history, parameter importance) beside the tables")
    return "\n".join(lines)
