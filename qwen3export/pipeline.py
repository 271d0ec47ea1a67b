"""The build pipeline: one ordered list of stages, load -> capture -> lower -> emit -> verify -> seal.

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
from .backends import BACKENDS
from .backends import onnx as onnx_backend
from .graph_capture import capture
from qwen3export.graphs.sampling import capture_sampling
from .errors import InputError, ParityError, TargetError
from .synthetic_weights import DEFAULT_WEIGHT_STATS
from .model import DEFAULT_SEED, ModelRef, build_module, is_prequantized, resolve, resolve_ref
from .plan import serving_plan
from .parity import check_parity, check_sampling_parity, summary_line
from .runner import available_providers, open_engine
from .spec import ModelSpec
from .weights import parse_dtype

Progress = Callable[[str], None]


@dataclass(frozen=True)
class BuildOptions:
    model: str = "tiny-moe"
    target: str = "cpu"
    backends: tuple[str, ...] = ("onnx",)
    dtype: str = "fp32"
    out: Path | None = None  # parent folder: each artifact is <out>/<model>-<target>-<backend>; default ./dist
    artifact: Path | None = None  # the artifact folder itself (one backend only); instead of out
    sign: Path | None = None  # an Ed25519 private key (PEM): each artifact's manifest is signed (signing.py)
    force: bool = False
    seed: int = DEFAULT_SEED
    weight_stats: str = DEFAULT_WEIGHT_STATS  # a preset's random-weight statistics: trained | small
    dump_ir: Path | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # preset field overrides
    max_batch: int = 8  # serving limit: sequences per batch (TensorRT profile maximum; KV cache planned for it)
    max_seq: int | None = None  # serving limit: tokens per sequence (default min(model positions, 8192))
    lower: bool = True  # run the lowering passes (graphs/passes) before emitting
    onnx_ops: str | None = None  # ONNX translation of the qwen3export:: ops: "ort" | "standard"; None: per target
    quant: str = "none"  # weight quantization: none | int8 | int4 | fp8 (quant.py)
    group_size: int = 128  # int4/int8 group size along the input dimension
    quantize_lm_head: bool = False  # quantize the lm_head too (the embedding and norms never are)
    tp: int = 1  # tensor-parallel degree (graphs/parallel.py)
    ep: int = 1  # expert-parallel degree
    stream: bool = False  # weight-free capture, weights streamed into the ONNX external data (streaming.py)
    verify: bool = True  # False (--no-verify): streamed/parallel builds record parity as NOT run


@dataclass
class BuildResult:
    path: Path
    manifest: dict[str, Any]


def artifact_name(spec: ModelSpec, target: str, backend: str) -> str:
    return f"{spec.name.lower()}-{target}-{backend}"


def output_folder(opts: BuildOptions, spec: ModelSpec, target: str, backend: str, name: str | None = None) -> Path:
    """`--out` is always the parent folder (default ./dist) and the artifact is `<out>/<name>`; `--artifact` names
    the artifact folder itself, for a one-backend build."""
    if opts.artifact is not None:
        if len(opts.backends) != 1:
            raise InputError(f"--artifact names one artifact folder, but --backend {','.join(opts.backends)} writes "
                             f"{len(opts.backends)}; use --out DIR (each lands in DIR/<model>-<target>-<backend>)")
        if opts.out is not None:
            raise InputError("give --out DIR (parent folder) or --artifact PATH (the folder itself), not both")
        return Path(opts.artifact)
    return Path(opts.out or "dist") / (name or artifact_name(spec, target, backend))


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


def onnx_flavour(backend: str, target, requested: str | None) -> str | None:
    """The flavour of ONNX the backend's engine is exported with (backends/onnx_ops.py); None: no ONNX.

    TensorRT's ONNX parser takes standard ops only. ONNX Runtime on CPU runs the `com.microsoft` contrib
    ops (GroupQueryAttention, MoE, ...) that the "ort" flavour maps to, so CPU defaults to it; GPU
    targets default to "standard", the graph every provider (and TensorRT) can read.
    """
    if backend == "tensorrt":
        return "standard"
    if backend != "onnx":  # aoti compiles the program; the kernel pack carries no graph
        return None
    return requested or ("ort" if target.kind == "cpu" else "standard")


def check_options(opts: BuildOptions):
    """Validate target, backends, dtype and ONNX op flavour before any weight is read."""
    from .backends.onnx_ops import FLAVOURS

    target = get_target(opts.target)
    if not opts.backends:
        raise TargetError("no backend given; pass --backend onnx")
    if opts.onnx_ops is not None and opts.onnx_ops not in FLAVOURS:
        raise TargetError(f"unknown --onnx-ops {opts.onnx_ops!r}; choose one of {', '.join(FLAVOURS)}")
    if opts.onnx_ops == "ort" and "tensorrt" in opts.backends:
        raise TargetError("--onnx-ops ort cannot go with --backend tensorrt: TensorRT's ONNX parser takes standard "
                          "ONNX ops only; use --onnx-ops standard (the default for tensorrt)")
    for b in opts.backends:
        if b not in BACKENDS:
            raise TargetError(f"unknown backend {b!r}; known backends: {', '.join(BACKENDS)}")
        target.check_backend(b)
        if b == "aoti":
            from .backends.aoti import check_can_build

            check_can_build(target)
        if b in ("tensorrt", "kernels") and target.kind != "gpu":
            raise TargetError(f"--backend {b} needs an NVIDIA GPU target, not {target.name}")
    parse_dtype(opts.dtype)
    target.check_dtype(opts.dtype)
    check_quant(opts, target)
    check_dtype_backends(opts)
    return target


def check_dtype_backends(opts: BuildOptions) -> None:
    """Which engines can be built, and verified here, in --dtype fp16 / bf16. fp16: the ONNX (standard ops) is
    fp16 with an fp32 residual stream and fp32 norm statistics, verified in ONNX Runtime's CPU provider (its
    fp16 kernels) against fp32 eager, and TensorRT builds that same file strongly typed. bf16: TensorRT only
    (from the fp32 ONNX with its BF16 flag): ONNX Runtime's CPU provider has no bf16 kernels to verify with."""
    if opts.dtype == "fp32":
        return
    if "aoti" in opts.backends:
        raise TargetError(f"--dtype {opts.dtype} cannot go with --backend aoti: AOTInductor packages are compiled "
                          "and verified on this machine's CPU in fp32; build aoti with --dtype fp32")
    if opts.dtype == "bf16" and "onnx" in opts.backends:
        raise TargetError("--dtype bf16 cannot go with --backend onnx: ONNX Runtime's CPU provider, where engines "
                          "are verified, has no bf16 kernels; use --dtype fp16 (verified here) or --backend tensorrt "
                          "(bf16 through TensorRT's builder flag)")
    if opts.dtype == "fp16" and opts.onnx_ops == "ort":
        raise TargetError("--dtype fp16 cannot go with --onnx-ops ort: fp16 engines use standard ONNX ops; drop "
                          "--onnx-ops or pass --onnx-ops standard")
    if opts.quant != "none":
        raise TargetError(f"--dtype {opts.dtype} cannot go with --quant {opts.quant}: quantized engines keep fp32 "
                          "activations here; drop one of them")


