"""targets/: GPU figures agree with the kernels' per-arch limits, dtype refusals are clear, unknown names list
the known ones, and every target survives a JSON round trip (the manifest stores it)."""

from __future__ import annotations

import json

import pytest

from qwen3export.errors import TargetError
from qwen3export.kernels.config import ARCH_LIMITS
from qwen3export.targets import TARGETS, Target, get_target, gpu_targets

GPU_NAMES = ["a100", "a10g", "l4", "l40s", "rtx4090", "h100", "h200"]


def test_every_gpu_target_is_registered():
    assert set(GPU_NAMES) <= set(TARGETS) and "cpu" in TARGETS
    assert sorted(t.name for t in gpu_targets()) == sorted(GPU_NAMES)


@pytest.mark.parametrize("name", GPU_NAMES)
def test_figures_match_kernel_arch_limits(name):
    t = get_target(name)
    limits = ARCH_LIMITS[t.arch]
    assert t.compute_capability == limits.compute_capability
    assert t.shared_mem_per_sm == limits.shared_per_sm
    assert t.shared_mem_per_block == limits.max_shared_per_block
    assert t.max_warps_per_sm == limits.max_warps_per_sm and t.max_threads_per_sm == 32 * limits.max_warps_per_sm
    assert t.registers_per_sm == limits.registers_per_sm and t.registers_per_thread == limits.registers_per_thread


@pytest.mark.parametrize("name", GPU_NAMES)
def test_figures_are_plausible(name):
    t = get_target(name)
    assert 40 <= t.sm_count <= 150 and 16e9 <= t.memory_bytes <= 200e9 and 2e11 <= t.memory_bandwidth <= 6e12
    # dense tensor-core fp16 is at least 2x fp32 SIMT and equals bf16; fp8 doubles fp16 where present
    assert t.peak_flops["fp16"] == t.peak_flops["bf16"] >= 2 * t.peak_flops["fp32"]
    assert t.peak_flops["tf32"] >= t.peak_flops["fp32"] * 0.99
    if "fp8" in t.dtypes:
        assert t.peak_flops["fp8"] == pytest.approx(2 * t.peak_flops["fp16"], rel=0.02)  # L40S: 733 vs 362.05
    assert t.ort_providers == ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
    assert {"onnx", "tensorrt", "kernels"} <= set(t.backends)


@pytest.mark.parametrize("name", GPU_NAMES)
def test_peak_matches_an_architectural_rate_at_the_quoted_clock(name):
    """Dense fp16 tensor FLOP per clock per SM: 4096 (sm_90), 2048 (sm_80), 1024 (Ada datacenter), 512 (GA102/AD102
    with half-rate fp32 accumulate: A10G, RTX 4090). Catches a sparse figure or a wrong SM count."""
    t = get_target(name)
    per_clock = t.peak_flops["fp16"] / (t.sm_count * t.clock_hz)
    assert min(abs(per_clock / rate - 1) for rate in (512, 1024, 2048, 4096)) < 0.015, per_clock


def test_sparsity_figures_are_not_used():
    # H100 SXM datasheet: 1,979 TF BF16 *with sparsity*; dense is half. A100: 312 dense (624 sparse).
    assert get_target("h100").peak_flops["bf16"] < 1.0e15
    assert get_target("a100").peak_flops["bf16"] == 312e12


@pytest.mark.parametrize("name", GPU_NAMES)
def test_dtypes_follow_compute_capability(name):
    t = get_target(name)
    assert "bf16" in t.dtypes and "fp16" in t.dtypes  # all of these are sm_80 or newer
    assert ("fp8" in t.dtypes) == (t.compute_capability >= 89)
    assert ("FP8" in t.trt_builder_flags) == ("fp8" in t.dtypes)


def test_fp8_refused_before_sm_89():
    for name in ("a100", "a10g"):
        with pytest.raises(TargetError) as err:
            get_target(name).check_dtype("fp8")
        msg = str(err.value)
        assert f"target {name} (sm_8" in msg and "fp8 needs sm_89 or newer" in msg and "--dtype bf16" in msg
    get_target("l4").check_dtype("fp8")
    get_target("h100").check_dtype("fp8")


def test_bf16_refused_before_sm_80_and_on_cpu():
    with pytest.raises(TargetError, match=r"bf16 needs sm_80 or newer"):
        Target(name="t4", description="", kind="gpu", compute_capability=75, sm_count=40, shared_mem_per_sm=64 << 10,
               shared_mem_per_block=64 << 10, registers_per_sm=65536, max_threads_per_sm=1024, max_warps_per_sm=32,
               max_blocks_per_sm=16, memory_bytes=16 * 10**9, memory_bandwidth=320e9, clock_hz=1.59e9,
               peak_flops={"fp32": 8.1e12, "fp16": 65e12}, dtypes=("fp16", "fp32"),
               ort_providers=("CPUExecutionProvider",)).check_dtype("bf16")
    with pytest.raises(TargetError, match="target cpu cannot run dtype bf16: it supports fp32; pass --dtype fp32"):
        get_target("cpu").check_dtype("bf16")


def test_a_target_listing_an_unsupported_dtype_is_rejected():
    fields = {k: v for k, v in get_target("a100").to_dict().items() if k != "arch"}
    with pytest.raises(TargetError, match="fp8 which needs sm_89"):
        Target(**fields | {"dtypes": ("bf16", "fp8"), "peak_flops": {"bf16": 1.0, "fp8": 2.0}})


def test_trt_flags_per_dtype():
    h100 = get_target("h100")
    assert h100.trt_flags("fp32") == ["TF32"]
    assert h100.trt_flags("bf16") == ["TF32", "BF16"]
    assert h100.trt_flags("fp8") == ["TF32", "FP16", "BF16", "FP8"]
    with pytest.raises(TargetError):
        get_target("a100").trt_flags("fp8")


def test_unknown_target_lists_known_ones():
    with pytest.raises(TargetError) as err:
        get_target("tpu9")
    assert all(name in str(err.value) for name in ["cpu", *GPU_NAMES])


@pytest.mark.parametrize("name", list(TARGETS))
def test_json_round_trip(name):
    t = get_target(name)
    again = Target.from_dict(json.loads(json.dumps(t.to_dict())))
    assert again == t and again.arch == t.arch
