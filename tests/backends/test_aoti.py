"""--backend aoti for target cpu: AOTInductor packages of decoder and sampling graph, built here, run through
torch._inductor.aoti_load_package, passing the same parity gate as ONNX (~1 min of compile per build)."""

from __future__ import annotations

import json

from qwen3export.cli import main


def test_cpu_onnx_and_aoti_build_verify_and_agree(tmp_path, capsys):
    out = tmp_path / "arts"
    assert main(["build", "--model", "tiny-moe", "--backend", "onnx,aoti", "--out", str(out), "--json"]) == 0
    arts = {a["backend"]: a for a in json.loads(capsys.readouterr().out)["artifacts"]}
    assert set(arts) == {"onnx", "aoti"}
    aoti = out / "tiny-moe-cpu-aoti"
    manifest = json.loads((aoti / "manifest.json").read_text())
    assert {"decoder.pt2", "sampling.pt2", "sampling.onnx"} <= set(manifest["files"])
    p = manifest["parity"]
    assert p["passed"] and p["greedy_match"] and p["logits_scaled_err"] <= 1e-4 and p["sampling"]["identical"]
    # AOTInductor compiles the unlowered program (lowering.UNLOWERED says why); ONNX the lowered one
    assert manifest["lowering"]["enabled"] is False and set(manifest["lowering"]["passes"].values()) == {0}
    assert manifest["lowering"]["onnx_ops"] is None and "unlowered" in manifest["lowering"]["notes"][0]
    lowering = json.loads((out / "tiny-moe-cpu-onnx" / "manifest.json").read_text())["lowering"]
    assert lowering["enabled"] and lowering["passes"]["moe"] == 2 and lowering["onnx_ops"] == "ort"
    tokens = {}
    for backend in ("onnx", "aoti"):
        assert main(["run", str(out / f"tiny-moe-cpu-{backend}"), "--prompt-ids", "9,8,7,151667",
                     "--thinking-budget", "3", "--seed", "5", "--max-new-tokens", "10", "--json"]) == 0
        tokens[backend] = json.loads(capsys.readouterr().out)["tokens"]
    assert tokens["onnx"] == tokens["aoti"]  # same weights, same sampling graph, same uniforms
    assert main(["verify", str(aoti)]) == 0


def test_aoti_for_gpu_target_needs_a_gpu(capsys, tmp_path):
    from qwen3export.targets import TARGETS

    gpu = next((name for name, t in TARGETS.items() if t.kind == "gpu" and "aoti" in t.backends), None)
    if gpu is None:  # GPU targets arrive with the targets table; nothing to check before they exist
        return
    assert main(["build", "--target", gpu, "--backend", "aoti", "--out", str(tmp_path / "x")]) == 2
    assert "needs a CUDA GPU" in capsys.readouterr().err
