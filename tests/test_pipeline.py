"""Build pipeline guarantees: the parity gate stops a wrong engine, and an interrupted build leaves
nothing that looks complete. Faults are injected into the real engine file, not into the checker."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import qwen3export.backends.onnx as onnx_backend
from qwen3export import artifact as art
from qwen3export.cli import main

from artifact_copy import copy_of


def _perturb_q_norm(path, factor=1.01):
    """Scale layer 0's q_norm weight inside an emitted ONNX file (a subtly wrong engine)."""
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if "layers.0.self_attn.q_norm" in init.name:
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * np.float32(factor), init.name))
            break
    else:
        raise AssertionError("q_norm initializer not found")
    onnx.save(model, str(path))


def test_parity_gate_rejects_a_wrong_engine(monkeypatch, tmp_path, capsys):
    real_emit = onnx_backend.emit_decoder

    def wrong_emit(ep, spec, folder, **kw):
        info = real_emit(ep, spec, folder, **kw)
        _perturb_q_norm(folder / info["file"])
        return info

    monkeypatch.setattr(onnx_backend, "emit_decoder", wrong_emit)
    out = tmp_path / "art"
    code = main(["build", "--model", "tiny", "--artifact", str(out)])
    err = capsys.readouterr().err
    assert code != 0
    assert "parity FAIL" in err and "qwen3export: error: engine failed the parity gate" in err
    assert "logits scaled error" in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_interrupted_build_leaves_nothing(monkeypatch, tmp_path, capsys):
    def interrupted_emit(ep, spec, folder, **kw):
        (folder / "decoder.onnx").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(onnx_backend, "emit_decoder", interrupted_emit)
    out = tmp_path / "art"
    assert main(["build", "--model", "tiny", "--artifact", str(out)]) == 130
    assert list(tmp_path.iterdir()) == []


def test_verify_reports_failure_of_a_resealed_wrong_engine(built_artifact, tmp_path, capsys):
    out = copy_of(built_artifact("--model", "tiny", "--seed", "1"), tmp_path)
    _perturb_q_norm(out / "decoder.onnx")
    a = art.load_artifact(out, verify_checksums=False)
    art.seal(out, a.manifest)  # checksums now match the wrong engine: only parity can catch it
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert not report["passed"] and report["logits_scaled_err"] > 1e-4
    assert json.loads((out / "manifest.json").read_text())["parity"]["passed"] is False
    art.load_artifact(out)  # the updated manifest is still consistent


def test_force_replaces_atomically(built_artifact, tmp_path, capsys):
    out = copy_of(built_artifact("--model", "tiny", "--seed", "1"), tmp_path)
    first = json.loads((out / "manifest.json").read_text())["files"]["decoder.onnx"]["sha256"]
    assert main(["build", "--model", "tiny", "--artifact", str(out), "--seed", "2", "--force"]) == 0
    second = art.load_artifact(out).manifest
    assert second["files"]["decoder.onnx"]["sha256"] != first and second["model"]["ref"]["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["art"]


def test_large_weights_go_to_external_data_with_checksums(monkeypatch, tmp_path, capsys):
    """Over the protobuf limit, weights are written as decoder.onnx.data (the limit is lowered here so
    that the tiny preset crosses it; the 0.6B benchmark crosses the real 2 GB one)."""
    monkeypatch.setattr(onnx_backend, "PROTOBUF_LIMIT", 65 << 20)  # threshold (limit - 64 MiB) = 1 MiB
    out = tmp_path / "art"
    assert main(["build", "--model", "tiny", "--artifact", str(out)]) == 0
    manifest = art.load_artifact(out).manifest
    assert manifest["engine"]["external_data"] is True
    assert {"decoder.onnx", "decoder.onnx.data"} <= set(manifest["files"])
    assert manifest["files"]["decoder.onnx.data"]["size"] > 30 << 20  # the 151936 x 64 fp32 embedding
    assert manifest["files"]["decoder.onnx"]["size"] < 5 << 20
    data = out / "decoder.onnx.data"
    blob = bytearray(data.read_bytes())
    blob[-1] ^= 1
    data.write_bytes(bytes(blob))
    capsys.readouterr()
    assert main(["run", str(out), "--prompt-ids", "1"]) == 2
    assert "decoder.onnx.data does not match its sha256" in capsys.readouterr().err


@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_one_layer_models_build_with_the_shared_kv_buffer(model, tmp_path):
    """A one-layer trace takes the batch size from Shape(attention_mask), so the mask has a reader besides
    GroupQueryAttention's lengths: the ort flavour still builds (it refused such graphs before), passes its gate
    and keeps its in-place cache."""
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build

    build(BuildOptions.of(model=model, artifact=tmp_path / "a", overrides={"num_hidden_layers": 1}))
    m = art.load_artifact(tmp_path / "a").manifest
    assert m["model"]["spec"]["num_hidden_layers"] == 1 and m["parity"]["passed"]
    assert m["engine"]["kv_cache"] == "shared_buffer"
