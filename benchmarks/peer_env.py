"""The peer of benchmarks/decode_cpu.py: ONNX Runtime GenAI, in a virtual environment of its own.

onnxruntime-genai needs the CPU `onnxruntime` package, while this project depends on `onnxruntime-gpu`, and both
install the module `onnxruntime`: the peer cannot share our environment. `peer_python()` makes
benchmarks/.peer-venv (git-ignored) with the pinned versions below on a fresh machine (PyPI, and torch from a
local wheel where one lies in /opt/wheels or $PEER_TORCH_WHEEL: PyPI's Linux torch is a multi-GB CUDA build), and
reuses it when the installed versions match. The peer's model builder reads the same Hugging Face folder as our
build (`write_hf_folder`: seeded weights with the presets' statistics, written once), and its generator runs in a
worker process of that environment (benchmarks/peer_worker.py) that decode_cpu.py steps interleaved with ours.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
VENV = HERE / ".peer-venv"
WORKER = HERE / "peer_worker.py"
# the versions the benchmark was written against (issue 18's figures: ORT GenAI 0.18); torch and transformers
# are what the builder imports to read the checkpoint, onnx / onnx-ir what it writes the model with
PINS = {"onnxruntime-genai": "0.18.0", "onnxruntime": "1.31.1", "onnx": "1.23.2", "onnx-ir": "1.1.0",
        "transformers": "5.24.0", "torch": "2.13.0"}
TORCH_WHEELS = Path("/opt/wheels")


class PeerSetupError(RuntimeError):
    """The peer's environment or model could not be made; the message names the step and its output's tail."""


def _run(cmd: list[str], what: str, **kw) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kw)
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-15:])
        raise PeerSetupError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return proc


def installed_versions(python: Path) -> dict[str, str | None]:
    """The versions of PINS' packages installed for `python` (None where missing)."""
    code = ("import importlib.metadata as m, json, sys\n"
            "def v(n):\n    try:\n        return m.version(n).split('+')[0]\n    except m.PackageNotFoundError:\n"
            "        return None\n"
            f"print(json.dumps({{n: v(n) for n in {list(PINS)!r}}}))")
    return json.loads(_run([str(python), "-c", code], "reading the peer environment's versions").stdout)


def torch_requirement() -> str:
    """A local torch wheel of the pinned version if there is one, else the PyPI requirement."""
    wheel = os.environ.get("PEER_TORCH_WHEEL")
    if wheel:
        return wheel
    local = sorted(TORCH_WHEELS.glob(f"torch-{PINS['torch']}*cp{sys.version_info.major}{sys.version_info.minor}*.whl"))
    return str(local[0]) if local else f"torch=={PINS['torch']}"


def peer_python(venv: Path = VENV, progress=print) -> Path:
    """The peer environment's interpreter: made with `python -m venv` and pip on first use, the pinned
    versions (re)installed when they differ."""
    python = venv / "bin" / "python"
    if not python.is_file():
        progress(f"peer: creating {venv}")
        _run([sys.executable, "-m", "venv", str(venv)], "python -m venv")
    if installed_versions(python) == PINS:
        return python
    reqs = [torch_requirement() if n == "torch" else f"{n}=={v}" for n, v in PINS.items()]
    progress(f"peer: pip install {' '.join(reqs)} (minutes on first use)")
    _run([str(python), "-m", "pip", "install", "--disable-pip-version-check", "-q", *reqs], "pip install")
    got = installed_versions(python)
    if got != PINS:
        raise PeerSetupError(f"the peer environment has {got} after pip install, expected {PINS}")
    return python


