"""Run a tp x ep decoder on CPU as N processes over gloo (torch.distributed): spawn the process group,
give each process its rank module (eager or torch.export-ed), drive the generation loop on every rank.

Used by the parallel artifact runner (and tests/parallel_helpers.py); on GPUs the same rank graphs run under NCCL.
"""

from __future__ import annotations

import multiprocessing
import socket
from datetime import timedelta
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

GLOO_TIMEOUT_S = 120  # a rank that dies leaves the others blocked in a collective for at most this long


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_entry(rank: int, fn: Callable[..., None], world: int, port: int, threads: int, args: tuple) -> None:
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
    mp.start_processes(_rank_entry, args=(fn, world, free_port(), threads, args), nprocs=world,
                       start_method="spawn", join=True)


def start_ranks(fn: Callable[..., None], world: int, *args: Any, threads: int = 1) -> list:
    """Like spawn_ranks, but returns the `world` started processes at once (daemonic: they end with this
    process) instead of waiting for them; for a long-lived rank server (parallel_artifact.ParallelEngine)."""
    ctx, port = multiprocessing.get_context("spawn"), free_port()
    procs = [ctx.Process(target=_rank_entry, args=(rank, fn, world, port, threads, args), daemon=True,
                         name=f"qwen3export-rank{rank}") for rank in range(world)]
    for p in procs:
        p.start()
    return procs
