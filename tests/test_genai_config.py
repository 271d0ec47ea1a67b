"""genai_config.json in ONNX artifacts (backends/genai_config.py): its name mapping against the decoder's
interface, and ONNX Runtime GenAI's own generator against `qwen3export run --greedy`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from qwen3export.backends import onnx as onnx_backend
from qwen3export.backends.genai_config import GENAI_CONFIG_FILE, genai_config, write_genai_config
from qwen3export.spec import preset

ROOT = Path(__file__).resolve().parents[1]


def expand(pattern: str, layers: int) -> list[str]:
    return [pattern % i for i in range(layers)]


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_mapping_names_the_concat_interface(name, tmp_path):
    spec = preset(name)
    inputs, outputs = onnx_backend.io_names(spec, onnx_backend.CONCAT)
    entry = {"file": "decoder.onnx", "inputs": inputs, "outputs": outputs, "kv_cache": onnx_backend.CONCAT}
    cfg = genai_config(spec, entry, max_seq=321)
    dec = cfg["model"]["decoder"]
    n = spec.num_hidden_layers
    mapped_in = [v for k, v in dec["inputs"].items() if not k.endswith("_names")]
    assert set(mapped_in) | set(expand(dec["inputs"]["past_key_names"], n)) | \
        set(expand(dec["inputs"]["past_value_names"], n)) == set(inputs)
    assert {dec["outputs"]["logits"], *expand(dec["outputs"]["present_key_names"], n),
            *expand(dec["outputs"]["present_value_names"], n)} == set(outputs)
    assert (cfg["model"]["type"], cfg["model"]["context_length"], cfg["search"]["max_length"]) == ("qwen3", 321, 321)
    assert cfg["search"]["past_present_share_buffer"] is False
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == \
        (n, spec.num_key_value_heads, spec.head_dim)
    eos = cfg["model"]["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == set(spec.eos_token_ids)
    written = write_genai_config(spec, dict(entry), tmp_path, 321)
    assert written["genai_config"] == GENAI_CONFIG_FILE
    assert json.loads((tmp_path / GENAI_CONFIG_FILE).read_text()) == cfg


def test_shared_buffer_says_why_instead(tmp_path):
    spec = preset("tiny")
    inputs, outputs = onnx_backend.io_names(spec, onnx_backend.SHARED_BUFFER)
    entry = write_genai_config(spec, {"file": "decoder.onnx", "inputs": inputs, "outputs": outputs,
                                      "kv_cache": onnx_backend.SHARED_BUFFER}, tmp_path, 64)
    assert "genai_config" not in entry and "--onnx-ops standard" in entry["genai_unsupported"]
    assert not (tmp_path / GENAI_CONFIG_FILE).exists()


def load_peer_env():
    """benchmarks/peer_env.py (the peer's pinned versions and venv), imported in the calling thread."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peer_env
    finally:
        sys.path.pop(0)
    return peer_env


def genai_python(peer_env) -> Path:
    """An interpreter with onnxruntime-genai (it needs the CPU `onnxruntime`, which conflicts with our
    onnxruntime-gpu): benchmarks/.peer-venv when benchmarks/peer_env.py made it, else a small venv of its
    own (only onnxruntime-genai and onnxruntime, at peer_env's pinned versions) under the user cache.
    Subprocesses only (venv, pip), so the test can run it in a thread beside its build."""
    pins = {k: peer_env.PINS[k] for k in ("onnxruntime-genai", "onnxruntime")}
    check = "import onnxruntime_genai"
    peer = peer_env.VENV / "bin" / "python"
    if peer.is_file() and subprocess.run([str(peer), "-c", check], capture_output=True).returncode == 0:
        return peer
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qwen3export" / "genai-venv"
    python = cache / "bin" / "python"
    if not python.is_file():
        subprocess.run([sys.executable, "-m", "venv", str(cache)], check=True, capture_output=True)
    if subprocess.run([str(python), "-c", check], capture_output=True).returncode != 0:
        proc = subprocess.run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
                               *(f"{k}=={v}" for k, v in pins.items())], capture_output=True, text=True,
                              timeout=600)
        if proc.returncode != 0:
            # the peer's wheel comes from PyPI: without a registry (an offline developer machine) this test cannot
            # run; CI reaches PyPI, so there a failed install is a failure, never a skip
            reason = f"onnxruntime-genai cannot be installed here (no PyPI?): {proc.stderr.strip()[-300:]}"
            if os.environ.get("CI"):
                pytest.fail(reason)
            pytest.skip(reason)
    return python


GENAI_GREEDY = r"""
import json, sys
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
prompt, n = json.loads(sys.argv[2]), int(sys.argv[3])
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(prompt) + n)
gen = og.Generator(model, params)
gen.append_tokens(prompt)
out = []
while not gen.is_done() and len(out) < n:
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
print(json.dumps(out))
"""


@pytest.mark.integration
def test_genai_generator_matches_run_greedy(built_artifact, capsys):
    from qwen3export.cli import main

    # the peer's interpreter is made in a thread beside the build and `run` below: on a fresh machine that is a
    # venv and a pip install (~36 s, mostly download and unpacking) next to CPU-bound work. peer.result() raises
    # its skip (offline) or failure (under CI) where the serial call stood, after our own checks have run
    with ThreadPoolExecutor(1) as pool:
        peer = pool.submit(genai_python, load_peer_env())
        art = built_artifact("--model", "tiny", "--seed", "1", "--onnx-ops", "standard", "--max-seq", "64")
        manifest = json.loads((art / "manifest.json").read_text())
        assert manifest["engine"]["genai_config"] == GENAI_CONFIG_FILE and GENAI_CONFIG_FILE in manifest["files"]
        cfg = json.loads((art / GENAI_CONFIG_FILE).read_text())
        assert cfg["model"]["context_length"] == manifest["serving"]["max_seq"] == 64

        prompt, n = [9707, 11, 1879, 0, 5, 6, 7], 12
        capsys.readouterr()
        assert main(["run", str(art), "--json", "--prompt-ids", ",".join(map(str, prompt)), "--greedy",
                     "--max-new-tokens", str(n), "--no-stop"]) == 0
        ours = json.loads(capsys.readouterr().out)["tokens"]
        python = peer.result()

    proc = subprocess.run([str(python), "-c", GENAI_GREEDY, str(art), json.dumps(prompt), str(n)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    # GenAI stops at an eos token (our --no-stop does not): compare what it produced
    assert theirs and theirs == ours[:len(theirs)], (theirs, ours)
    assert len(theirs) == n or theirs[-1] in manifest["model"]["spec"]["eos_token_ids"]
