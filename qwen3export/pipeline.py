"""The build pipeline: one ordered list of stages, load -> capture -> emit -> verify -> seal.

Each stage takes values and returns new ones; the CLI and CI call `build`. Progress goes to a
callback (the CLI prints it to stderr so `--json` output stays clean).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from qwen3export.targets import get_target

from . import artifact as art
from .backends import onnx as onnx_backend
from .capture import capture
from qwen3export.graphs.sampling import capture_sampling
from .errors import InputError, ParityError, TargetError
from .model import DEFAULT_SEED, ModelRef, build_module, resolve, resolve_ref
from .parity import check_parity, check_sampling_parity, summary_line
from .runner import available_providers, open_engine
from .spec import ModelSpec
from .weights import parse_dtype

BACKENDS = ("onnx", "aoti", "tensorrt")
Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildOptions:
    model: str = "tiny-moe"
    target: str = "cpu"
    backends: tuple[str, ...] = ("onnx",)
    dtype: str = "fp32"
    out: Path | None = None  # artifact folder (one backend) or parent folder (several); default ./dist
    force: bool = False
    seed: int = DEFAULT_SEED
    dump_ir: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # preset field overrides
    max_batch: int = 8  # TensorRT optimization-profile maximum
    max_seq: int | None = None  # TensorRT profile maximum (default: min(model positions, 8192))


@dataclass
class BuildResult:
    path: Path
    manifest: dict[str, Any]


def artifact_name(spec: ModelSpec, target: str, backend: str) -> str:
    return f"{spec.name.lower()}-{target}-{backend}"


def output_folder(opts: BuildOptions, spec: ModelSpec, target: str, backend: str) -> Path:
    """--out names the artifact folder for one backend, the parent folder for several; default ./dist/<name>."""
    if opts.out is not None and len(opts.backends) == 1:
        return opts.out
    return (opts.out or Path("dist")) / artifact_name(spec, target, backend)


class _Stages:
    """Numbered progress lines with timings: `[2/4] capture: torch.export ... done in 3.1 s`."""

    def __init__(self, total: int, progress: Progress):
        self.total, self.progress, self.n = total, progress, 0

    def run(self, name: str, what: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        self.progress(f"[{self.n}/{self.total}] {name}: {what} ...")
        t0 = time.perf_counter()
        out = fn()
        self.progress(f"[{self.n}/{self.total}] {name}: done in {time.perf_counter() - t0:.1f} s")
        return out


def _dump(folder: Path | None, name: str, text: str) -> None:
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def check_options(opts: BuildOptions):
    """Validate target, backends and dtype before any weight is read."""
    target = get_target(opts.target)
    if not opts.backends:
        raise TargetError("no backend given; pass --backend onnx")
    for b in opts.backends:
        if b not in BACKENDS:
            raise TargetError(f"unknown backend {b!r}; known backends: {', '.join(BACKENDS)}")
        target.check_backend(b)
        if b == "aoti":
            from .backends.aoti import check_can_build

            check_can_build(target)
        if b == "tensorrt" and target.kind != "gpu":
            raise TargetError(f"--backend tensorrt needs an NVIDIA GPU target, not {target.name}")
    parse_dtype(opts.dtype)
    target.check_dtype(opts.dtype)
    if opts.dtype != "fp32" and set(opts.backends) & {"onnx", "aoti"}:
        raise TargetError(f"--dtype {opts.dtype} engines for onnx/aoti can only be verified on the target's GPU, and "
                          "parity is checked before an artifact is written: build fp32 here, or use --backend "
                          "tensorrt (fp32 ONNX verified here, precision set by TensorRT's builder flags)")
    return target


def build(opts: BuildOptions, progress: Progress = lambda s: None) -> list[BuildResult]:
    target = check_options(opts)
    spec, source, ref = resolve(opts.model, opts.seed, **opts.overrides)
    outs = {b: output_folder(opts, spec, target.name, b) for b in opts.backends}
    for out in outs.values():  # refuse before spending minutes on a build
        if out.exists() and not opts.force:
            raise InputError(f"output folder {out} already exists; pass --force to replace it or choose --out")
    stages = _Stages(2 + 3 * len(opts.backends), progress)

    # 1. load: weights streamed tensor by tensor into the module (see weights.py)
    # engines are verified here in fp32; TensorRT lowers precision through its builder flags
    module = stages.run("load", f"{source.description} as fp32", lambda: build_module(spec, source, torch.float32))
    # 2. capture: one ExportedProgram for prefill and decode
    ep = stages.run("capture", "torch.export (dynamic batch, sequence, cache length)", lambda: capture(module))
    _dump(opts.dump_ir, "01-capture.txt", str(ep.graph_module.code))
    sampling_ep = capture_sampling(sampling_graph_for(spec, ref))

    results = []
    for backend in opts.backends:
        out = outs[backend]
        with art.staging(out, opts.force) as tmp:
            manifest = art.default_manifest(
                model={"ref": ref.to_dict(), "spec": spec.to_dict(), "param_count": spec.param_count()},
                target=target.to_dict(), backend=backend, dtype="fp32")
            # 3. emit
            # the sampling graph (thinking control baked in) ships beside every decoder
            manifest["sampling"] = emit_sampling(spec, ref, tmp, sampling_ep)
            manifest["engine"] = stages.run("emit", f"{backend} engine -> {out}",
                                            lambda: emit_engine(backend, ep, sampling_ep, spec, tmp, opts, target))
            # 4. verify: the engine against eager PyTorch on the same weights
            report = stages.run("verify", "parity against eager PyTorch",
                                lambda: verify_engine(art.Artifact(tmp, manifest), module))
            progress(summary_line(report))
            if not report["passed"]:
                raise ParityError(f"engine failed the parity gate ({'; '.join(report['failures'])}); no artifact "
                                  "was written: report this with --debug output")
            manifest["parity"] = report
            # 5. seal: checksums of every file into the manifest, then the atomic rename
            stages.run("seal", "checksums + manifest", lambda: art.seal(tmp, manifest))
        results.append(BuildResult(out, manifest))
    return results


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json")


def _source_folder(ref: ModelRef) -> Path | None:
    return Path(ref.name) if ref.kind == "folder" else None


def sampling_graph_for(spec: ModelSpec, ref: ModelRef):
    """The sampling graph with the early-stop sequence tokenized by the checkpoint's tokenizer, if any."""
    from qwen3export.graphs.sampling import SamplingGraph, SamplingVocab, early_stop_ids

    src = _source_folder(ref)
    tokenizer = None
    if src is not None and (src / "tokenizer.json").is_file():
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(src / "tokenizer.json"))
    vocab = SamplingVocab.from_spec(spec)
    if not vocab.has_thinking:  # no <think>/</think> in this vocabulary: thinking control does not apply
        return SamplingGraph(vocab)
    return SamplingGraph(vocab, early_stop_ids(tokenizer, vocab))


