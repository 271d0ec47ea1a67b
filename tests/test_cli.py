"""End to end through the `qwen3export` CLI: build, run, verify, inspect, targets, and bad input.

Engines are checked against transformers' generate on the same weights (HF's own checkpoint folder,
and presets' random weights written as a HF folder).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import torch
import transformers

import qwen3export
from qwen3export.cli import main
from qwen3export.spec import preset
from qwen3export.weights import RandomSource, save_hf_checkpoint

from hf_reference import save_hf_checkpoint as save_transformers_checkpoint

PROMPT = [151644, 872, 198, 9707, 11, 1879, 0, 151667]


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def hf_generate(folder: Path, prompt: list[int], n: int) -> list[int]:
    cfg = transformers.AutoConfig.from_pretrained(folder)
    cls = transformers.Qwen3MoeForCausalLM if cfg.model_type == "qwen3_moe" else transformers.Qwen3ForCausalLM
    hf = cls.from_pretrained(folder, attn_implementation="eager").eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                          eos_token_id=list(cfg.eos_token_id) if isinstance(cfg.eos_token_id, list) else cfg.eos_token_id,
                          pad_token_id=0)
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    """`qwen3export build` with no options, run from an empty folder: tiny-moe for cpu into ./dist."""
    cwd = tmp_path_factory.mktemp("default")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert main(["build"]) == 0
    finally:
        os.chdir(old)
    return cwd / "dist" / "tiny-moe-cpu-onnx"


@pytest.fixture(scope="module")
def tiny_build(built_artifact):
    return built_artifact("--model", "tiny", "--seed", "1")


@pytest.fixture(scope="module")
def hf_moe_folder(tmp_path_factory):
    """A transformers-written Qwen3-MoE checkpoint (its own save_pretrained), real vocabulary."""
    folder = tmp_path_factory.mktemp("hfmoe")
    save_transformers_checkpoint(preset("tiny-moe").replace(norm_topk_prob=True), folder, seed=5,
                                 max_shard_size="20MB")
    return folder


def test_default_build_layout_and_manifest(default_build):
    m = json.loads((default_build / "manifest.json").read_text())
    assert m["backend"] == "onnx" and m["target"]["name"] == "cpu" and m["dtype"] == "fp32"
    assert m["model"]["spec"]["name"] == "tiny-moe" and m["model"]["ref"] == {
        "kind": "preset", "name": "tiny-moe", "seed": 0, "overrides": {}, "weight_stats": "trained"}
    assert set(m["files"]) == {"decoder.onnx", "sampling.onnx", "tokenizer.json", "tokenizer_config.json",
                               "genai_config.json"}
    assert m["parity"]["sampling"]["identical"] and m["sampling"]["defaults"]["thinking"]["temperature"] == 0.6
    assert m["parity"]["passed"] and m["parity"]["logits_scaled_err"] <= 1e-4 and m["parity"]["greedy_match"]
    assert {"torch", "onnx", "onnxruntime-gpu", "qwen3export"} <= set(m["versions"])
    sess_inputs = [i.name for i in onnx.load(str(default_build / "decoder.onnx"), load_external_data=False).graph.input]
    # the cpu default (ort flavour) decodes over the in-place KV buffer: per-row lengths from the mask, logits_index
    assert m["engine"]["kv_cache"] == "shared_buffer" and sess_inputs == m["engine"]["inputs"]
    assert sess_inputs[:5] == ["input_ids", "position_ids", "attention_mask", "logits_index", "past_key_values.0.key"]
    assert not [p for p in default_build.parent.iterdir() if p.name.startswith(".")]  # no temp leftovers


def test_default_build_runs_like_transformers(default_build, tmp_path, capsys):
    spec = preset("tiny-moe")
    folder = save_hf_checkpoint(spec, RandomSource(spec, seed=0), tmp_path / "hf")
    code, out, _ = cli(capsys, "run", default_build, "--prompt-ids", ",".join(map(str, PROMPT)),
                       "--max-new-tokens", 12, "--greedy", "--json")
    assert code == 0
    assert json.loads(out)["tokens"] == hf_generate(folder, PROMPT, 12)


def test_tiny_build_runs_like_transformers(tiny_build, tmp_path, capsys):
    spec = preset("tiny")
    folder = save_hf_checkpoint(spec, RandomSource(spec, seed=1), tmp_path / "hf")
    code, out, _ = cli(capsys, "run", tiny_build, "--prompt-ids", "5,6,7", "--max-new-tokens", 20, "--greedy", "--json")
    assert code == 0
    assert json.loads(out)["tokens"] == hf_generate(folder, [5, 6, 7], 20)


@pytest.mark.parametrize("sampler_delay_s", [0.0, 0.005])
def test_run_json_timing(tiny_build, sampler_delay_s, monkeypatch, capsys):
    """`run --json` times the run it made: prefill, decode tok/s as the user waits (decoder step + sampling graph
    per token) and the sampling graph's share; a sampler made slower by a known delay shows it there."""
    import time

    from qwen3export.graphs.sampling import SamplingSession

    call = SamplingSession.__call__

    def slow_call(self, *inputs):
        time.sleep(sampler_delay_s)
        return call(self, *inputs)

    monkeypatch.setattr(SamplingSession, "__call__", slow_call)
    n = 12
    t0 = time.perf_counter()
    code, out, _ = cli(capsys, "run", tiny_build, "--prompt-ids", "5,6,7,8", "--max-new-tokens", n, "--greedy",
                       "--no-stop", "--json")
    wall_ms = (time.perf_counter() - t0) * 1e3
    assert code == 0
    result = json.loads(out)
    t = result["timing"]
    assert len(result["tokens"]) == t["new_tokens"] == n
    assert {"prefill_ms", "decode_tokens_per_s", "sampling_ms_per_token"} <= set(t)
    assert all(t[k] > 0 for k in ("prefill_ms", "decode_tokens_per_s", "sampling_ms_per_token", "decoder_step_ms",
                                  "decode_s", "time_to_first_token_ms"))
    assert t["decode_tokens_per_s"] == pytest.approx((n - 1) / t["decode_s"], rel=1e-3)
    # the parts fit inside the whole: prefill + first sampling <= first token; decode spans the other n - 1
    # decoder steps and their sampling; everything inside the wall time of the command
    assert t["prefill_ms"] <= t["time_to_first_token_ms"]
    assert (n - 1) * t["decoder_step_ms"] + (n - 1) * t["sampling_ms_per_token"] <= t["decode_s"] * 1e3 * 1.01 + \
        t["sampling_ms_per_token"]
    assert t["time_to_first_token_ms"] + t["decode_s"] * 1e3 <= wall_ms
    assert t["sampling_ms_per_token"] >= sampler_delay_s * 1e3



