"""`qwen3export kernels compile`: real cross-compilation (triton.compile + GPUTarget, cuobjdump) from the CLI."""

from __future__ import annotations

import json

from qwen3export.cli import main


def test_kernels_compile_defaults_json(capsys):
    assert main(["kernels", "compile", "--target", "sm_80", "--defaults-only", "--json", "--workers", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arch"] == "sm_80"
    assert set(out["summary"]) >= {"rms_norm", "qk_norm_rope", "attention_prefill", "attention_decode",
                                   "moe_routing", "moe_align", "fused_moe"}
    for rec in out["records"]:
        assert rec["arch"] == "sm_80" and rec["valid"] and rec["spill_bytes"] == 0
        assert 0 < rec["registers"] <= 255 and rec["shared_bytes"] <= 163 * 1024


def test_kernels_compile_bad_target(capsys):
    assert main(["kernels", "compile", "--target", "cpu"]) == 2
    assert "is not a GPU" in capsys.readouterr().err
    assert main(["kernels", "compile", "--target", "sm_70"]) == 2
    assert "sm_70" in capsys.readouterr().err