def emit_sampling(spec: ModelSpec, ref: ModelRef, folder: Path, sampling_ep) -> dict[str, Any]:
    """The sampling graph as sampling.onnx, plus the checkpoint's tokenizer, chat template and
    generation_config copied beside it; returns the manifest's `sampling` entry."""
    import shutil

    from qwen3export.graphs.sampling import SAMPLING_FILE, emit_sampling_onnx, read_generation_config, sampling_defaults

    src = _source_folder(ref)
    copied = [f for f in TOKENIZER_FILES if src is not None and (src / f).is_file()]
    for f in copied:
        shutil.copy2(src / f, folder / f)
    entry = emit_sampling_onnx(sampling_graph_for(spec, ref), folder / SAMPLING_FILE, sampling_ep)
    entry["defaults"] = sampling_defaults(read_generation_config(src) if src is not None else None)
    entry["tokenizer_files"] = copied
    return entry


def emit_engine(backend: str, ep, sampling_ep, spec: ModelSpec, folder: Path, opts: BuildOptions | None = None,
                target=None) -> dict[str, Any]:
    if backend == "onnx":
        return onnx_backend.emit_decoder(ep, spec, folder)
    if backend == "tensorrt":
        from .backends import tensorrt as trt_backend

        entry = onnx_backend.emit_decoder(ep, spec, folder)
        max_seq = opts.max_seq or min(spec.max_positions, 8192)
        trt_backend.write_settings(folder, trt_backend.settings(spec, target, opts.dtype, opts.max_batch, max_seq))
        missing = trt_backend.missing_requirements()
        entry["tensorrt"] = ({"status": "pending", "missing": missing, "settings": trt_backend.SETTINGS_FILE,
                              "finish": "qwen3export finish ARTIFACT (on a machine with TensorRT and the GPU)"}
                             if missing else trt_backend.build_plan(folder))
        return entry
    if backend == "aoti":
        from .backends import aoti

        return aoti.emit(ep, sampling_ep, folder)
    raise TargetError(f"unknown backend {backend!r}")


def sampling_pair(artifact: art.Artifact, threads: int | None = None, engine=None):
    """(torch SamplingGraph, the artifact's own sampler: ONNX Runtime session or AOTInductor package)."""
    from qwen3export.graphs.sampling import SamplingGraph, SamplingSession, SamplingVocab

    entry = artifact.manifest["sampling"]
    spec = ModelSpec.from_dict(artifact.manifest["model"]["spec"])
    graph = SamplingGraph(SamplingVocab.from_spec(spec), entry["early_stop_ids"])
    if artifact.backend == "aoti":
        return graph, (engine or open_engine(artifact, threads)).sampler
    session = SamplingSession(artifact.file(entry["file"]), available_providers(
        artifact.manifest["target"]["ort_providers"]), threads)
    return graph, session


def verify_engine(artifact: art.Artifact, eager: torch.nn.Module, threads: int | None = None) -> dict[str, Any]:
    engine = open_engine(artifact, threads)
    report = check_parity(engine, engine.empty_cache(2), eager, eager.empty_cache(2),
                          eager.spec.vocab_size, artifact.manifest["dtype"])
    report["providers"] = engine.providers
    report["sampling"] = check_sampling_parity(*sampling_pair(artifact, threads, engine))
    if not report["sampling"]["identical"]:
        report["passed"] = False
        report["failures"].append(f"sampling graph differs from torch in {report['sampling']['mismatches']} "
                                  "tokens/state rows")
    return report


def eager_for(artifact: art.Artifact, model_override: str | None = None) -> torch.nn.Module:
    """Rebuild the eager model an artifact was built from (its recorded source, or `model_override`)."""
    m = artifact.manifest
    ref = ModelRef.from_dict(m["model"]["ref"])
    if model_override is not None:
        spec, source, _ = resolve(model_override, ref.seed, **dict(ref.overrides))
    else:
        spec, source = resolve_ref(ref)
    if spec.to_dict() | {"name": ""} != m["model"]["spec"] | {"name": ""}:
        raise ParityError(f"model {ref.name} no longer matches the artifact's model spec; pass --model with the "
                          "checkpoint the artifact was built from")
    return build_module(spec, source, parse_dtype(m["dtype"]))
