"""The manifest's one definition (qwen3export/manifest.py): the runtime check derived from the TypedDicts, and mypy
over the modules that build and read manifests. Every build checks its manifest at seal (artifact.seal), and every
load at load_artifact, so the integration tier runs each artifact kind through the same check; the resealed-manifest
cases are in test_hostile_inputs.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any, Literal, TypedDict

import pytest

from qwen3export import manifest as mf
from qwen3export.artifact import new_manifest
from qwen3export.lowering import lowering_record
from qwen3export.manifest import ManifestShapeError, VariantFields, check_manifest, check_value
from qwen3export.memory_plan import serving_limits
from qwen3export.parallel_artifact import parallel_record
from qwen3export.spec import preset
from qwen3export.targets import get_target

ROOT = Path(__file__).resolve().parents[1]


class _Inner(TypedDict):
    n: int


class _Outer(TypedDict, total=False):
    x: float
    flag: bool
    kind: Literal["a", "b"]
    inner: _Inner
    ids: list[int]
    table: dict[str, _Inner]
    maybe: str | None


@pytest.mark.parametrize("value,where", [
    ({"x": "1.0"}, "x"), ({"x": True}, "x"),  # a boolean is not a number in JSON terms
    ({"flag": 1}, "flag"), ({"kind": "c"}, "kind"),
    ({"inner": {}}, "inner.n"), ({"inner": {"n": 1.5}}, "inner.n"),
    ({"ids": [1, "2"]}, "ids[1]"), ({"ids": {"0": 1}}, "ids"),
    ({"table": {"k": {"n": None}}}, "table.k.n"), ({"maybe": 3}, "maybe"),
])
def test_wrong_shapes_are_named_by_path(value, where):
    with pytest.raises(ManifestShapeError) as e:
        check_value(value, _Outer, "")
    assert e.value.where == where


def test_right_shapes_pass_and_nested_records_stay_open():
    check_value({"x": 1, "flag": False, "kind": "b", "inner": {"n": 2, "later": "field"}, "ids": [],
                 "table": {"k": {"n": 0}}, "maybe": None}, _Outer, "")
    with pytest.raises(ManifestShapeError, match="'extra' is not a field of this schema version"):
        check_value({"extra": 1}, _Outer, "", closed=True)


def _skeleton(backend: str = "onnx") -> dict[str, Any]:
    spec, target = preset("tiny"), get_target("cpu")
    m = new_manifest({"ref": {"kind": "preset", "name": "tiny"}, "spec": spec.to_dict(),
                      "param_count": spec.param_count()}, target.to_dict(), backend,
                     VariantFields(dtype="fp32", lowering=lowering_record(None)))
    m["serving"] = serving_limits(spec, target, "fp32")
    return dict(m) | {"files": {"decoder.onnx": {"size": 1, "sha256": "0" * 64}}, "manifest_sha256": "x"}


def test_the_skeleton_the_pipeline_writes_is_a_manifest_once_emitted():
    m = _skeleton()
    with pytest.raises(ManifestShapeError, match="'engine' is not present"):
        check_manifest(m)
    m["engine"] = {"file": "decoder.onnx", "inputs": ["input_ids"], "outputs": ["logits"], "opset": 18,
                   "shapes": {"input_ids": ["batch_size", "sequence_length"]}, "onnx_ops": "ort",
                   "external_data": False, "baked_weights": 0}
    assert check_manifest(m) is m
    m["engine"]["opset"] = "18"
    with pytest.raises(ManifestShapeError, match="'engine.opset' is not a JSON integer"):
        check_manifest(m)


def test_engine_and_parity_records_are_checked_by_kind():
    m = _skeleton("aoti") | {"engine": {"file": "decoder.pt2", "sampling_file": "sampling.pt2", "device": "cpu",
                                         "torch": "2.13"}}
    check_manifest(m)
    with pytest.raises(ManifestShapeError, match="'engine.sampling_file' is not present"):
        check_manifest(m | {"engine": {"file": "decoder.pt2", "device": "cpu", "torch": "2.13"}})
    sharded = _skeleton("torch-export") | {"parallel": parallel_record(2, 1), "engine": {
        "status": "built", "parts": 2, "program": "p", "weights": "w", "runner": "r"}}
    check_manifest(sharded)
    check_manifest(sharded | {"parity": {"passed": None, "not_run": "--no-verify", "command": "qwen3export verify"}})
    with pytest.raises(ManifestShapeError, match="'parity.reference' is not present"):
        check_manifest(sharded | {"parity": {"passed": True}})


def test_manifest_modules_type_check():
    """mypy over the modules that define, build and read the manifest: a key that manifest.py does not declare,
    or a record of the wrong type handed to a manifest field, fails here."""
    modules = ["manifest.py", "artifact.py", "pipeline.py", "stages.py", "in_memory.py", "streaming.py",
               "parallel_build.py", "memory_plan.py", "parallel_artifact.py", "describe.py", "verify.py",
               "sampling_files.py", "lowering.py"]
    r = subprocess.run([sys.executable, "-m", "mypy", "--ignore-missing-imports", "--follow-imports=silent",
                        *(str(ROOT / "qwen3export" / m) for m in modules)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_schema_names_its_version():
    assert mf.SCHEMA == f"qwen3export.artifact/{mf.SCHEMA_VERSION}"
