"""autotune/calibration.py and the Calibration terms of autotune/cost_model.py: the percentile and BLOCK_M
figures mean what they say, each free parameter moves the model the way its docstring claims, the fit never
scores worse than the uncalibrated model on its training samples, and the shipped calibration is the one tune
uses. Synthetic compile resources (autotune_fakes.py) keep this to seconds; the real files come from
../shared/reference/vllm-fused-moe (skipped where absent)."""

from __future__ import annotations

import json

import pytest
from autotune_fakes import synthetic_resources
from test_public_tables import PUBLIC, needs_public

from qwen3export.autotune import calibration as cal
from qwen3export.autotune.cost_model import UNCALIBRATED, Calibration, Resources, launch_seconds
from qwen3export.autotune.public_tables import KERNEL, read_public_tables
from qwen3export.autotune.tune import _objective, study_source, Task
from qwen3export.autotune.workloads import Launch
from qwen3export.kernels.config import KernelConfig
from qwen3export.targets import get_target


def moe(bm: int, bn: int = 64, bk: int = 64, warps: int = 4, stages: int = 3, group: int = 1) -> KernelConfig:
    return KernelConfig(KERNEL, {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages,
                        meta={"GROUP_SIZE_M": group})


def test_percentile_counts_faster_configs_and_half_the_ties():
    a, b, c, d = moe(16), moe(32), moe(64), moe(128)
    times = [(a, 1.0), (b, 2.0), (c, 2.0), (d, 4.0)]
    assert cal.percentile(times, a) == 0.0
    assert cal.percentile(times, b) == 100 * (1 + 0.5) / 4  # one faster, one tied
    assert cal.percentile(times, d) == 75.0
    assert cal.percentile(times, moe(16, bn=128)) is None  # not valid in our model
    assert cal.best_block_m(times) == [16]
    assert cal.best_block_m([(a, 1.0), (c, 1.0)]) == [16, 64]  # a tie the model cannot break


def test_each_parameter_moves_the_model_as_documented():
    h100, a100 = get_target("h100"), get_target("a100")
    res = Resources(96, 0)
    compute = Launch("f", programs=132, flops=132 * 1e9, bytes=1e3, inflight_bytes=1 << 20, num_warps=8,
                     tensor_core=True, mma_tile=(128, 128))
    base = launch_seconds(h100, compute, res, "bf16")[0]
    half = launch_seconds(h100, compute, res, "bf16", Calibration(compute_efficiency=(("sm_90", 0.5),)))[0]
    assert half - 2e-6 == pytest.approx(2 * (base - 2e-6), rel=1e-6)  # launch overhead aside, twice the time
    other_arch = Calibration(compute_efficiency=(("sm_80", 0.5),))
    assert launch_seconds(h100, compute, res, "bf16", other_arch)[0] == base
    thin = Launch("f", programs=132, flops=132 * 1e9, bytes=1e3, inflight_bytes=1 << 20, num_warps=4,
                  tensor_core=True, mma_tile=(16, 128))
    slow_thin = Calibration(small_m_efficiency=0.5)
    assert launch_seconds(h100, thin, res, "bf16", slow_thin)[0] > launch_seconds(h100, thin, res, "bf16")[0]
    assert launch_seconds(a100, thin, res, "bf16", slow_thin)[0] == launch_seconds(a100, thin, res, "bf16")[0]
    both = Launch("f", programs=132, flops=132 * 4e7, bytes=132 * 1e5, inflight_bytes=1 << 20, num_warps=8,
                  tensor_core=True, mma_tile=(128, 128))
    roofline = launch_seconds(h100, both, res, "bf16")[0]
    added = launch_seconds(h100, both, res, "bf16", Calibration(overlap=0.0))[0]
    assert added > roofline * 1.2  # compute and memory add up instead of overlapping
    shallow = Launch("f", programs=132, flops=1.0, bytes=132 * 1e6, inflight_bytes=4096, num_warps=4)
    assert launch_seconds(h100, shallow, res, "bf16", Calibration(memory_latency_s=2e-6))[0] > \
        launch_seconds(h100, shallow, res, "bf16")[0]


def test_calibration_round_trips_and_unknown_kernels_stay_uncalibrated(tmp_path):
    fitted = Calibration(compute_efficiency=(("sm_90", 0.3),), overlap=0.4, fit=(("train_devices", ["h100"]),))
    path = cal.save_calibration(KERNEL, fitted, tmp_path / "calibration.json")
    assert cal.load_calibration(KERNEL, path) == fitted
    assert cal.load_calibration("rms_norm", path) is UNCALIBRATED
    assert cal.load_calibration(KERNEL, tmp_path / "absent.json") is UNCALIBRATED
    with pytest.raises(ValueError, match="unknown"):
        Calibration.from_dict({"overlapp": 1.0})


@pytest.fixture(scope="module")
def h100_samples():
    if not PUBLIC.is_dir():
        pytest.skip(f"vLLM's fused_moe configs are not at {PUBLIC}")
    samples, skipped = cal.make_samples(read_public_tables(PUBLIC))
    return samples, skipped


@needs_public
def test_samples_cover_the_modelled_tables_and_say_what_is_skipped(h100_samples):
    samples, skipped = h100_samples
    names = {p.name for p in PUBLIC.glob("E=*.json")}
    assert {s.table.file for s in samples} | {s["file"] for s in skipped} == names
    assert not {s.table.device_name for s in samples} & {"NVIDIA_H20", "NVIDIA_H20-3e", "NVIDIA_B200", "NVIDIA_H100"}
    assert any("no target spec for NVIDIA_B200" == s["why"] for s in skipped)
    for s in samples:
        assert s.shape["M"] in cal.BUCKETS and s.m_key in s.table.entries
        assert s.dtype == ("bf16" if "dtype=" not in s.table.file else "fp8")
    assert {s.device for s in samples} >= {"a100", "h100", "h200", "l40s", "l4", "rtx4090"}


@needs_public
def test_fit_never_scores_worse_than_uncalibrated_on_its_training_samples(h100_samples):
    samples, _ = h100_samples
    train = [s for s in samples if s.table.file == "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json"]
    held_out = [s for s in samples if s.table.file == "E=128,N=768,device_name=NVIDIA_H200.json"]
    ranking = cal.Ranking(train + held_out, synthetic_resources)
    fitted = cal.fit(ranking, train, trials=8, seed=0)
    fit = dict(fitted.fit)
    assert fit["train_devices"] == ["h100"] and fit["train_samples"] == 7
    assert fit["loss"] <= fit["loss_uncalibrated"] == round(cal.loss(ranking, UNCALIBRATED, train), 4)
    assert cal.fit(ranking, train, trials=8, seed=0) == fitted  # seeded
    rows = cal.evaluate(ranking, fitted, held_out)
    summary = cal.summarize(rows)
    assert summary["samples"] == 7 and set(summary["devices"]) == {"h200"}
    for row in rows:
        assert 0 <= row["percentile"] <= 100 and row["block_m_agrees"] == (row["block_m_model"] == [row["block_m_vllm"]])


def test_tune_uses_the_shipped_calibration_for_fused_moe_only():
    shipped = cal.load_calibration(KERNEL)
    assert shipped != UNCALIBRATED and dict(shipped.fit)["kernel"] == KERNEL
    assert cal.load_calibration("attention_decode") is UNCALIBRATED
    assert study_source("modelled", KERNEL).startswith("modelled@") and study_source("modelled", "rms_norm") == "modelled"
    h100 = get_target("h100")
    task = Task(KERNEL, {"E": 128, "H": 2048, "I": 768, "K": 8}, ({"M": 64},), ("qwen3-30b-a3b",))
    evaluate, _ = _objective(h100, task, {"M": 64}, "bf16", "modelled", synthetic_resources, None)
    config = moe(16)
    from qwen3export.autotune.cost_model import estimate

    want = estimate(h100, KERNEL, task.shape | {"M": 64}, config, "bf16",
                    synthetic_resources(h100, KERNEL, config, "bf16"), shipped)
    assert evaluate(config)[0] == pytest.approx(want.microseconds)
    assert json.loads(cal.CALIBRATION_FILE.read_text())[KERNEL]["fit"]["train_devices"]
