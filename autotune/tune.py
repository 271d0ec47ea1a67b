"""`qwen3export tune`: run the studies for a target's kernels over a model's shapes, then write the tables.

Stage "tune" of the pipeline: Target + ModelSpec shapes -> tables (autotune/tables.py). Modelled objective
(autotune/cost_model.py, with the kernel's fitted Calibration where autotune/configs/calibration.json has one)
unless a CUDA device of the target's compute capability is present (measured, autotune/measure.py). Studies live in `storage` (default: SQLite file in out_dir), so a killed tune
resumes where it stopped and `workers` local processes (or machines sharing a PostgreSQL URL) split them.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import multiprocessing
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import optuna
from sqlalchemy import event
from tqdm.auto import tqdm

from qwen3export.errors import InputError, TargetError
from qwen3export.kernels.config import KernelConfig
from qwen3export.spec import resolve_spec
from qwen3export.targets import Target, get_target, gpu_targets

from . import search
from .calibration import load_calibration
from .cost_model import UNCALIBRATED, Calibration, Resources, compiled_resources, estimate, lower_bound
from .measure import device_matches, measured_objective
from .plots import save_study_plots
from .public_tables import KERNEL, public_entries, read_public_tables
from .tables import (SHIPPED_DIR, choose_entry, config_params, parse_shape_key, read_table, shape_key, table_entry,
                     table_filename, user_dir, write_table)
from .workloads import WORKLOADS, kernels_for, workload

DEFAULT_TRIALS = 32
SHIPPED_MODELS = ("qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-235b-a22b")
TUNABLE_DTYPES = ("bf16", "fp16", "fp32")  # what the kernels compile for (kernels/compile.py DTYPES)
# (target, kernel, config, dtype) -> function -> Resources; the default cross-compiles (cost_model.py)
ResourcesFn = Callable[[Target, str, KernelConfig, str], "dict[str, Resources]"]


@dataclass(frozen=True)
class Task:
    """One table to tune: a kernel at one model shape, over its buckets."""

    kernel: str
    shape: dict
    buckets: tuple[dict, ...]
    models: tuple[str, ...]


def plan_tasks(kernel: str | None, models: list[str]) -> list[Task]:
    """Tables the models need, one per distinct (kernel, model shape). A kernel named that runs in none of the
    models is an error; models it does not run in (fused_moe in a dense model) are skipped."""
    if kernel is not None:
        workload(kernel)  # InputError naming the tunable kernels
    found: dict[tuple[str, str], Task] = {}
    specs = [resolve_spec(model) for model in models]
    if kernel is not None and not any(kernel in kernels_for(spec) for spec in specs):
        raise InputError(f"kernel {kernel!r} does not run in model {', '.join(s.name for s in specs)}; its kernels: "
                         f"{', '.join(kernels_for(specs[0]))}")
    for spec in specs:
        kernels = kernels_for(spec)
        for name in ([kernel] if kernel in kernels else []) if kernel else kernels:
            w = workload(name)
            shape = w.fixed(spec)
            key = (name, repr(sorted(shape.items())))
            prior = found.get(key)
            found[key] = Task(name, shape, w.buckets, (prior.models if prior else ()) + (spec.name,))
    return list(found.values())


MEMORY = ":memory:"  # storage for throwaway runs (shipped tables): fast, one process, nothing to resume


def storage_for(url: str) -> optuna.storages.BaseStorage:
    """An optuna storage for ':memory:', a SQLite or a server URL. RDB storages wait on SQLite's lock instead
    of failing at once, and heartbeat so a killed process's trials are failed (not left running) on resume."""
    if url == MEMORY:
        return optuna.storages.InMemoryStorage()
    url = _postgres_driver(url)
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {"pool_pre_ping": True}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeat_interval
        storage = optuna.storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=30, grace_period=60)
    if url.startswith("sqlite"):
        _serialize_sqlite(storage.engine)
    return storage


