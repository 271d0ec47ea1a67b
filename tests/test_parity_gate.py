"""The parity gate (qwen3export/parity.py) on trained-model magnitudes: it scales with the logits, it fails on
NaN/Inf with its own message, and a checkpoint holding NaN is refused before anything is built."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from safetensors.torch import load_file, save_file

import qwen3export.backends.onnx as onnx_backend
from qwen3export.cli import main
from qwen3export.model import build_module, resolve
from qwen3export.parity import THRESHOLDS, check_parity
from qwen3export.weights import RandomSource, save_hf_checkpoint


class Skewed:
    """An engine that returns eager's logits changed by `fn` (an injected error of a known size)."""

    def __init__(self, eager, fn):
        self.eager, self.fn = eager, fn

    def empty_cache(self, b):
        return self.eager.empty_cache(b)

    def __call__(self, *args):
        logits, present = self.eager(*args)
        return self.fn(logits), present


@pytest.fixture(scope="module")
def eager():
    spec, source, _ = resolve("tiny")  # trained statistics: logits max ~20-30
    with torch.no_grad():
        yield build_module(spec, source, torch.float32)


def _check(eager, fn, dtype: str = "fp32"):
    with torch.no_grad():
        return check_parity(Skewed(eager, fn), eager.empty_cache(2), eager, eager.empty_cache(2),
                            eager.spec.vocab_size, dtype)


def test_rounding_at_trained_scale_passes_where_an_absolute_gate_failed(eager):
    """The issue's checkpoint: every token right, logits off by ~2.7e-5 of their scale (abs 4e-4 at max 15.6)."""
    report = _check(eager, lambda x: x * (1 + 3e-5))
    assert report["passed"], report["failures"]
    assert report["logits_max_abs"] > 1e-4  # what the old absolute gate failed on
    assert report["logits_scaled_err"] == pytest.approx(3e-5, rel=0.05)


def test_an_error_of_a_real_bug_fails(eager):
    """A 0.03% error of the logits' scale (a wrong constant, a dropped term) fails although top-1 holds."""
    report = _check(eager, lambda x: x * (1 + 3e-4))
    assert not report["passed"] and report["top1_agreement"] == 1.0
    assert report["failures"][0].startswith("logits scaled error")


def test_small_logits_stay_gated_absolutely(eager):
    """Rows whose logits are below 1 in magnitude are gated on the absolute error (max(1, .))."""
    report = _check(eager, lambda x: x * 1e-3 + 2e-4)
    assert not report["passed"]


def test_nan_and_inf_fail_with_their_own_message(eager):
    for bad in (float("nan"), float("inf")):
        def poison(x, bad=bad):
            x = x.clone()
            x[..., 7] = bad
            return x
        report = _check(eager, poison)
        assert not report["passed"] and report["logits_scaled_err"] is None
        assert "the engine's logits hold NaN or Inf" in report["failures"]
        json.dumps(report, allow_nan=False)  # strict JSON: the manifest can hold it


def test_int8_activation_gate_takes_isolated_flips_not_errors_in_every_row(eager):
    """THRESHOLDS["int8_activations"] (level-4 int4 engines): one row off by a rounding flip's size (5e-3 of its
    scale) passes there, not at fp32; the same error in every row fails on the median row."""
    def one_row(x):
        if x.shape[1] == 1:  # decode steps stay exact
            return x
        x = x.clone()
        x[0, -1] += 5e-3 * x[0, -1].abs().max()  # the prefill's first row, last position
        return x

    assert not _check(eager, one_row)["passed"]
    report = _check(eager, one_row, "int8_activations")
    assert report["passed"], report["failures"]
    assert report["logits_scaled_median"] < 1e-6 and report["logits_scaled_err"] > 1e-3
    everywhere = _check(eager, lambda x: x * (1 + 5e-3), "int8_activations")
    assert not everywhere["passed"] and everywhere["failures"] == [
        f"median logits scaled error {everywhere['logits_scaled_median']:.3g} > 0.0001"]


def test_thresholds_name_their_metric():
    assert set(THRESHOLDS) == {"fp32", "fp16", "bf16", "fp8", "int8_activations"}
    assert all("logits_scaled" in t for t in THRESHOLDS.values())


def test_nan_weight_is_refused_at_build_naming_the_tensor(tmp_path, capsys):
    spec, source, _ = resolve("tiny")
    folder = save_hf_checkpoint(spec, RandomSource(spec, 0), tmp_path / "ckpt")
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.mlp.down_proj.weight"][3, 5] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "art"
    code = main(["build", "--model", str(folder), "--artifact", str(out)])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("qwen3export: error")]
    assert code == 2 and len(err) == 1, err  # one line (after the load stage's progress line)
    assert "tensor model.layers.1.mlp.down_proj.weight in model.safetensors holds nan" in err[0]
    assert "corrupt" in err[0] and not out.exists()


def test_a_nan_engine_is_stopped_by_the_gate(monkeypatch, tmp_path, capsys):
    """NaN reaching the engine (here: written into its ONNX after emission) fails the build; nothing is written."""
    real_emit = onnx_backend.emit_decoder

    def nan_emit(ep, spec, folder, **kw):
        info = real_emit(ep, spec, folder, **kw)
        model = onnx.load(str(folder / info["file"]))
        init = next(i for i in model.graph.initializer if "layers.0.self_attn.q_norm" in i.name)
        values = numpy_helper.to_array(init).copy()
        values[0] = np.nan
        init.CopyFrom(numpy_helper.from_array(values, init.name))
        onnx.save(model, str(folder / info["file"]))
        return info

    monkeypatch.setattr(onnx_backend, "emit_decoder", nan_emit)
    out = tmp_path / "art"
    code = main(["build", "--model", "tiny", "--artifact", str(out)])
    err = capsys.readouterr().err
    assert code != 0 and "the engine's logits hold NaN or Inf" in err and not out.exists()
