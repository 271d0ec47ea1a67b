"""`build --backend kernels` through the CLI, the kernel configs every GPU-target manifest records, `inspect`'s
per-backend summary and `verify` of a kernel-pack artifact."""

from __future__ import annotations

import json

import pytest

from qwen3export.autotune.tables import SHIPPED_DIR
from qwen3export.cli import main
from qwen3export.backends.kernel_pack import tuned_kernels_record as kernel_configs
from qwen3export.spec import preset
from qwen3export.targets import get_target


def cli(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def a100_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("a100")
    code = main(["build", "--model", "tiny-moe", "--target", "a100", "--backend", "kernels,tensorrt", "--out",
                 str(out), "--json"])
    return code, out


def test_kernels_and_pending_tensorrt_with_exit_3(a100_build):
    from qwen3export.backends.tensorrt import EXIT_PENDING

    code, out = a100_build
    assert code == EXIT_PENDING
    pack = json.loads((out / "tiny-moe-a100-kernels" / "manifest.json").read_text())
    assert pack["backend"] == "kernels" and pack["engine"]["status"] == "built"
    assert pack["engine"]["arch"] == "sm_80" and pack["parity"]["passed"]
    assert pack["parity"]["interpreter"]["passed"] and pack["parity"]["sampling"]["identical"]
    cubins = [f for f in pack["files"] if f.endswith(".cubin")]
    assert cubins and all(len(pack["files"][f]["sha256"]) == 64 for f in cubins)
    trt = json.loads((out / "tiny-moe-a100-tensorrt" / "manifest.json").read_text())
    assert trt["engine"]["tensorrt"]["status"] == "pending"
    for m in (pack, trt):  # no table has tiny-moe's shapes: defaults, said so, with the tune command
        assert m["kernels"]["sources"] == ["default"] and m["kernels"]["arch"] == "sm_80"
        assert all(k["tune"].startswith("qwen3export tune --target a100") for k in m["kernels"]["kernels"])


def test_inspect_shows_status_files_and_kernel_configs(a100_build, capsys):
    _, out = a100_build
    code, text, _ = cli(capsys, "inspect", out / "tiny-moe-a100-tensorrt")
    assert code == 0 and "engine   tensorrt: PENDING" in text and "missing:" in text
    assert "kernel   fused_moe" in text and "default" in text
    code, text, _ = cli(capsys, "inspect", out / "tiny-moe-a100-kernels", "--json")
    summary = json.loads(text)["engine_summary"]
    assert code == 0 and summary["status"] == "built"
    assert any(f.endswith(".cubin") for f in summary["files"])
    assert {k["kernel"] for k in summary["kernel_configs"]} >= {"attention_decode", "fused_moe", "moe_routing"}


def test_verify_reruns_the_pack_checks_and_catches_tampering(a100_build, capsys):
    _, out = a100_build
    folder = out / "tiny-moe-a100-kernels"
    code, text, err = cli(capsys, "verify", folder, "--json")
    assert code == 0, err
    assert json.loads(text)["passed"]
    cubin = next(folder.rglob("*.cubin"))
    cubin.write_bytes(cubin.read_bytes()[:-16])  # truncated
    code, _, err = cli(capsys, "verify", folder)
    assert code != 0 and cubin.name in err


def test_real_shapes_record_the_targets_modelled_tables():
    entry = kernel_configs(preset("qwen3-30b-a3b"), get_target("a100"), "fp32")
    assert entry["arch"] == "sm_80" and entry["dtype"] == "bf16" and entry["sources"] == ["modelled"]
    assert {k["kernel"] for k in entry["kernels"]} == {"rms_norm", "qk_norm_rope", "attention_prefill",
                                                      "attention_decode", "moe_routing", "moe_align", "fused_moe"}
    for k in entry["kernels"]:
        assert k["table"].startswith("a100/") and k["shipped"]
        table = json.loads((SHIPPED_DIR / k["table"]).read_text())
        assert {b: c["source"] for b, c in k["configs"].items()} == {b: e["source"] for b, e in
                                                                     table["entries"].items()}
    assert kernel_configs(preset("tiny"), get_target("cpu"), "fp32") is None


def test_kernels_backend_needs_a_gpu_target(capsys):
    code, _, err = cli(capsys, "build", "--target", "cpu", "--backend", "kernels")
    assert code == 2 and "kernels" in err and "cpu" in err.strip().splitlines()[-1]