def check_quant(opts: BuildOptions, target) -> None:
    """--quant against the target and backends, before any weight is read: fp8 e4m3 needs sm_89+ (a GPU target
    without it is refused; ONNX Runtime's CPU provider runs fp8 DequantizeLinear, so target cpu verifies it),
    aoti cannot take the quantized ops, int4's group size is a power of two >= 16."""
    from qwen3export.targets import TARGETS

    from .quant import QUANT_MODES, QuantConfig

    if opts.quant == "none":
        if opts.quantize_lm_head:
            raise InputError("--quantize-lm-head needs --quant int8, int4 or fp8")
        return
    if opts.quant not in QUANT_MODES:
        raise InputError(f"unknown --quant {opts.quant!r}; choose one of none, {', '.join(QUANT_MODES)}")
    if opts.quant == "fp8" and target.kind == "gpu" and "fp8" not in target.dtypes:
        fp8 = ", ".join(t.name for t in TARGETS.values() if t.kind == "gpu" and "fp8" in t.dtypes)
        raise TargetError(f"target {target.name} ({target.arch}) cannot run --quant fp8: fp8 e4m3 needs sm_89 or "
                          f"newer; use --quant int8 or int4, or an fp8 target ({fp8})")
    check_quant_backends(opts.backends)
    QuantConfig(opts.quant, opts.group_size, opts.quantize_lm_head)  # the group size rule