def test_build_from_transformers_moe_checkpoint(hf_moe_folder, tmp_path, capsys):
    out_dir = tmp_path / "moe-art"
    code, out, err = cli(capsys, "build", "--model", hf_moe_folder, "--target", "cpu", "--artifact", out_dir, "--json")
    assert code == 0, err
    report = json.loads(out)["artifacts"][0]["parity"]
    assert report["passed"] and report["greedy_tokens_matching"] == 32
    assert "[4/6] emit" in err and "lower: moe: 2 site(s)" in err  # progress on stderr
    code, out, _ = cli(capsys, "run", out_dir, "--prompt-ids", "1,2,3,4", "--max-new-tokens", 16, "--greedy",
                       "--json")
    assert json.loads(out)["tokens"] == hf_generate(hf_moe_folder, [1, 2, 3, 4], 16)


def test_verify_inspect_targets(tiny_build, capsys):
    code, out, _ = cli(capsys, "verify", tiny_build, "--json")
    assert code == 0 and json.loads(out)["passed"]
    code, out, _ = cli(capsys, "inspect", tiny_build, "--json")
    info = json.loads(out)
    assert code == 0 and info["op_counts"]["decoder.onnx"]["MatMul"] > 0
    assert info["files"]["decoder.onnx"]["size"] == (tiny_build / "decoder.onnx").stat().st_size
    code, out, _ = cli(capsys, "inspect", tiny_build)
    assert "sha256" in out and "MatMul" in out
    code, out, _ = cli(capsys, "targets", "--json")
    assert code == 0 and "cpu" in [t["name"] for t in json.loads(out)["targets"]]


