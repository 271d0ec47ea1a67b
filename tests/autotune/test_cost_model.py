"""autotune/cost_model.py ranks configs sensibly on known cases: spills and over-limit configs are invalid,
occupancy follows registers and shared memory, wave quantisation and idle SMs cost time."""

from __future__ import annotations

import pytest

from qwen3export.autotune.cost_model import (Resources, blocks_per_sm, estimate, launch_seconds, modelled_seconds,
                                             resources_from_records)
from qwen3export.autotune.workloads import Launch, launches
from qwen3export.kernels.config import KernelConfig
from qwen3export.targets import get_target

DECODE = "attention_decode"


def uniform(kernel, shape, config, registers=64, shared=0, valid=True):
    return {launch.function: Resources(registers, shared, valid, "ok" if valid else "spills 32 B stack")
            for launch in launches(kernel, shape, config, "bf16")}


def test_occupancy_from_registers_shared_memory_and_warps():
    a100, h100 = get_target("a100"), get_target("h100")
    assert blocks_per_sm(a100, Resources(128, 0), 8) == (2, "registers")  # 128 x 256 threads = 32 K of 64 K
    assert blocks_per_sm(a100, Resources(32, 0), 1) == (32, "blocks")
    assert blocks_per_sm(a100, Resources(32, 100 * 1024), 4) == (1, "shared")  # 164 KB / 101 KB
    assert blocks_per_sm(h100, Resources(32, 100 * 1024), 4) == (2, "shared")  # 228 KB / 101 KB
    assert blocks_per_sm(get_target("l4"), Resources(32, 0), 16) == (3, "warps")  # 48 warps / 16


def test_spilling_config_is_invalid_and_never_ranked():
    config = KernelConfig(DECODE, {"BLOCK_N": 64}, num_warps=4, num_stages=2, meta={"NUM_SPLITS": 8})
    shape = {"Hq": 32, "Hkv": 4, "D": 128, "B": 1, "L": 8192}
    est = estimate(get_target("a100"), DECODE, shape, config, "bf16", uniform(DECODE, shape, config, valid=False))
    assert not est.valid and est.seconds is None and "spills" in est.reason
    fits_nothing = estimate(get_target("a100"), DECODE, shape, config, "bf16",
                            uniform(DECODE, shape, config, shared=200 * 1024))
    assert not fits_nothing.valid and "0 blocks" in fits_nothing.reason


@pytest.mark.parametrize("target", ["a100", "h100", "h200", "a10g", "l4"])
def test_idle_sms_never_beat_a_full_wave(target):
    """Batch-1 decode over a 32K cache: 1 split keeps Hkv = 4 SMs busy; enough splits fill a wave. On HBM parts
    a quarter of the SMs cannot saturate memory; a GDDR6 L4/A10G saturates its 300/600 GB/s with ~10 SMs, so
    there fewer splits may tie (and save the reduce's partial outputs), never win by more than that."""
    tgt = get_target(target)
    shape = {"Hq": 32, "Hkv": 4, "D": 128, "B": 1, "L": 32768}
    times = {}
    for splits in (1, 2, 4, 8, 16, 32):
        config = KernelConfig(DECODE, {"BLOCK_N": 64}, num_warps=4, num_stages=2, meta={"NUM_SPLITS": splits})
        times[splits] = estimate(tgt, DECODE, shape, config, "bf16", uniform(DECODE, shape, config)).seconds
    idle = min(times[s] for s in times if 4 * s < tgt.sm_count / 4)  # < a quarter of the SMs busy
    full = min(times[s] for s in times if 4 * s >= tgt.sm_count / 2)  # at least half the SMs busy
    if tgt.memory_bandwidth > 1e12:  # HBM
        assert full < idle / 1.5 and times[1] > 3 * full  # 4 busy SMs
    else:
        assert full <= idle * 1.01 and times[1] > full


def test_wave_quantisation():
    h100 = get_target("h100")
    one_per_sm = Resources(255, 0)  # 255 registers x 8 warps: one block per SM
    base = dict(bytes=0.0, inflight_bytes=1 << 20, num_warps=8, tensor_core=True, mma_tile=(128, 128))
    one_wave = Launch("f", programs=132, flops=132 * 1e9, **base)  # compute-bound programs
    spill_over = Launch("f", programs=133, flops=133 * 1e9, **base)
    t1, d1 = launch_seconds(h100, one_wave, one_per_sm, "bf16")
    t2, d2 = launch_seconds(h100, spill_over, one_per_sm, "bf16")
    assert (d1["waves"], d2["waves"], d2["last_wave_sms"]) == (1, 2, 1)
    assert t2 > 1.9 * t1 - 4e-6  # one more program costs a whole second wave


def test_compute_bound_prefill_prefers_big_tiles_on_hopper():
    """Shared memory feeds 128 B/clock/SM: 16-row tiles cannot keep H100's tensor cores busy."""
    h100 = get_target("h100")
    shape = {"Hq": 32, "Hkv": 8, "D": 128, "S": 8192}
    small = KernelConfig("attention_prefill", {"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=2)
    big = KernelConfig("attention_prefill", {"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)
    t_small = estimate(h100, "attention_prefill", shape, small, "bf16", uniform("attention_prefill", shape, small))
    t_big = estimate(h100, "attention_prefill", shape, big, "bf16", uniform("attention_prefill", shape, big, 200))
    assert t_big.seconds < t_small.seconds / 2


def test_decode_is_memory_bound_near_the_bandwidth_roofline():
    for name in ("a100", "h200"):
        tgt = get_target(name)
        shape = {"Hq": 64, "Hkv": 4, "D": 128, "B": 32, "L": 32768}
        config = KernelConfig(DECODE, {"BLOCK_N": 64}, num_warps=4, num_stages=2, meta={"NUM_SPLITS": 4})
        kv_bytes = 32 * 4 * 32768 * 128 * 2 * 2
        seconds = estimate(tgt, DECODE, shape, config, "bf16", uniform(DECODE, shape, config)).seconds
        assert 1.0 <= seconds / (kv_bytes / tgt.memory_bandwidth) < 1.3


def test_resources_take_the_worst_shape():
    records = [{"function": "f", "registers": 40, "shared_bytes": 0, "valid": True, "reason": "ok"},
               {"function": "f", "registers": 96, "shared_bytes": 512, "valid": True, "reason": "ok"},
               {"function": "g", "registers": 255, "shared_bytes": 0, "valid": False, "reason": "spills 8 B stack"}]
    res = resources_from_records(records)
    assert res["f"] == Resources(96, 512, True, "ok") and not res["g"].valid


def test_real_compile_rejects_a_spilling_rms_norm(tmp_path):
    """Cross-compiled for sm_80: 4 rows of 4096 in one warp spill (STACK > 0); 8 warps do not."""
    a100 = get_target("a100")
    shape = {"N": 4096, "M": 256}
    spills = KernelConfig("rms_norm", {"BLOCK_ROWS": 4}, num_warps=1, num_stages=1)
    fits = KernelConfig("rms_norm", {"BLOCK_ROWS": 4}, num_warps=8, num_stages=1)
    bad = modelled_seconds(a100, "rms_norm", shape, spills, "bf16", cache_dir=tmp_path)
    good = modelled_seconds(a100, "rms_norm", shape, fits, "bf16", cache_dir=tmp_path)
    assert not bad.valid and "spills" in bad.reason
    assert good.valid and good.launches[0]["occupancy_limit"] in ("registers", "warps", "blocks")
