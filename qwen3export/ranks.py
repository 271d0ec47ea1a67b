"""Run a tp x ep decoder on CPU as N processes over gloo (torch.distributed): spawn the process group,
give each process its rank module (eager or torch.export-ed), drive the generation loop on every rank.

Used by the parallel artifact runner and the tests; on GPUs the same rank graphs run under NCCL.
"""

from __future__ import annotations

import os
import socket
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch

GLOO_TIMEOUT_S = 120  # a rank that dies leaves the others blocked in a collective for at most this long


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, fn: Callable[..., None], world: int, port: int, threads: int, args: tuple) -> None:
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=GLOO_TIMEOUT_S))
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def spawn_ranks(fn: Callable[..., None], world: int, *args: Any, threads: int = 1) -> None:
    """Run fn(rank, *args) in `world` fresh processes joined in one gloo process group on 127.0.0.1.

    fn and args must be picklable (top-level function). Raises when any rank fails (the others are
    terminated by torch.multiprocessing).
    """
    import torch.multiprocessing as mp

    mp.start_processes(_rank_entry, args=(fn, world, free_port(), threads, args), nprocs=world,
                       start_method="spawn", join=True)


def start_ranks(fn: Callable[..., None], world: int, *args: Any, threads: int = 1) -> list:
    """Like spawn_ranks, but returns the `world` started processes at once (daemonic: they end with this
    process) instead of waiting for them; for a long-lived rank server (parallel_artifact.ParallelEngine)."""
    import multiprocessing as mp

    ctx, port = mp.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_entry, args=(rank, fn, world, port, threads, args), daemon=True,
                         name=f"qwen3export-rank{rank}") for rank in range(world)]
    for p in procs:
        p.start()
    return procs


def rank_step(spec, source: Any, layout, dtype: torch.dtype = torch.float32, exported: bool = False):
    """This rank's decoder as a generation step: (step callable, empty_cache function)."""
    from qwen3export.graphs.parallel import build_rank_module, capture_rank, shard_weights

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
    from qwen3export.errors import InputError
    from qwen3export.plan import check_parallelism

    for j in jobs:  # every bad degree fails here, in the caller, before a process starts
        check_parallelism(j["spec"], j["tp"], j["ep"])
        if j["tp"] * j["ep"] != world:
            raise InputError(f"job {j['name']}: tp {j['tp']} x ep {j['ep']} is not {world} ranks; "
                             f"run it with {j['tp'] * j['ep']} processes")
    spawn_ranks(greedy_jobs_worker, world, jobs, str(out_dir))
    return {j["name"]: [torch.load(Path(out_dir) / f"{j['name']}.rank{r}.pt") for r in range(world)] for j in jobs}