def check_quant_backends(backends) -> None:
    if "aoti" in backends:
        raise TargetError("--backend aoti cannot take a quantized model (its qwen3export:: quantized ops would tie "
                          "the .pt2 to a Python process); use --backend onnx")


def quant_config(opts: BuildOptions, spec: ModelSpec, source):
    """The build's QuantConfig: a pre-quantized (AWQ / GPTQ) checkpoint's own, else --quant's RTN; None: fp
    weights. Checked against the model before any weight is read (fp8 has no MoE expert op; int4 groups
    divide every quantized weight)."""
    from .quant import QuantConfig, check_quantizable

    if is_prequantized(source):
        cfg = source.config
        if opts.quant not in ("none", cfg.mode):
            raise InputError(f"{spec.name} is already quantized ({cfg.scheme} {cfg.mode}); drop --quant "
                             f"{opts.quant} to build it as it is, or give the unquantized checkpoint")
        if opts.quantize_lm_head and not cfg.quantize_lm_head:
            raise InputError(f"{spec.name}'s lm_head is not quantized in the checkpoint; drop --quantize-lm-head")
        check_quant_backends(opts.backends)
        return cfg
    if opts.quant == "none":
        return None
    cfg = QuantConfig(opts.quant, opts.group_size, opts.quantize_lm_head)
    if cfg.mode == "fp8" and spec.moe_layers:
        raise InputError(f"--quant fp8 covers dense models only and {spec.name} has MoE layers (no fp8 expert op); "
                         "use --quant int8 or int4, or a dense model (e.g. --model tiny)")
    check_quantizable(spec, cfg)
    return cfg


LOAD_BYTES_PER_PARAM = {"none": 4.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5}  # what the loaded decoder holds, at least


def check_load_memory(spec: ModelSpec, quant: str, extra_fp16: bool = False, available: int | None = None) -> None:
    """Before the load stage: refuse a model whose loaded decoder alone (a lower bound of the build's peak) is
    larger than the memory this machine has available, instead of swapping or being killed minutes later."""
    from .streaming import available_memory_bytes

    need = spec.param_count() * (LOAD_BYTES_PER_PARAM[quant] + (2.0 if extra_fp16 else 0.0))
    have = available_memory_bytes() if available is None else available
    if need > have:
        raise InputError(f"{spec.name} needs at least {need / 2**30:.1f} GiB to load in memory "
                         f"({spec.param_count():,} parameters{'' if quant == 'none' else ', ' + quant}), but this "
                         f"machine has {have / 2**30:.1f} GiB available; build with --stream (peak memory bounded by "
                         "the largest tensor), or on a machine with more memory")


def load_decoder(spec: ModelSpec, source, qcfg) -> torch.nn.Module:
    """Load stage: the fp32 decoder, or the quantized one (graphs/quantized.py) built tensor by tensor."""
    if qcfg is None:
        return build_module(spec, source, torch.float32)
    from qwen3export.graphs.quantized import build_quantized

    from .quant import QuantizedSource

    qsource = source if is_prequantized(source) else QuantizedSource(source, spec, qcfg)
    return build_quantized(spec, qsource, qcfg, torch.float32)


def quantization_record(module, spec: ModelSpec) -> dict[str, Any]:
    """The manifest's `quantization`: mode, group size, lm_head, scheme (rtn / awq / gptq), what was replaced,
    and the bytes of weights the engine stores: quantized tensors (codes, scales, zero points) plus the fp32
    tensors left (embedding, norms, routers, an unquantized lm_head; a tied one once), beside the fp32 model's."""
    seen, fp = set(), 0
    for _, t in module.named_parameters():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            fp += t.numel() * t.element_size()
    rec = dict(module.quantization)
    rec.update({"weight_bytes": rec["quantized_bytes"] + fp, "fp_weight_bytes": fp,
                "fp32_model_bytes": 4 * spec.param_count()})
    return rec


