"""TensorRT backend without TensorRT: type-checked against tensorrt-stubs, settings/profiles consistent with
the ONNX interface, and builds for GPU targets end as `pending` with the documented exit code."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from qwen3export.backends import onnx as onnx_backend
from qwen3export.backends import tensorrt as trt_backend
from qwen3export.cli import main
from qwen3export.spec import preset

ROOT = Path(__file__).resolve().parents[2]


def test_tensorrt_code_type_checks_against_tensorrt_stubs():
    """mypy with the tensorrt-stubs package (.ci/run installs it with --no-deps: its dependency is NVIDIA's
    download-from-elsewhere metapackage)."""
    r = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                        "--strict-optional", str(ROOT / "qwen3export/backends/tensorrt.py")],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    stubs = subprocess.run([sys.executable, "-c", "import importlib.util as u; "
                            "print(u.find_spec('tensorrt').submodule_search_locations)"], capture_output=True, text=True)
    assert "tensorrt" in stubs.stdout, "tensorrt-stubs is not installed: pip install --no-deps tensorrt-stubs"


def test_profiles_cover_every_engine_input_in_order():
    spec = preset("tiny-moe")
    prof = trt_backend.profiles(spec, max_batch=4, max_seq=1024)
    inputs, _ = onnx_backend.io_names(spec)
    assert list(prof) == inputs
    for name, (lo, opt, hi) in prof.items():
        assert len(lo) == len(opt) == len(hi) == len(onnx_backend.io_shapes(spec)[name])
        assert all(a <= b <= c for a, b, c in zip(lo, opt, hi)), name
    assert prof["past_key_values.0.key"][0][2] == 0  # prefill: empty cache
    assert prof["attention_mask"][2] == [4, 1024]


def test_no_tensorrt_here():
    missing = trt_backend.missing_requirements()
    assert any("tensorrt" in m for m in missing) and any("GPU" in m for m in missing)


def test_gpu_target_build_is_pending_with_exit_3(tmp_path, capsys):
    from qwen3export.targets import TARGETS

    gpu = next((t for t in TARGETS.values() if t.kind == "gpu" and "tensorrt" in t.backends), None)
    if gpu is None:
        pytest.fail("no GPU target offers the tensorrt backend")
    out = tmp_path / "trt"
    code = main(["build", "--model", "tiny", "--target", gpu.name, "--backend", "tensorrt", "--dtype",
                 "bf16" if "bf16" in gpu.dtypes else "fp16", "--artifact", str(out)])
    captured = capsys.readouterr()
    assert code == trt_backend.EXIT_PENDING, captured.err
    assert "pending" in captured.err.splitlines()[-1]
    m = json.loads((out / "manifest.json").read_text())
    assert m["engine"]["tensorrt"]["status"] == "pending" and m["parity"]["passed"]
    settings = json.loads((out / trt_backend.SETTINGS_FILE).read_text())
    assert settings["dtype"] in ("bf16", "fp16") and settings["builder_flags"]
    assert trt_backend.SETTINGS_FILE in m["files"] and "decoder.onnx" in m["files"]
    assert main(["finish", str(out)]) == trt_backend.EXIT_PENDING
    assert main(["verify", str(out)]) == 0  # the ONNX inside still verifies on CPU
