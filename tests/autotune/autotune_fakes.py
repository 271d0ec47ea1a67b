"""Synthetic compile resources for the autotune tests: the search, storage and resume mechanics are tested
without paying for cross-compilation (compile_report is tested in tests/kernels, and once here for real).

Registers grow with the fp32 accumulator tile per thread, shared memory with the pipeline stages, as in a
real compile; a config over 255 registers "spills" and is invalid. Importable from worker processes
(spawned, or started with PYTHONPATH=tests/autotune).
"""

from __future__ import annotations

import time

from qwen3export.autotune.cost_model import Resources
from qwen3export.autotune.workloads import launches


def synthetic_resources(target, kernel, config, dtype):
    c = config.constexprs
    tile = c.get("BLOCK_M", c.get("BLOCK_ROWS", c.get("BLOCK_T", c.get("BLOCK_H", 16)))) * \
        c.get("BLOCK_N", c.get("BLOCK_K", 64))
    regs = 32 + 2 * tile // config.threads
    shared = 2 * tile * config.num_stages if config.num_stages > 1 else 0
    shape = {"M": 64, "N": 1024, "Hq": 16, "Hkv": 8, "D": 128, "S": 512, "B": 1, "L": 1024, "E": 128, "H": 1024,
             "K": 8, "I": 768}
    return {launch.function: Resources(min(regs, 255), shared, regs <= 255, "ok" if regs <= 255 else "spills")
            for launch in launches(kernel, shape, config, "bf16")}


def slow_synthetic_resources(target, kernel, config, dtype):
    """As synthetic_resources, taking 50 ms like a (cached) compile lookup under load, so workers interleave
    and a kill lands mid-study."""
    time.sleep(0.05)
    return synthetic_resources(target, kernel, config, dtype)


def worker_after_barrier(barrier, *args):
    """tune.run_worker once every worker process is up: spawned workers import torch at different speeds on a
    loaded machine, and without the barrier the first one can finish the whole study before the second starts."""
    from qwen3export.autotune.tune import run_worker

    barrier.wait(timeout=600)
    return run_worker(*args)