def build(opts: BuildOptions, progress: Progress = lambda s: None) -> list[BuildResult]:
    """Build, verify and write the artifacts `opts` asks for. Each output folder's lock is held from the end of
    the checks to the end of the build (artifact.lock_scope)."""
    with art.lock_scope():
        return _build(opts, progress)


def _build(opts: BuildOptions, progress: Progress) -> list[BuildResult]:
    if opts.stream:  # no full model in memory: weights flow tensor by tensor into the engine (streaming.py)
        from .streaming import build_streamed

        return build_streamed(opts, progress)
    if opts.tp * opts.ep > 1:  # one part per rank, collectives between them (parallel_build.py)
        from .parallel_build import build_parallel

        return build_parallel(opts, progress)
    if not opts.verify:
        raise InputError("--no-verify applies to --stream and --tp/--ep builds only: this build checks parity "
                         "before writing anything; drop --no-verify")
    target = check_options(opts)
    spec, source, ref = resolve(opts.model, opts.seed, weight_stats=opts.weight_stats, **opts.overrides)
    qcfg = quant_config(opts, spec, source)  # --quant or the checkpoint's own, checked before any weight is read
    # the engine's serving limits and its KV cache at them (modelled); a GPU it cannot fit is refused here
    serving = serving_plan(spec, target, opts.dtype, qcfg.mode if qcfg else "none",
                           qcfg.group_size if qcfg else opts.group_size, bool(qcfg and qcfg.quantize_lm_head),
                           max_batch=opts.max_batch, max_seq=opts.max_seq)
    outs = {b: output_folder(opts, spec, target.name, b) for b in opts.backends}
    for out in outs.values():  # refuse before spending minutes on a build
        art.check_replaceable(out, opts.force)
    # aoti compiles the unlowered program; the kernel pack needs no graph
    lower = opts.lower and any(b not in ("aoti", "kernels") for b in opts.backends)
    stages = _Stages(2 + lower + 3 * len(opts.backends), progress)

    check_load_memory(spec, qcfg.mode if qcfg else "none", extra_fp16=opts.dtype == "fp16")
    for out in outs.values():  # every refusal is behind us: hold the folders for the rest of the build
        art.hold_build_lock(out)
    # 1. load: weights streamed tensor by tensor into the module (see weights.py)
    # engines are verified here in fp32; TensorRT lowers precision through its builder flags
    what = f"{source.description} as fp32" + (f", {qcfg.mode} weights ({qcfg.scheme})" if qcfg else "")
    module = stages.run("load", what, lambda: load_decoder(spec, source, qcfg))
    quantization = quantization_record(module, spec) if qcfg else None
    # an fp16 engine is captured from an fp16 decoder (fp32 residual stream, graphs/decoder.py) and verified
    # against the fp32 one at the fp16 thresholds; bf16 reaches TensorRT as its builder flag on the fp32 graph
    half = opts.dtype == "fp16"
    engine_dtype = "fp16" if half else "fp32"
    captured = build_module(spec, source, torch.float16) if half else module
    # 2. capture: one ExportedProgram for prefill and decode
    ep = stages.run("capture", f"torch.export of the {engine_dtype} decoder (dynamic batch, sequence, cache "
                    "length)", lambda: capture(captured))
    _dump(opts.dump_ir, "01-capture.txt", str(ep.graph_module.code))
    sampling_ep = capture_sampling(sampling_graph_for(spec, ref))
    # 3. lower: attention, MoE and norm subgraphs -> qwen3export:: ops; the captured program is kept as it was
    lowered, lowering = ep, lowering_record(None)
    if lower:
        lowered, lowering = stages.run("lower", "attention, MoE and norms -> qwen3export:: ops",
                                       lambda: lower_program(ep, progress))
        _dump(opts.dump_ir, "02-lower.txt", str(lowered.graph_module.code))

    # GPU targets: the tuned kernel configs (measured / modelled / default) for the dtype the GPU runs
    kernels = kernel_configs(spec, target, opts.dtype, quantization)

    results = []
    for backend in opts.backends:
        out = outs[backend]
        flavour = onnx_flavour(backend, target, opts.onnx_ops)
        program, record = (lowered, dict(lowering)) if flavour else (ep, unlowered_record(backend, opts.lower))
        record["onnx_ops"] = flavour
        with art.staging(out, opts.force, opts.sign) as tmp:
            manifest = art.default_manifest(
                model={"ref": ref.to_dict(), "spec": spec.to_dict(), "param_count": spec.param_count()},
                target=target.to_dict(), backend=backend, dtype="fp32" if backend == "kernels" else engine_dtype,
                lowering=record)
            manifest["serving"] = serving
            if kernels is not None:
                manifest["kernels"] = kernels
            if quantization is not None:
                manifest["quantization"] = quantization
            # 4. emit
            # the sampling graph (thinking control baked in) ships beside every decoder
            manifest["sampling"] = emit_sampling(spec, ref, tmp, sampling_ep)
            what = f"{backend} engine{f' ({flavour} ONNX ops)' if flavour else ''} -> {out}"
            manifest["engine"] = stages.run("emit", what, lambda: emit_engine(backend, program, sampling_ep, spec, tmp,
                                                                               opts, target, flavour, quantization))
            # 5. verify: the engine against eager PyTorch on the same weights
            if backend == "kernels":
                report = stages.run("verify", "kernel pack: cubins, loader, interpreter parity",
                                    lambda: verify_pack(tmp, manifest, progress))
            elif qcfg is not None:
                report = stages.run("verify", "parity against eager PyTorch on the dequantized weights, and the "
                                    "quantized model against the unquantized one",
                                    lambda: verify_quantized(art.staged_artifact(tmp, manifest), spec, source, qcfg))
            else:
                report = stages.run("verify", "parity against eager PyTorch",
                                    lambda: verify_engine(art.staged_artifact(tmp, manifest), module))
            progress(summary_line(report))
            if "quantization" in report:
                from .describe import quality_line

                progress(quality_line(report["quantization"]))
            gate(report)
            manifest["parity"] = report
            # 6. seal: checksums of every file into the manifest, then the atomic rename
            stages.run("seal", "checksums + manifest", lambda: art.seal(tmp, manifest))
        results.append(BuildResult(out, manifest))
    return results


