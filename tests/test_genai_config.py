"""genai_config.json in ONNX artifacts (backends/genai_config.py): its name mapping against the decoder's
interface, and ONNX Runtime GenAI's own generator against `qwen3export run --greedy`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from qwen3export.backends import onnx as onnx_backend
from qwen3export.backends.genai_config import GENAI_CONFIG_FILE, genai_config, write_genai_config
from qwen3export.cache_engine import LOGITS_INDEX
from qwen3export.spec import preset

ROOT = Path(__file__).resolve().parents[1]


def expand(pattern: str, layers: int) -> list[str]:
    return [pattern % i for i in range(layers)]


@pytest.mark.parametrize("kv_cache", [onnx_backend.CONCAT, onnx_backend.SHARED_BUFFER])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_mapping_names_the_decoder_interface(name, kv_cache, tmp_path):
    spec = preset(name)
    inputs, outputs = onnx_backend.io_names(spec, kv_cache)
    entry = {"file": "decoder.onnx", "inputs": inputs, "outputs": outputs, "kv_cache": kv_cache}
    cfg = genai_config(spec, entry, max_seq=321)
    dec = cfg["model"]["decoder"]
    n = spec.num_hidden_layers
    mapped_in = [v for k, v in dec["inputs"].items() if not k.endswith("_names")]
    # every input GenAI must feed is mapped; the shared-buffer decoder's logits_index is optional (unfed: every
    # position), and GenAI has no key for it
    required = set(inputs) - ({LOGITS_INDEX} if kv_cache == onnx_backend.SHARED_BUFFER else set())
    assert set(mapped_in) | set(expand(dec["inputs"]["past_key_names"], n)) | \
        set(expand(dec["inputs"]["past_value_names"], n)) == required
    assert {"attention_mask", "position_ids"} <= set(mapped_in)
    assert {dec["outputs"]["logits"], *expand(dec["outputs"]["present_key_names"], n),
            *expand(dec["outputs"]["present_value_names"], n)} == set(outputs)
    assert (cfg["model"]["type"], cfg["model"]["context_length"], cfg["search"]["max_length"]) == ("qwen3", 321, 321)
    # the in-place cache: GenAI binds past and present to one buffer, as our CacheEngine does
    assert cfg["search"]["past_present_share_buffer"] is (kv_cache == onnx_backend.SHARED_BUFFER)
    assert (dec["num_hidden_layers"], dec["num_key_value_heads"], dec["head_size"]) == \
        (n, spec.num_key_value_heads, spec.head_dim)
    eos = cfg["model"]["eos_token_id"]
    assert set(eos if isinstance(eos, list) else [eos]) == set(spec.eos_token_ids)
    written = write_genai_config(spec, dict(entry), tmp_path, 321)
    assert written["genai_config"] == GENAI_CONFIG_FILE and "genai_unsupported" not in written
    assert json.loads((tmp_path / GENAI_CONFIG_FILE).read_text()) == cfg


def genai_python() -> Path:
    """An interpreter with onnxruntime-genai (it needs the CPU `onnxruntime`, which conflicts with our
    onnxruntime-gpu): benchmarks/.peer-venv when benchmarks/peer_env.py made it, else a small venv of its
    own (only onnxruntime-genai and onnxruntime, at peer_env's pinned versions) under the user cache."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import peer_env
    finally:
        sys.path.pop(0)
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
import numpy as np
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
prompt, n = json.loads(sys.argv[2]), int(sys.argv[3])
params = og.GeneratorParams(model)
params.set_search_options(do_sample=False, max_length=len(prompt) + n)
gen = og.Generator(model, params)
gen.append_tokens(prompt)
out, logits = [], []
while not gen.is_done() and len(out) < n:
    logits.append(np.asarray(gen.get_logits(), np.float32).reshape(-1))  # what this step chooses from
    gen.generate_next_token()
    out.append(int(gen.get_next_tokens()[0]))
np.save(sys.argv[4], np.stack(logits))
print(json.dumps(out))
"""

BUILDS = {  # the default CPU decoder (ort flavour: in-place cache) dense, MoE and int4; the concat-cache one
    "tiny": ("--model", "tiny", "--seed", "1"),
    "tiny-moe": ("--model", "tiny-moe", "--seed", "0"),
    "tiny-moe-int4": ("--model", "tiny-moe", "--seed", "0", "--quant", "int4", "--group-size", "32"),
    "tiny-standard": ("--model", "tiny", "--seed", "1", "--onnx-ops", "standard"),
}


@pytest.mark.integration
@pytest.mark.parametrize("build", list(BUILDS))
def test_genai_generator_matches_run_greedy(build, built_artifact, tmp_path, capsys):
    from qwen3export import artifact as art
    from qwen3export.cli import main
    from qwen3export.generation import greedy_generate
    from qwen3export.runner import open_engine

    path = built_artifact(*BUILDS[build], "--max-seq", "64")
    manifest = json.loads((path / "manifest.json").read_text())
    engine = manifest["engine"]
    assert engine["genai_config"] == GENAI_CONFIG_FILE and GENAI_CONFIG_FILE in manifest["files"]
    assert engine["kv_cache"] == (onnx_backend.CONCAT if build.endswith("standard") else onnx_backend.SHARED_BUFFER)
    cfg = json.loads((path / GENAI_CONFIG_FILE).read_text())
    assert cfg["model"]["context_length"] == manifest["serving"]["max_seq"] == 64
    assert cfg["search"]["past_present_share_buffer"] is (engine["kv_cache"] == onnx_backend.SHARED_BUFFER)

    prompt, n = [9707, 11, 1879, 0, 5, 6, 7], 12
    capsys.readouterr()
    assert main(["run", str(path), "--json", "--prompt-ids", ",".join(map(str, prompt)), "--greedy",
                 "--max-new-tokens", str(n), "--no-stop"]) == 0
    ours = json.loads(capsys.readouterr().out)["tokens"]

    python = genai_python()
    proc = subprocess.run([str(python), "-c", GENAI_GREEDY, str(path), json.dumps(prompt), str(n),
                           str(tmp_path / "logits.npy")], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    theirs = json.loads(proc.stdout.strip().splitlines()[-1])
    # GenAI stops at an eos token (our --no-stop does not): compare what it produced
    assert theirs and theirs == ours[:len(theirs)], (theirs, ours)
    assert len(theirs) == n or theirs[-1] in manifest["model"]["spec"]["eos_token_ids"]

    # the tiny dense preset's greedy text repeats one token, which a wrong cache could repeat too: GenAI's logits
    # at every step, which depend on the whole cache, must be our engine's at the same step
    ids = torch.tensor([prompt])
    decoder = open_engine(art.load_artifact(path), threads=1)
    steps = greedy_generate(decoder, decoder.empty_cache(1), ids, torch.ones_like(ids), len(theirs),
                            keep_logits=True)[2]
    expected = torch.cat(steps).numpy()
    got = np.load(tmp_path / "logits.npy")
    assert got.shape == expected.shape
    scale = max(1.0, float(np.abs(expected).max()))
    assert float(np.abs(got - expected).max()) / scale < 1e-4, float(np.abs(got - expected).max())