def _serialize_sqlite(engine) -> None:
    """Every SQLite transaction takes the write lock at BEGIN (SQLAlchemy's documented pysqlite recipe).

    optuna claims an enqueued (WAITING) trial with SELECT ... FOR UPDATE, which SQLite ignores: two workers
    both read WAITING, both run the trial, and the second tell fails with "Cannot tell a COMPLETE trial"
    (seen with two spawned workers on one study). BEGIN IMMEDIATE makes the read-then-claim atomic."""
    @event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None  # pysqlite emits no BEGIN of its own; SQLAlchemy's is below

    @event.listens_for(engine, "begin")
    def _begin(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened before the listeners (schema creation) are not reused


def _postgres_driver(url: str) -> str:
    """SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3; use psycopg2 (psycopg2-binary) when only it is here."""
    if url.startswith("postgresql://") and importlib.util.find_spec("psycopg") is None \
            and importlib.util.find_spec("psycopg2") is not None:
        return "postgresql+psycopg2://" + url.removeprefix("postgresql://")
    return url


def _modelled(target: Target, kernel: str, shape: dict, dtype: str, resources: ResourcesFn | None,
              cache_dir: Path | None, calibration: Calibration = UNCALIBRATED) -> search.Objective:
    def evaluate(config: KernelConfig) -> tuple[float | None, str]:
        res = (resources or (lambda t, k, c, d: compiled_resources(t, k, c, d, cache_dir)))(target, kernel, config,
                                                                                             dtype)
        est = estimate(target, kernel, shape, config, dtype, res, calibration)
        return est.microseconds, est.reason

    return evaluate


def study_source(source: str, kernel: str) -> str:
    """The source part of a study's name: a calibrated model's studies are kept apart from the uncalibrated
    ones (and from those of another fit) in a resumed storage, by a digest of the parameters."""
    calibration = load_calibration(kernel)
    if source != "modelled" or calibration == UNCALIBRATED:
        return source

    digest = hashlib.sha256(json.dumps(calibration.parameters, sort_keys=True).encode()).hexdigest()[:8]
    return f"modelled@{digest}"


def modelled_evidence(kernel: str) -> dict[str, Any] | None:
    """What a modelled entry of `kernel` was chosen by, when its model is calibrated (None: uncalibrated)."""
    calibration = load_calibration(kernel)
    if calibration == UNCALIBRATED:
        return None
    fit = dict(calibration.fit)
    return {"why": f"cost model calibrated on public measurements of the twin kernel ({', '.join(fit.get('train_devices', []))}); "
                   "no measurement of this shape on this GPU",
            "calibration": "autotune/configs/calibration.json", "train_devices": fit.get("train_devices", [])}


def _objective(target: Target, task: Task, bucket: dict, dtype: str, source: str, resources: ResourcesFn | None,
               cache_dir: Path | None) -> tuple[search.Objective, Callable[[KernelConfig], float | None] | None]:
    """(objective, lower bound or None). The modelled objective's bound (cost_model.lower_bound) lets the search
    skip compiling configs that cannot beat the study's best."""
    shape = task.shape | bucket
    if source == "measured":
        return measured_objective(target, task.kernel, shape, dtype), None
    calibration = load_calibration(task.kernel)
    bound = lambda config: lower_bound(target, task.kernel, shape, config, dtype, calibration).microseconds  # noqa: E731
    return _modelled(target, task.kernel, shape, dtype, resources, cache_dir, calibration), bound


def run_worker(index: int, target_name: str, tasks: list[Task], dtype: str, source: str,
               storage: str | optuna.storages.BaseStorage, trials: int, seed: int,
               resources: ResourcesFn | None = None, cache_dir: Path | None = None,
               on_trial: Callable | None = None, space_fraction: float = 0.0) -> int:
    """Run every study of `tasks` to `trials` finished trials (one process; several may run at once on one
    storage). Worker i starts at study i so parallel workers spread out. Returns trials run here."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    target = get_target(target_name)
    storage = storage_for(storage) if isinstance(storage, str) else storage
    studies = [(task, bucket) for task in tasks for bucket in task.buckets]
    ran = 0
    for task, bucket in studies[index % max(1, len(studies)):] + studies[:index % max(1, len(studies))]:
        key = search.StudyKey.make(target.name, task.kernel, dtype, task.shape, bucket, study_source(source, task.kernel))
        kernel_space = search.kept_space(task.kernel, target.arch)
        study = search.open_study(key, storage, seed=seed + index, space_size=len(kernel_space))
        evaluate, bound = _objective(target, task, bucket, dtype, source, resources, cache_dir)
        objective = search.trial_objective(task.kernel, kernel_space, evaluate, bound)
        ran += search.run_study(study, objective, search.study_budget(trials, len(kernel_space), space_fraction),
                                callbacks=[on_trial] if on_trial else [])
    return ran


def _worker_main(args: tuple) -> int:
    return run_worker(*args)


def _progress_bar(total: int, enabled: bool):
    if not enabled:
        return None

    return tqdm(total=total, unit="trial", desc="tune", dynamic_ncols=True)


def _write_tables(tgt: Target, dtype: str, source: str, studies: dict, out: Path) -> tuple[list[dict], list[str]]:
    """Each study's best config into its table (one file per kernel and model shape); the summary rows."""
    results, grouped = [], {}
    for key, (task, bucket, study) in studies.items():
        config, value, finished = search.best_config(study, task.kernel)
        entry = table_entry(config, source, value, finished,
                            modelled_evidence(task.kernel) if source == "modelled" else None)
        grouped.setdefault((task.kernel, shape_key(task.shape)), (task, {}))[1][shape_key(bucket)] = entry
        results.append({"kernel": task.kernel, "table": table_filename(tgt.name, task.kernel, dtype, task.shape),
                        "bucket": shape_key(bucket), "config": config.label, "params": config_params(config),
                        "objective_us": entry["objective_us"], "trials": finished, "source": source,
                        "study": key.name, "models": list(task.models)})
    tables = [str(write_table(out, tgt, task.kernel, dtype, task.shape, entries)) for task, entries in grouped.values()]
    return results, sorted(tables)


def tune(target: str, kernel: str | None = None, model: str | None = None, trials: int = DEFAULT_TRIALS,
         storage: str | None = None, workers: int = 1, out_dir: str | Path | None = None, progress: bool = True,
         dtype: str = "bf16", seed: int = 0, source: str | None = None, plots: bool = True,
         resources: ResourcesFn | None = None, cache_dir: str | Path | None = None,
         buckets: list[dict] | None = None, space_fraction: float = 0.0) -> dict[str, Any]:
    """Tune `target`'s kernels (one, or all the model runs) for `model` (preset or HF folder; default the four
    shipped Qwen3 shapes) and write one table per (kernel, model shape) under out_dir/<target>/.

    trials: finished trials per study (capped at the config space's size; a space that small is searched
    exhaustively); storage: optuna URL (default sqlite:///<out_dir>/tune.db); workers: local processes on that
    storage; source: "modelled" | "measured" (default: measured iff a GPU of the target's arch is present);
    buckets: tune only these buckets (e.g. [{"M": 16}]) instead of the kernel's defaults; space_fraction: run
    at least this fraction of each kernel's config space (big spaces get more trials than `trials`).
    Returns the summary: per kernel and bucket the best config, its objective (us), trials and source.
    """
    tgt = get_target(target)
    if tgt.kind != "gpu":
        raise TargetError(f"tune needs a GPU target (its kernels are Triton); {tgt.name} is a {tgt.kind}")
    tgt.check_dtype(dtype)
    if dtype not in TUNABLE_DTYPES:
        raise TargetError(f"the Triton kernels are not built for dtype {dtype}; tune one of {', '.join(TUNABLE_DTYPES)}")
    if trials < 1 or workers < 1:
        raise InputError(f"--trials ({trials}) and --workers ({workers}) must be at least 1")
    if storage == MEMORY and workers > 1:
        raise InputError(f"--storage {MEMORY} lives in one process; give a SQLite or PostgreSQL URL for --workers")

    source = source or ("measured" if device_matches(tgt) else "modelled")
    if source not in ("modelled", "measured"):
        raise InputError(f"source {source!r} must be 'modelled' or 'measured'")
    if source == "measured" and not device_matches(tgt):
        raise TargetError(f"measured tuning for {tgt.name} needs a CUDA GPU of compute capability {tgt.arch}; "
                          f"run it on one, or use the modelled objective")
    out = Path(out_dir) if out_dir is not None else user_dir()
    out.mkdir(parents=True, exist_ok=True)
    storage_url = storage or f"sqlite:///{(out / 'tune.db').resolve()}"
    tasks = plan_tasks(kernel, [model] if model else list(SHIPPED_MODELS))
    if buckets is not None:
        for task in tasks:
            wrong = [b for b in buckets if sorted(b) != sorted(workload(task.kernel).bucket_keys)]
            if wrong:
                raise InputError(f"{task.kernel} buckets are keyed by {workload(task.kernel).bucket_keys}, got {wrong}")
        tasks = [Task(t.kernel, t.shape, tuple(buckets), t.models) for t in tasks]
    cache = Path(cache_dir) if cache_dir is not None else None
    started = time.perf_counter()

    # studies are created (and seeded with DEFAULT_CONFIG / the whole small space) once, here
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rdb = storage_for(storage_url)
    studies = {}
    budget = 0
    for task in tasks:
        for bucket in task.buckets:
            key = search.StudyKey.make(tgt.name, task.kernel, dtype, task.shape, bucket, study_source(source, task.kernel))
            kernel_space = search.kept_space(task.kernel, tgt.arch)
            study = search.open_study(key, rdb, seed=seed, space_size=len(kernel_space))
            want = search.study_budget(trials, len(kernel_space), space_fraction)
            search.seed_study(study, task.kernel, kernel_space, want)
            budget += max(0, want - len(search.finished_trials(study)))
            studies[key] = (task, bucket, study)

    bar = _progress_bar(budget, progress)
    args = (tgt.name, tasks, dtype, source, storage_url, trials, seed, resources, cache, None, space_fraction)
    if workers == 1:
        run_worker(0, tgt.name, tasks, dtype, source, rdb, trials, seed, resources, cache,
                   on_trial=(lambda study, trial: bar.update(1)) if bar else None, space_fraction=space_fraction)
    else:
        ctx = multiprocessing.get_context("spawn")  # fresh interpreters: torch/triton state is not forked
        with ctx.Pool(workers) as pool:
            pending = pool.map_async(_worker_main, [(i, *args) for i in range(workers)])
            done_before = sum(len(search.finished_trials(s)) for _, _, s in studies.values())
            while not pending.ready():
                pending.wait(1.0)
                if bar:
                    done = sum(len(search.finished_trials(s)) for _, _, s in studies.values())
                    bar.update(min(budget, done - done_before) - bar.n)
            pending.get()
    if bar:
        bar.update(budget - bar.n)
        bar.close()

    results, tables = _write_tables(tgt, dtype, source, studies, out)
    pngs = []
    if plots:
        for key, (task, bucket, study) in studies.items():
            table = out / table_filename(tgt.name, task.kernel, dtype, task.shape)
            pngs += save_study_plots(study, table.with_name(table.name.removesuffix(".json") + f",{shape_key(bucket)}"))
    return {"target": tgt.name, "arch": tgt.arch, "dtype": dtype, "source": source, "storage": storage_url,
            "out_dir": str(out), "workers": workers, "trials_per_study": trials, "space_fraction": space_fraction,
            "studies": len(studies),
            "tables": tables, "plots": len(pngs), "seconds": round(time.perf_counter() - started, 1),
            "results": results}


SHIPPED_TRIALS = 24
SHIPPED_SPACE_FRACTION = 0.3  # benchmarks/autotune.py: 24 trials left fused_moe at M=4096 1.4x off its optimum
# fused_moe's shipped tables search its whole space (204 configs on sm_90): on an H200 (our kernel, Qwen3-235B-A22B
# experts, M=4096, bf16, GPU time) the 30 % search's pick took 5.04 ms, the calibrated model's optimum 3.38 ms
SHIPPED_SPACE_FRACTIONS = {"fused_moe": 1.0}


def regenerate_shipped(targets: list[str] | None = None, dtypes: tuple[str, ...] = ("bf16",),
                       trials: int = SHIPPED_TRIALS, progress: bool = False, kernels: list[str] | None = None,
                       public_dir: str | Path | None = None) -> list[dict[str, Any]]:
    """Rebuild the shipped tables autotune/tables/<target>/*dtype=<dtype>.json for the four Qwen3 shapes (all
    kernels, or `kernels`): modelled, in-memory studies (nothing to resume), no plots. Then per bucket the best
    evidence (tables.choose_entry): an entry of ours measured on the GPU kept from the old table, else vLLM's
    measured best for the twin kernel at this shape on this GPU (public_dir: vLLM's fused_moe configs folder;
    without it the replaced table's measured-public entries are kept), else the model's. Run as
    `python -m qwen3export.autotune.tune [--dtype=fp16] [--kernel=fused_moe] [--public=DIR] [target ...]`; each
    kernel searches SHIPPED_SPACE_FRACTIONS of its space (default SHIPPED_SPACE_FRACTION)."""
    summaries = []
    for dtype in dtypes:
        for name in targets or [t.name for t in gpu_targets()]:
            with tempfile.TemporaryDirectory() as fresh:  # the old tables stay until the new ones exist
                parts = [tune(name, kernel=k, trials=trials, storage=MEMORY, out_dir=fresh, progress=progress,
                              dtype=dtype, source="modelled", plots=False,
                              space_fraction=SHIPPED_SPACE_FRACTIONS.get(k, SHIPPED_SPACE_FRACTION))
                         for k in (kernels or list(WORKLOADS))]
                summary = parts[0] | {"tables": sorted(t for p in parts for t in p["tables"]),
                                      "studies": sum(p["studies"] for p in parts)}
                summary["evidence"] = _best_evidence(get_target(name), dtype, Path(fresh) / name, SHIPPED_DIR / name,
                                                     public_dir)
                for kernel in kernels or list(WORKLOADS):
                    for old in (SHIPPED_DIR / name).glob(f"{kernel},*,dtype={dtype}.json"):
                        old.unlink()
                (SHIPPED_DIR / name).mkdir(parents=True, exist_ok=True)
                for new in (Path(fresh) / name).glob("*.json"):
                    shutil.move(new, SHIPPED_DIR / name / new.name)
            summary["out_dir"], summary["tables"] = str(SHIPPED_DIR), [str(SHIPPED_DIR / name / Path(t).name)
                                                                       for t in summary["tables"]]
            summaries.append({k: v for k, v in summary.items() if k != "results"})
            print(json.dumps(summaries[-1]), flush=True)
    return summaries


def _best_evidence(target: Target, dtype: str, fresh: Path, shipped: Path, public_dir: str | Path | None
                   ) -> dict[str, dict[str, Any]]:
    """Overlay the freshly modelled tables in `fresh` with better evidence, bucket by bucket: our measured
    entries from the shipped table being replaced, then vLLM's public measurements (fused_moe). Returns per
    table the source of each bucket and the public importer's notes."""
    tables = read_public_tables(public_dir) if public_dir is not None else []

    def usable(config: KernelConfig) -> str | None:
        bad = [f"{f}: {r.reason}" for f, r in compiled_resources(target, KERNEL, config, dtype).items() if not r.valid]
        return "; ".join(bad) or None

    report = {}
    for path in sorted(fresh.glob("*.json")):
        table = read_table(path)
        old = read_table(shipped / path.name)["entries"] if (shipped / path.name).is_file() else {}
        public, notes = ({}, [])
        if table["kernel"] == KERNEL and tables:
            buckets = tuple(parse_shape_key(k) for k in sorted(table["entries"]))
            public, notes = public_entries(tables, target, dtype, table["shape"], buckets, usable)
        def kept(key: str, source: str) -> dict[str, Any] | None:
            return old[key] if (old.get(key) or {}).get("source") == source else None

        # without the public folder, the replaced table's measured-public entries stay (with their source)
        chosen = {key: choose_entry({"measured": kept(key, "measured"), "modelled": entry,
                                     "measured-public": public.get(key) if tables else kept(key, "measured-public")})
                  for key, entry in table["entries"].items()}
        write_table(fresh.parent, target, table["kernel"], dtype, table["shape"], chosen)
        report[path.name] = {"sources": {k: e["source"] for k, e in sorted(chosen.items())}} | (
            {"public_notes": notes} if notes else {})
    return report


if __name__ == "__main__":
    import sys

    def _options(name: str) -> list[str]:
        return [a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith(f"--{name}=")]

    regenerate_shipped([a for a in sys.argv[1:] if not a.startswith("--")] or None,
                       dtypes=tuple(_options("dtype")) or ("bf16",), kernels=_options("kernel") or None,
                       public_dir=(_options("public") or [None])[0])