def gate(report: dict[str, Any], what: str = "engine") -> None:
    """The parity gate of every build: raising here drops the staging folder, so nothing is written."""
    if not report["passed"]:
        raise ParityError(f"{what} failed the parity gate ({'; '.join(report['failures'])}); no artifact was "
                          "written: report this with --debug output")


def kernel_configs(spec: ModelSpec, target, dtype: str, quantization: dict[str, Any] | None = None
                   ) -> dict[str, Any] | None:
    """The manifest's `kernels` entry for a GPU target: per kernel the model runs, the config chosen for each
    shape bucket and how (measured / modelled, from the target's tuned table; default where no table has the
    model's shapes, with the `tune` command that would make one). None for CPU targets (no Triton kernels)."""
    if target.kind != "gpu":
        return None
    from qwen3export.autotune.tables import select_configs

    from .backends.kernel_pack import pack_dtype, quantized_selection

    kdtype = pack_dtype(target, dtype)
    selected = quantized_selection(select_configs(target, spec, kdtype, missing="default"), spec, target,
                                   quantization)
    return {"dtype": kdtype, "arch": target.arch, "sources": sorted({s for e in selected for s in e["sources"]}),
            "kernels": [{k: e[k] for k in ("kernel", "table", "shipped", "sources", "configs", "tune") if k in e}
                        for e in selected]}


def verify_pack(folder: Path, manifest: dict[str, Any], progress: Progress = lambda s: None,
                threads: int | None = None) -> dict[str, Any]:
    """A kernel-pack artifact: the pack's own checks (kernel_pack.verify_kernel_pack) and its sampling graph."""
    from .backends.kernel_pack import verify_kernel_pack

    report = verify_kernel_pack(folder, manifest, progress)
    report["sampling"] = check_sampling_parity(*sampling_pair(art.staged_artifact(folder, manifest), threads))
    if not report["sampling"]["identical"]:
        report["passed"] = False
        report["failures"].append(f"sampling graph differs from torch in {report['sampling']['mismatches']} "
                                  "tokens/state rows")
    return report