def write_hf_folder(spec, folder: Path, seed: int, stats: str, progress=print) -> Path:
    """A Hugging Face checkpoint folder (config.json, model.safetensors) with the preset's seeded weights
    (`RandomSource(spec, seed, stats)`: what `build --model PRESET --seed --weight-stats` builds from), written
    by transformers' save_pretrained once; reused when its config matches."""
    import torch
    import transformers

    from qwen3export.model import build_module
    from qwen3export.weights import RandomSource

    stamp = folder / "bench_source.json"
    want = {"spec": spec.to_dict(), "seed": seed, "weight_stats": stats}
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return folder
    progress(f"writing the Hugging Face folder {folder}")
    cfg_cls, model_cls = ((transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM) if spec.is_moe
                          else (transformers.Qwen3Config, transformers.Qwen3ForCausalLM))
    cfg = cfg_cls(**{k: v for k, v in spec.to_hf_config().items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = model_cls(cfg)
    ours = build_module(spec, RandomSource(spec, seed, stats), torch.float32)
    hf.load_state_dict(ours.state_dict(), assign=True, strict=False)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=cfg)  # its buffers were left on meta
    folder.mkdir(parents=True, exist_ok=True)
    hf.save_pretrained(folder)
    del hf, ours
    stamp.write_text(json.dumps(want))
    return folder


def peer_input_folder(hf_folder: Path) -> Path:
    """The builder's input: the HF folder's files (symlinks: the same weights) plus a small byte-level BPE
    tokenizer. The builder saves a tokenizer with the model and refuses a folder without one; the benchmark
    feeds token ids, so the tokenizer is never used. Kept out of our folder: our build would tokenize its
    early-stop sequence with it and so change our sampling graph."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    folder = hf_folder.with_name(hf_folder.name + "-genai-input")
    folder.mkdir(parents=True, exist_ok=True)
    for f in hf_folder.iterdir():
        link = folder / f.name
        if not link.exists():
            link.symlink_to(f.resolve())
    if not (folder / "tokenizer.json").is_file():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 10, trainers.BpeTrainer(
            vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
        tok.save(str(folder / "tokenizer.json"))
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}))
    return folder


def build_peer_model(python: Path, hf_folder: Path, out: Path, precision: str, threads: int,
                     progress=print) -> tuple[Path, float | None]:
    """The peer's CPU model (`python -m onnxruntime_genai.models.builder -i FOLDER -o OUT -p PRECISION -e cpu`,
    the builder's defaults otherwise) -> (folder, build seconds or None when reused); the session's
    intra-op threads set to `threads` in its genai_config.json."""
    stamp = out / "bench_source.json"
    want = {"hf": json.loads((hf_folder / "bench_source.json").read_text()), "precision": precision,
            "pins": PINS}
    seconds = None
    if not (stamp.is_file() and json.loads(stamp.read_text()) == want and (out / "genai_config.json").is_file()):
        progress(f"peer: building its {precision} CPU model in {out}")
        t0 = time.perf_counter()
        _run([str(python), "-m", "onnxruntime_genai.models.builder", "-i", str(peer_input_folder(hf_folder)),
              "-o", str(out), "-p", precision, "-e", "cpu", "-c", str(out.with_name(out.name + "-cache"))],
             f"the peer's model builder ({precision})")
        seconds = time.perf_counter() - t0
        stamp.write_text(json.dumps(want))
    config_path = out / "genai_config.json"
    config = json.loads(config_path.read_text())
    opts = config["model"]["decoder"].setdefault("session_options", {})
    if opts.get("intra_op_num_threads") != threads:
        opts["intra_op_num_threads"] = threads
        config_path.write_text(json.dumps(config, indent=4))
    return out, seconds


def model_op_counts(path: Path) -> dict:
    """Node count (subgraphs included), MatMul / MatMulNBits counts and MatMulNBits accuracy levels of an ONNX
    model: a file, or a folder's model.onnx (the peer's)."""
    import onnx

    model = onnx.load(str(path / "model.onnx" if path.is_dir() else path), load_external_data=False)
    nodes, stack = [], [model.graph]
    while stack:
        graph = stack.pop()
        for n in graph.node:
            nodes.append(n)
            stack.extend([a.g for a in n.attribute if a.HasField("g")] + [g for a in n.attribute for g in a.graphs])
    levels = sorted({a.i for n in nodes if n.op_type == "MatMulNBits" for a in n.attribute
                     if a.name == "accuracy_level"})
    return {"nodes": len(nodes), "MatMul": sum(n.op_type == "MatMul" for n in nodes),
            "MatMulNBits": sum(n.op_type == "MatMulNBits" for n in nodes), "matmulnbits_accuracy_levels": levels}


class PeerGenerator:
    """ONNX Runtime GenAI's generator over one model folder, in a worker process of the peer environment;
    JSON lines over its stdin / stdout (benchmarks/peer_worker.py)."""

    def __init__(self, python: Path, model: Path, threads: int):
        self.proc = subprocess.Popen([str(python), str(WORKER), str(model), str(threads)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.info = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise PeerSetupError(f"the peer worker exited (code {self.proc.wait()}); its stderr is above")
        reply = json.loads(line)
        if "error" in reply:
            raise PeerSetupError(f"peer worker: {reply['error']}")
        return reply

    def generate(self, prompt: list[int], new_tokens: int) -> tuple[float, float, list[int]]:
        """-> (prefill seconds, decode seconds for new_tokens - 1 tokens, new token ids), greedy."""
        self.proc.stdin.write(json.dumps({"prompt": prompt, "new_tokens": new_tokens}) + "\n")
        r = self._reply()
        return r["prefill_s"], r["decode_s"], r["tokens"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.close()
            self.proc.wait(timeout=60)
