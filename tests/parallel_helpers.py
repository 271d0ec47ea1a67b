"""Test-only drivers of the parallel machinery (moved out of the package, issue 17): a bare parallel artifact
(parts only: no sampling graph, no parity, as the tests of the rank runner need), greedy generation over its N
ranks, and greedy jobs on freshly spawned gloo ranks (eager or torch.export-ed rank modules)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from qwen3export.artifact import Artifact, load_artifact, new_manifest, seal, staging
from qwen3export.errors import InputError
from qwen3export.graphs.parallel import check_parallelism, layouts
from qwen3export.manifest import VariantFields
from qwen3export.parallel_artifact import BACKEND, PROGRAM_RECORD, ParallelEngine, parallel_record, write_parts
from qwen3export.ranks import spawn_ranks
from qwen3export.spec import ModelSpec
from qwen3export.targets import get_target
from qwen3export.weights import dtype_name


def write_parallel_artifact(out: str | Path, spec: ModelSpec, source: Any, tp: int, ep: int, *,
                            dtype: torch.dtype = torch.float32, model_ref: dict[str, Any] | None = None,
                            force: bool = False) -> Artifact:
    """Shard and write every rank's part (no sampling graph, no parity: parallel_build.build_parallel adds
    both); the degrees are checked before anything is written."""
    ranks = layouts(spec, tp, ep)  # one-line InputError for a bad degree, before any work
    with staging(Path(out), force) as tmp:
        entries = write_parts(tmp, spec, source, ranks, dtype)
        manifest = new_manifest({"spec": spec.to_dict(), "ref": model_ref or {}, "param_count": spec.param_count()},
                                get_target("cpu").to_dict(), BACKEND,
                                VariantFields(dtype=dtype_name(dtype), parallel=parallel_record(tp, ep)))
        manifest["ranks"] = entries
        manifest["engine"] = {"status": "built", "parts": len(ranks), "program": PROGRAM_RECORD,
                              "weights": "rank<r>/weights.safetensors", "runner": "tests.parallel_helpers"}
        seal(tmp, manifest)
    return load_artifact(out)


def run_parallel_artifact(path: str | Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,
                          threads: int | None = None) -> dict[str, torch.Tensor]:
    """Greedy generation on the artifact's N ranks -> {tokens [B, N], prefill [B, S, V], steps [B, N, V]}.
    Checksums are verified here, before a process starts."""
    from qwen3export.generation import greedy_generate

    artifact = load_artifact(path)
    with ParallelEngine(artifact, threads) as engine:
        tokens, prefill, logits = greedy_generate(engine, engine.empty_cache(input_ids.shape[0]), input_ids,
                                                  attention_mask, steps, keep_logits=True)
    return {"tokens": tokens, "prefill": prefill, "steps": torch.stack(logits, 1)}


def rank_step(spec, source: Any, layout, dtype: torch.dtype = torch.float32, exported: bool = False):
    """This rank's decoder as a generation step: (step callable, empty_cache function)."""
    from qwen3export.graph_capture import capture_rank
    from qwen3export.graphs.parallel import build_rank_module, shard_weights

    if callable(source) and not hasattr(source, "get"):
        source = source()  # e.g. functools.partial(SafetensorsSource, folder): opened in the rank process
    module = build_rank_module(spec, layout, shard_weights(spec, source, layout.rank, layout.tp, layout.ep, dtype), dtype)
    if exported:
        return capture_rank(module).module(), module.empty_cache
    return module, module.empty_cache


def greedy_jobs_worker(rank: int, jobs: list[dict[str, Any]], out_dir: str) -> None:
    """For each job {name, spec, source, tp, ep, exported, input_ids, attention_mask, steps}: build the
    rank's decoder, register the job's groups, greedy-generate; save {tokens, prefill, steps} to
    out_dir/<name>.rank<r>.pt (prefill/step logits on rank 0 only: every rank holds the same logits)."""
    from qwen3export.generation import greedy_generate
    from qwen3export.graphs.parallel import RankLayout, init_parallel_groups

    for job in jobs:
        layout = RankLayout(job["tp"], job["ep"], rank)
        init_parallel_groups(layout)
        step, empty_cache = rank_step(job["spec"], job["source"], layout, job.get("dtype", torch.float32),
                                      job.get("exported", False))
        ids = job["input_ids"]
        tokens, prefill, steps = greedy_generate(step, empty_cache(ids.shape[0]), ids, job["attention_mask"],
                                                 job["steps"], keep_logits=True)
        out: dict[str, Any] = {"tokens": tokens}
        if rank == 0:
            out.update(prefill=prefill, steps=torch.stack(steps, 1))
        torch.save(out, os.path.join(out_dir, f"{job['name']}.rank{rank}.pt"))


def run_greedy_jobs(world: int, jobs: list[dict[str, Any]], out_dir: str | Path) -> dict[str, list[dict]]:
    """Spawn `world` gloo ranks once, run every job on them, return {name: [rank 0 result, rank 1, …]}."""
    for j in jobs:  # every bad degree fails here, in the caller, before a process starts
        check_parallelism(j["spec"], j["tp"], j["ep"])
        if j["tp"] * j["ep"] != world:
            raise InputError(f"job {j['name']}: tp {j['tp']} x ep {j['ep']} is not {world} ranks; "
                             f"run it with {j['tp'] * j['ep']} processes")
    spawn_ranks(greedy_jobs_worker, world, jobs, str(out_dir))
    return {j["name"]: [torch.load(Path(out_dir) / f"{j['name']}.rank{r}.pt") for r in range(world)] for j in jobs}