def verify_artifact(artifact: art.Artifact, model_override: str | None = None, threads: int | None = None,
                    progress: Progress = lambda s: None) -> dict[str, Any]:
    """`qwen3export verify`: re-run the parity checks an artifact's backend has."""
    if "parallel" in artifact.manifest:  # tp x ep rank parts: N gloo processes vs unsharded eager
        from .parallel_build import verify_parallel

        return verify_parallel(artifact, eager_for(artifact, model_override), threads, progress)
    if artifact.backend == "kernels":
        if model_override is not None:
            eager_for(artifact, model_override)  # the same spec check; the interpreter rebuilds from the record
        return verify_pack(Path(artifact.path), artifact.manifest, progress, threads)
    if artifact.manifest.get("quantization"):
        spec, source = source_for(artifact, model_override)
        return verify_quantized(artifact, spec, source, artifact_quant_config(artifact), threads)
    return verify_engine(artifact, eager_for(artifact, model_override), threads)


def lowering_record(results) -> dict[str, Any]:
    """The manifest's `lowering` entry: sites replaced per pass (0 for every pass when lowering is off)
    and the passes' notes (sites left in plain ops, with why)."""
    from qwen3export.graphs.passes import PATTERNS

    if results is None:
        return {"enabled": False, "passes": {name: 0 for name in PATTERNS}, "notes": []}
    return {"enabled": True, "passes": {r.name: r.sites for r in results},
            "notes": [note for r in results for note in r.notes]}


# AOTInductor calls torch.library.custom_op ops back through Python: a lowered .pt2 loads only where
# qwen3export is imported (torch: "Could not find schema for qwen3export::rms_norm. Custom operators
# created via torch.library.custom_op cannot be run via AOTI without Python environment"), and on CPU the
# ops would run their pure-torch references op by op where Inductor fuses the plain-op graph itself
# (tiny, batch-1 decode over 64 cached tokens, 1 thread: 4.3 ms/step lowered vs 2.8 ms unlowered, measured)
UNLOWERED = {
    "aoti": "aoti compiles the captured (unlowered) program: its Python-registered qwen3export:: ops would tie "
            "the .pt2 to a Python process with qwen3export imported, and Inductor fuses the plain-op graph itself",
    "kernels": "the kernel pack carries no graph: its Triton kernels are what lowered engines call",
}


def unlowered_record(backend: str, requested: bool) -> dict[str, Any]:
    """The `lowering` entry of a backend that does not take the lowered program (UNLOWERED says why)."""
    record = lowering_record(None)
    record["notes"] = [UNLOWERED[backend]] if requested else []
    return record


def lower_program(ep, progress: Progress = lambda s: None, passes=None):
    """Run the lowering passes (default graphs/passes DEFAULT_PASSES); -> (lowered program, manifest record).
    A site a pass cannot prove equal to its op stays in plain ATen ops (correct, unfused): its warning goes
    to progress and into the record's notes."""
    import warnings

    from qwen3export.graphs.passes import DEFAULT_PASSES, UnloweredSiteWarning, run_passes

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnloweredSiteWarning)
        lowered, results = run_passes(ep, passes or DEFAULT_PASSES, progress=progress)
    for w in caught:
        if issubclass(w.category, UnloweredSiteWarning):
            progress(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return lowered, lowering_record(results)


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
                target=None, flavour: str | None = None, quantization: dict[str, Any] | None = None
                ) -> dict[str, Any]:
    quantized = quantization is not None
    if backend == "onnx":
        return onnx_backend.emit_decoder(ep, spec, folder, flavour=flavour, quantized=quantized)
    if backend == "tensorrt":
        from .backends import tensorrt as trt_backend

        entry = onnx_backend.emit_decoder(ep, spec, folder, flavour=flavour, quantized=quantized)
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
    if backend == "kernels":
        from .backends.kernel_pack import emit_kernel_pack

        (folder / "kernels").mkdir(exist_ok=True)
        return emit_kernel_pack(spec, target, opts.dtype if opts else "fp32", folder, quantization=quantization)
    raise TargetError(f"unknown backend {backend!r}")