def test_every_command_has_help():
    for cmd in ([], ["build"], ["run"], ["verify"], ["inspect"], ["targets"]):
        r = subprocess.run([sys.executable, "-m", "qwen3export.cli", *cmd, "--help"], capture_output=True, text=True)
        assert r.returncode == 0 and "usage: qwen3export" in r.stdout


def _one_line_error(code, err, *needles):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and lines[0].startswith("qwen3export: error: "), err
    assert "Traceback" not in err
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.mark.parametrize("argv,needles", [
    (["build", "--model", "/no/such/folder"], ["/no/such/folder", "does not exist"]),
    (["build", "--model", "qwen3-7b"], ["unknown preset 'qwen3-7b'", "tiny-moe"]),
    (["build", "--target", "tpu9"], ["unknown target 'tpu9'", "cpu"]),
    (["build", "--backend", "coreml"], ["unknown backend 'coreml'", "onnx"]),
    (["build", "--dtype", "bf16"], ["target cpu cannot run dtype bf16", "--dtype fp32"]),
    (["build", "--dtype", "fp8"], ["unknown dtype 'fp8'"]),
    (["build", "--max-seq", "50000"], ["--max-seq 50000 must be in 1..40960"]),
    # 30.5 B parameters in fp32 (~114 GiB) on an 80 GB A100: refused from the plan, before any weight is read
    (["build", "--model", "qwen3-30b-a3b", "--target", "a100"], ["does not fit a100", "--quant int4", "--tp"]),
])
def test_bad_build_input(argv, needles, capsys, tmp_path):
    code, out, err = cli(capsys, *argv, "--out", tmp_path / "o")
    _one_line_error(code, err, *needles)
    assert not (tmp_path / "o").exists()


