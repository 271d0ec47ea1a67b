"""autotune/measure.py: the measured objective's cases drive each kernel's launcher and match its reference (run
here through Triton's interpreter on CPU tensors, tiny shapes); timing itself needs the target's GPU."""

from __future__ import annotations

import pytest
import torch

from qwen3export.autotune.measure import check_config, device_matches, measured_objective
from qwen3export.kernels.compile import kernel_module
from qwen3export.targets import get_target

TINY = {
    "rms_norm": {"M": 5, "N": 48},
    "qk_norm_rope": {"M": 3, "Hq": 4, "Hkv": 2, "D": 32},
    "attention_prefill": {"S": 9, "Hq": 4, "Hkv": 2, "D": 32},
    "attention_decode": {"B": 2, "L": 37, "Hq": 4, "Hkv": 2, "D": 32},
    "moe_routing": {"M": 5, "H": 32, "E": 8, "K": 2},
    "moe_align": {"M": 7, "E": 8, "K": 2},
    "fused_moe": {"M": 5, "H": 32, "I": 16, "E": 4, "K": 2},
}


@pytest.mark.parametrize("kernel", list(TINY))
def test_case_matches_reference_under_the_interpreter(kernel):
    # fp32: the interpreter's tl.dot on bf16 is wrong (../shared/DESIGN.md section 5)
    assert check_config(kernel, TINY[kernel], "fp32", kernel_module(kernel).DEFAULT_CONFIG, device="cpu") is None


def test_no_measurement_without_the_targets_gpu():
    assert not device_matches(get_target("cpu"))
    if not torch.cuda.is_available():
        assert not any(device_matches(get_target(n)) for n in ("a100", "h100", "l4"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="measured tuning needs a CUDA GPU")
def test_measured_objective_times_a_correct_config():
    major, minor = torch.cuda.get_device_capability()
    target = next((t for t in ("a100", "a10g", "l4", "h100") if get_target(t).compute_capability == 10 * major + minor),
                  None)
    if target is None:
        pytest.skip(f"no target of compute capability {major}.{minor}")
    evaluate = measured_objective(get_target(target), "rms_norm", {"M": 64, "N": 1024}, "bf16")
    microseconds, reason = evaluate(kernel_module("rms_norm").DEFAULT_CONFIG)
    assert reason == "ok" and 0 < microseconds < 1000