def sampling_pair(artifact: art.Artifact, threads: int | None = None, engine=None):
    """(torch SamplingGraph, the artifact's own sampler: ONNX Runtime session or AOTInductor package)."""
    from qwen3export.graphs.sampling import SamplingGraph, SamplingSession, SamplingVocab

    entry = artifact.manifest["sampling"]
    spec = ModelSpec.from_dict(artifact.manifest["model"]["spec"])
    graph = SamplingGraph(SamplingVocab.from_spec(spec), entry["early_stop_ids"])
    if artifact.backend == "aoti":
        return graph, (engine or open_engine(artifact, threads)).sampler
    session = SamplingSession(artifact.onnx_file(entry["file"]), available_providers(
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


def verify_quantized(artifact: art.Artifact, spec: ModelSpec, source, qcfg, threads: int | None = None
                     ) -> dict[str, Any]:
    """A quantized engine, parity two ways (quant_parity.py): gated, the engine against eager PyTorch on the
    same dequantized weights; reported, the quantized model against the unquantized one (not for an AWQ /
    GPTQ checkpoint: its unquantized weights are not here). The report is check_parity's (it gates and
    prints like any build's) with `quantization` holding the second comparison."""
    from .quant import QuantizedSource
    from .quant_parity import check_engine_parity, compare_to_unquantized, dequantized_reference

    engine = open_engine(artifact, threads)
    qsource = source if is_prequantized(source) else QuantizedSource(source, spec, qcfg)
    reference = dequantized_reference(spec, qsource, torch.float32)
    parity_dtype = "fp8" if qcfg.mode == "fp8" else artifact.manifest["dtype"]  # parity.THRESHOLDS["fp8"]
    report = check_engine_parity(engine, engine.empty_cache(2), reference, parity_dtype)
    report["providers"] = engine.providers
    report["sampling"] = check_sampling_parity(*sampling_pair(artifact, threads, engine))
    del engine
    if is_prequantized(source):
        quality = {"gated": False, "not_run": f"pre-quantized {qcfg.scheme} checkpoint: no unquantized weights to "
                   "compare with"}
    else:
        # over HOLD_BOTH_BYTES the two fp32 models are held one at a time (the reference is rebuilt)
        if 4 * spec.param_count() > HOLD_BOTH_BYTES:
            del reference
            reference = lambda: dequantized_reference(spec, qsource, torch.float32)  # noqa: E731
        quality = compare_to_unquantized(reference, lambda: build_module(spec, source, torch.float32))
    quality["quantization"] = qcfg.to_dict()
    report["quantization"] = quality
    if not report["sampling"]["identical"]:
        report["passed"] = False
        report["failures"].append(f"sampling graph differs from torch in {report['sampling']['mismatches']} "
                                  "tokens/state rows")
    return report


HOLD_BOTH_BYTES = 4 << 30  # the quantized-vs-unquantized comparison holds both fp32 models below this size


def artifact_quant_config(artifact: art.Artifact):
    """The QuantConfig a quantized artifact was built with (its manifest's `quantization`)."""
    from .quant import QuantConfig

    q = artifact.manifest["quantization"]
    return QuantConfig(q["mode"], q["group_size"] if q.get("group_size") is not None else 128,
                       bool(q.get("quantize_lm_head")), scheme=q.get("scheme", "rtn"))


def source_for(artifact: art.Artifact, model_override: str | None = None):
    """(spec, weight source) an artifact was built from (its recorded source, or `model_override`), checked
    against the artifact's model spec."""
    m = artifact.manifest
    ref = ModelRef.from_dict(m["model"]["ref"])
    if model_override is not None:
        spec, source, _ = resolve(model_override, ref.seed, weight_stats=ref.weight_stats or DEFAULT_WEIGHT_STATS,
                                  **dict(ref.overrides))
    else:
        spec, source = resolve_ref(ref)
    if spec.to_dict() | {"name": ""} != m["model"]["spec"] | {"name": ""}:
        raise ParityError(f"model {ref.name} no longer matches the artifact's model spec; pass --model with the "
                          "checkpoint the artifact was built from")
    return spec, source


def eager_for(artifact: art.Artifact, model_override: str | None = None) -> torch.nn.Module:
    """Rebuild the eager model an artifact was built from (its recorded source, or `model_override`), in fp32:
    every engine, fp16 ones included, is checked against fp32 eager (at its dtype's thresholds)."""
    spec, source = source_for(artifact, model_override)
    return build_module(spec, source, torch.float32)