def test_malformed_config(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"model_type": "qwen3", "hidden_size": ')
    code, _, err = cli(capsys, "build", "--model", tmp_path / "m", "--out", tmp_path / "o")
    _one_line_error(code, err, "config.json is not valid JSON")


@pytest.mark.parametrize("argv,needles", [
    (["--prompt-ids", "1,2,151936"], ["token id 151936 is out of range", "0..151935"]),
    (["--prompt-ids", "-1"], ["token id -1 is out of range"]),
    (["--prompt-ids", ""], ["--prompt-ids is empty"]),
    (["--prompt-ids", "1", "--top-p", "1.5"], ["top_p"]),
    (["--prompt-ids", "1", "--temperature", "-1"], ["temperature"]),
    (["--prompt-ids", "1", "--thinking-budget", "-2"], ["argument --thinking-budget", "-1.."]),
    (["--prompt-ids", "1", "--top-k", "-3"], ["argument --top-k", "0.."]),
    (["--prompt", "hi", "--prompt-ids", "1"], ["exactly one of"]),
    (["--prompt-ids", "1,x"], ["comma-separated integers"]),
    (["--prompt-ids", "1", "--max-new-tokens", "0"], ["argument --max-new-tokens", "1.."]),
    (["--prompt-ids", "1", "--max-new-tokens", "50000"], ["exceeds the model's 40960 positions"]),
    # built without --max-seq: the engine serves min(40960, 8192) tokens per sequence
    (["--prompt-ids", "1,2", "--max-new-tokens", "8191"], ["exceeds the engine's 8192 tokens", "--max-seq"]),
])
def test_bad_run_input(tiny_build, argv, needles, capsys):
    code, out, err = cli(capsys, "run", tiny_build, *argv)
    _one_line_error(code, err, *needles)
    assert out == ""


def test_serving_limits_and_kv_cache_in_manifest(tiny_build):
    """--max-batch/--max-seq (defaults 8 and min(positions, 8192)) with the KV cache they need: K and V per
    layer, kv heads x head_dim fp32 values per token."""
    m = json.loads((tiny_build / "manifest.json").read_text())
    spec = preset("tiny")
    per_token = 2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim * 4
    s = m["serving"]
    assert (s["max_batch"], s["max_seq"], s["figures"]) == (8, 8192, "modelled")
    assert s["kv_cache_bytes_per_token"] == per_token
    assert s["kv_cache_bytes_per_sequence"] == per_token * 8192
    assert s["kv_cache_bytes"] == per_token * 8192 * 8


def test_existing_output_needs_force(tiny_build, capsys):
    before = (tiny_build / "manifest.json").read_bytes()
    code, _, err = cli(capsys, "build", "--model", "tiny", "--artifact", tiny_build)
    _one_line_error(code, err, "already exists", "--force")
    assert (tiny_build / "manifest.json").read_bytes() == before


@pytest.mark.parametrize("damage,needle", [
    (lambda a: (a / "decoder.onnx").write_bytes((a / "decoder.onnx").read_bytes()[:-100]), "decoder.onnx has"),
    (lambda a: _flip_byte(a / "decoder.onnx"), "decoder.onnx does not match its sha256"),
    (lambda a: (a / "decoder.onnx").unlink(), "decoder.onnx is missing"),
    (lambda a: (a / "manifest.json").write_text((a / "manifest.json").read_text().replace('"fp32"', '"fp16"', 1)),
     "manifest.json was modified"),
    (lambda a: (a / "manifest.json").unlink(), "no manifest.json"),
])
def test_tampered_artifact_is_refused(tiny_build, tmp_path, damage, needle, capsys):
    art = tmp_path / "copy"
    shutil.copytree(tiny_build, art)
    damage(art)
    for cmd in (["run", art, "--prompt-ids", "1"], ["verify", art], ["inspect", art]):
        code, _, err = cli(capsys, *cmd)
        _one_line_error(code, err, needle)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_custom_serving_limits_reach_manifest_profiles_and_run(tmp_path, capsys):
    """--max-batch 3 --max-seq 40 (not the defaults): the manifest's serving entry and KV cache, TensorRT's
    optimization profiles (max shapes), and `run`, which serves exactly 40 tokens and refuses 41."""
    code, _, err = cli(capsys, "build", "--model", "tiny", "--target", "a100", "--backend", "onnx,tensorrt",
                       "--max-batch", "3", "--max-seq", "40", "--out", tmp_path)
    assert code == 3, err  # TensorRT pending (no TensorRT here), everything else built and verified
    spec = preset("tiny")
    per_token = 2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim * 4
    onnx_art, trt_art = tmp_path / "tiny-a100-onnx", tmp_path / "tiny-a100-tensorrt"
    for folder in (onnx_art, trt_art):
        s = json.loads((folder / "manifest.json").read_text())["serving"]
        assert (s["max_batch"], s["max_seq"]) == (3, 40)
        assert s["kv_cache_bytes"] == per_token * 40 * 3
    profiles = json.loads((trt_art / "tensorrt" / "build.json").read_text())["profiles"]
    assert profiles["input_ids"][2] == [3, 40]
    assert profiles["past_key_values.0.key"][2] == [3, spec.num_key_value_heads, 39, spec.head_dim]
    prompt = ",".join(str(i) for i in range(1, 31))
    code, out, err = cli(capsys, "run", onnx_art, "--prompt-ids", prompt, "--max-new-tokens", "10", "--greedy",
                         "--no-stop", "--json")
    assert code == 0, err
    assert len(json.loads(out)["tokens"]) == 10
    code, _, err = cli(capsys, "run", onnx_art, "--prompt-ids", prompt, "--max-new-tokens", "11")
    _one_line_error(code, err, "exceeds the engine's 40 tokens per sequence", "--max-seq 40")


def test_weight_stats_small_by_name_is_recorded_and_verified(tmp_path, capsys):
    """--weight-stats small keeps the first wave's N(0, 0.02) draw: recorded in the manifest, so verify redraws
    the same weights; its logits are near zero, the trained default's are not."""
    out = tmp_path / "small"
    code, _, err = cli(capsys, "build", "--model", "tiny", "--weight-stats", "small", "--artifact", out)
    assert code == 0, err
    m = json.loads((out / "manifest.json").read_text())
    assert m["model"]["ref"]["weight_stats"] == "small"
    code, out_text, err = cli(capsys, "verify", out, "--json")
    assert code == 0 and json.loads(out_text)["passed"], err
    small = qwen3export.load_model("tiny", weight_stats="small")
    trained = qwen3export.load_model("tiny")
    ids = torch.tensor([[5, 9, 100]])
    with torch.no_grad():
        ls = small(ids, torch.arange(3)[None], torch.ones_like(ids), small.empty_cache(1))[0]
        lt = trained(ids, torch.arange(3)[None], torch.ones_like(ids), trained.empty_cache(1))[0]
    assert ls.abs().max() < 2 and lt.abs().max() > 15
