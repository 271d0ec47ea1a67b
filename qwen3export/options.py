"""Build options, validated once into a frozen BuildPlan (issue 17).

`BuildOptions` groups what a user asks for (quantization, parallelism, serving limits, emission). `plan_build`
checks it, once, against the REFUSALS table (flag combinations, before anything is read) and the MODEL_REFUSALS
table (combinations that need the model's spec or its checkpoint, before any weight is read), resolves the
model, and returns a `BuildPlan`: the target, spec, weight source, quantization, serving limits, the variant
(in-memory, streamed, sharded) and per backend its output folder and ONNX flavour. No stage after
`plan_build` sees the options.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from qwen3export.targets import TARGETS, get_target

from . import artifact as art
from .backends import BACKENDS
from .backends.aoti import check_can_build
from .errors import InputError, TargetError
from .manifest import ServingRecord
from .memory_plan import (PlanOptions, available_memory_bytes, check_parallelism, host_memory_bytes, plan_for_target,
                          serving_limits)
from .model import is_prequantized, resolve
from .quant import check_quantizable
from .quant_format import ACCURACY_LEVELS, QuantConfig
from .synthetic_weights import DEFAULT_WEIGHT_STATS

DEFAULT_SEED = 0
DEFAULT_GROUP_SIZE = 128
PARALLEL_BACKEND = "torch-export"
VARIANTS = ("in-memory", "streamed", "sharded")


@dataclass(frozen=True)
class QuantOptions:
    mode: str = "none"  # none | int8 | int4 | fp8 (quant.py)
    group_size: int | None = None  # int4 only; None: DEFAULT_GROUP_SIZE
    # quantize the lm_head too (the embedding and norms never are); None: yes for int4 (as ONNX Runtime GenAI's CPU
    # int4 does), no for int8 / fp8 (quantize_lm_head below says what it costs)
    quantize_lm_head: bool | None = None
    # MatMulNBits accuracy_level of the int4 linears (quant_format.ACCURACY_LEVELS); None: per target
    # (default_accuracy_level)
    int4_accuracy: int | None = None


@dataclass(frozen=True)
class ParallelOptions:
    tp: int = 1  # tensor-parallel degree (graphs/parallel.py)
    ep: int = 1  # expert-parallel degree


@dataclass(frozen=True)
class ServingLimits:
    max_batch: int = 8  # sequences per batch (TensorRT profile maximum; KV cache planned for it)
    max_seq: int | None = None  # tokens per sequence (default min(model positions, 8192))


@dataclass(frozen=True)
class EmitOptions:
    backends: tuple[str, ...] = ("onnx",)
    out: Path | None = None  # parent folder: each artifact is <out>/<model>-<target>-<backend>; default ./dist
    artifact: Path | None = None  # the artifact folder itself (one backend only); instead of out
    force: bool = False  # replace an existing artifact (artifact.check_replaceable says which may be)
    sign: Path | None = None  # an Ed25519 private key (PEM): each manifest is signed (signing.py)
    onnx_ops: str | None = None  # ONNX translation of the qwen3export:: ops: ort | standard; None: per target
    lower: bool = True  # run the lowering passes (graphs/passes) before emitting
    dump_ir: Path | None = None  # each phase's graph as text
    stream: bool = False  # weight-free capture, weights streamed into the ONNX external data (streaming.py)
    verify: bool = True  # False (--no-verify): streamed/sharded builds record parity as NOT run


@dataclass(frozen=True)
class BuildOptions:
    model: str = "tiny-moe"
    target: str = "cpu"
    dtype: str = "fp32"
    seed: int = DEFAULT_SEED
    weight_stats: str = DEFAULT_WEIGHT_STATS  # a preset's random-weight statistics: trained | small
    overrides: dict[str, Any] = field(default_factory=dict)  # preset field overrides
    quant: QuantOptions = QuantOptions()
    parallel: ParallelOptions = ParallelOptions()
    serving: ServingLimits = ServingLimits()
    emit: EmitOptions = EmitOptions()

    @classmethod
    def of(cls, **flags: Any) -> "BuildOptions":
        """From the CLI's flat flag names (quant, group_size, quantize_lm_head, int4_accuracy, tp, ep, max_batch,
        max_seq, backends, out, artifact, force, sign, onnx_ops, lower, dump_ir, stream, verify, and the top-level
        fields); a name that is neither is a TypeError, as for any constructor."""
        groups: dict[str, dict[str, Any]] = {"quant": {}, "parallel": {}, "serving": {}, "emit": {}}
        names = {"quant": {"quant": "mode", "group_size": "group_size", "quantize_lm_head": "quantize_lm_head",
                           "int4_accuracy": "int4_accuracy"},
                 "parallel": {"tp": "tp", "ep": "ep"}, "serving": {"max_batch": "max_batch", "max_seq": "max_seq"},
                 "emit": {k: k for k in EmitOptions.__dataclass_fields__}}
        top = {}
        for key, value in flags.items():
            group = next((g for g, m in names.items() if key in m), None)
            if group is None:
                top[key] = value
            else:
                groups[group][names[group][key]] = value
        if "out" in groups["emit"] and groups["emit"]["out"] is not None:
            groups["emit"]["out"] = Path(groups["emit"]["out"])
        if "artifact" in groups["emit"] and groups["emit"]["artifact"] is not None:
            groups["emit"]["artifact"] = Path(groups["emit"]["artifact"])
        if "backends" in groups["emit"]:
            groups["emit"]["backends"] = tuple(groups["emit"]["backends"])
        return cls(**top, quant=QuantOptions(**groups["quant"]), parallel=ParallelOptions(**groups["parallel"]),
                   serving=ServingLimits(**groups["serving"]), emit=EmitOptions(**groups["emit"]))

    @property
    def variant(self) -> str:
        if self.emit.stream:
            return "streamed"
        return "sharded" if self.parallel.tp * self.parallel.ep > 1 else "in-memory"

    @property
    def backends(self) -> tuple[str, ...]:
        """The backends asked for; a sharded build's default is one torch.export program per rank."""
        return self.emit.backends


# ------------------------------------------------------------------------------------------- refusals
@dataclass(frozen=True)
class Refusal:
    """One refused combination: `when(options, target)` is true for it, and `message(options, target)` is the
    one line the user sees (naming the problem and the fix)."""

    flags: str  # what combination, for the table's reader and the table-driven tests
    when: Callable[..., bool]
    message: Callable[..., str]
    error: type = InputError


def _gpu_fp8_targets() -> str:
    return ", ".join(t.name for t in TARGETS.values() if t.kind == "gpu" and "fp8" in t.dtypes)


_PARALLEL_REFUSED_BACKENDS = {
    "onnx": "ONNX Runtime's CPU provider has no collective ops (com.microsoft AllReduce exists only in its "
            "CUDA + NCCL builds)",
    "tensorrt": "a TensorRT plan with collectives needs TensorRT-LLM's NCCL plugins, which this tool does not emit",
    "aoti": "AOTInductor-compiled parts with collectives hung in gloo (on their 4th call) when tried",
    "kernels": "the kernel pack does not depend on --tp/--ep; build it without them",
}


def _sharded(o: BuildOptions) -> bool:
    return o.variant == "sharded"


def _twice(o: BuildOptions) -> list[str]:
    return sorted({b for b in o.backends if o.backends.count(b) > 1})


def _unknown_backend(o: BuildOptions) -> str | None:
    known = (*BACKENDS, PARALLEL_BACKEND) if _sharded(o) else BACKENDS
    return next((b for b in o.backends if b not in known), None)


def _parallel_backend(o: BuildOptions) -> str | None:
    return next((b for b in o.backends if b != PARALLEL_BACKEND), None) if _sharded(o) else None


def _target_says(check: Callable[[], None]) -> str | None:
    """What a target's own capability check (Target.check_backend / check_dtype) refuses, as a message."""
    try:
        check()
    except (TargetError, InputError) as e:
        return str(e)
    return None


def _backend_not_offered(o: BuildOptions, t) -> str | None:
    if _sharded(o):
        return None
    return next((m for b in o.backends if (m := _target_says(lambda b=b: t.check_backend(b)))), None)


def _aoti_cannot_build(o: BuildOptions, t) -> str | None:
    if "aoti" not in o.backends or t.kind == "cpu":
        return None

    return _target_says(lambda: check_can_build(t))


def _dtype_problem(o: BuildOptions, t) -> str | None:
    if o.dtype not in ("fp32", "fp16", "bf16"):
        return f"unknown dtype {o.dtype!r}; choose one of fp32, fp16, bf16"
    return _target_says(lambda: t.check_dtype(o.dtype))


# Flag combinations, checked in this order before the model is read; the first that applies is the error. The
# target's own capability checks (backends it offers, dtypes it runs) sit in the order as rows too.
REFUSALS: tuple[Refusal, ...] = (
    Refusal("no backend", lambda o, t: not o.backends, lambda o, t: "no backend given; pass --backend onnx",
            TargetError),
    Refusal("a backend twice", lambda o, t: bool(_twice(o)),
            lambda o, t: f"--backend names {', '.join(_twice(o))} more than once; give each backend once"),
    # --stream (before the backend rows: a streamed --tp build names the per-rank backend by default)
    Refusal("--stream with --quant", lambda o, t: o.emit.stream and o.quant.mode != "none",
            lambda o, t: f"--stream cannot go with --quant {o.quant.mode}: the quantized decoder has no weight-free "
                         "streamed emission yet; drop --stream (quantized builds load the model in memory)"),
    Refusal("--stream with --tp/--ep", lambda o, t: o.emit.stream and o.parallel.tp * o.parallel.ep > 1,
            lambda o, t: "--stream cannot go with --tp/--ep: a parallel build already writes one rank's shard at a "
                         "time; drop --stream"),
    Refusal("--stream with a backend other than onnx", lambda o, t: o.emit.stream and o.backends != ("onnx",),
            lambda o, t: f"--stream emits the onnx backend only (its external data is what streams), not "
                         f"{','.join(o.backends)}; pass --backend onnx or drop --stream", TargetError),
    Refusal("torch-export without --tp/--ep", lambda o, t: not _sharded(o) and PARALLEL_BACKEND in o.backends,
            lambda o, t: f"--backend {PARALLEL_BACKEND} is the per-rank program of --tp/--ep builds; pass --tp N "
                         "or choose another backend", TargetError),
    Refusal("an unknown backend", lambda o, t: _unknown_backend(o) is not None,
            lambda o, t: f"unknown backend {_unknown_backend(o)!r}; known backends: {', '.join(BACKENDS)}",
            TargetError),
    Refusal("--artifact with several backends", lambda o, t: o.emit.artifact is not None and len(o.backends) > 1,
            lambda o, t: f"--artifact names one artifact folder, but --backend {','.join(o.backends)} writes "
                         f"{len(o.backends)}; use --out DIR (each lands in DIR/<model>-<target>-<backend>)"),
    Refusal("--artifact with --out", lambda o, t: o.emit.artifact is not None and o.emit.out is not None,
            lambda o, t: "give --out DIR (parent folder) or --artifact PATH (the folder itself), not both"),
    Refusal("--no-verify on an in-memory build", lambda o, t: not o.emit.verify and o.variant == "in-memory",
            lambda o, t: "--no-verify applies to --stream and --tp/--ep builds only: this build checks parity "
                         "before writing anything; drop --no-verify"),
    Refusal("--group-size without --quant int4", lambda o, t: o.quant.group_size is not None
            and o.quant.mode != "int4",
            lambda o, t: f"--group-size applies to --quant int4 only (int8 and fp8 scale per output channel), not "
                         f"--quant {o.quant.mode}; drop --group-size"),
    # --tp / --ep
    Refusal("--tp/--ep with another backend", lambda o, t: _parallel_backend(o) is not None,
            lambda o, t: f"--tp/--ep builds emit one torch.export program per rank (--backend {PARALLEL_BACKEND}), "
                         f"not {_parallel_backend(o)}: {_PARALLEL_REFUSED_BACKENDS.get(_parallel_backend(o), '')}; "
                         f"pass --backend {PARALLEL_BACKEND} or drop --backend", TargetError),
    Refusal("--tp/--ep with --quant", lambda o, t: _sharded(o) and o.quant.mode != "none",
            lambda o, t: f"--tp/--ep cannot go with --quant {o.quant.mode}: the rank decoders (graphs/parallel.py) "
                         "have no quantized layers yet; drop one of them"),
    Refusal("--tp/--ep with --dtype other than fp32", lambda o, t: _sharded(o) and o.dtype != "fp32",
            lambda o, t: f"--tp/--ep parts are verified here in fp32 against the eager model; --dtype {o.dtype} is "
                         "not supported for them: drop --dtype", TargetError),
    Refusal("--tp/--ep on a GPU target", lambda o, t: _sharded(o) and t.kind != "cpu",
            lambda o, t: f"--tp/--ep parts run on CPU processes over gloo here (ParallelEngine); running them under "
                         f"NCCL on {t.name} GPUs is not implemented: use --target cpu", TargetError),
    Refusal("--tp/--ep with --onnx-ops", lambda o, t: _sharded(o) and o.emit.onnx_ops is not None,
            lambda o, t: "--onnx-ops applies to ONNX engines; a --tp/--ep build has none: drop --onnx-ops"),
    # ONNX flavour, and the backends the target offers
    Refusal("an unknown --onnx-ops", lambda o, t: o.emit.onnx_ops not in (None, "ort", "standard"),
            lambda o, t: f"unknown --onnx-ops {o.emit.onnx_ops!r}; choose one of ort, standard", TargetError),
    Refusal("--onnx-ops ort with tensorrt", lambda o, t: o.emit.onnx_ops == "ort" and "tensorrt" in o.backends,
            lambda o, t: "--onnx-ops ort cannot go with --backend tensorrt: TensorRT's ONNX parser takes standard "
                         "ONNX ops only; use --onnx-ops standard (the default for tensorrt)", TargetError),
    Refusal("a backend the target does not offer", lambda o, t: _backend_not_offered(o, t) is not None,
            lambda o, t: _backend_not_offered(o, t), TargetError),
    Refusal("aoti for a GPU target without a GPU here", lambda o, t: _aoti_cannot_build(o, t) is not None,
            lambda o, t: _aoti_cannot_build(o, t), TargetError),
    Refusal("tensorrt or kernels on a CPU target", lambda o, t: t.kind != "gpu" and bool(
            {"tensorrt", "kernels"} & set(o.backends)),
            lambda o, t: f"--backend {next(b for b in o.backends if b in ('tensorrt', 'kernels'))} needs an NVIDIA "
                         f"GPU target, not {t.name}", TargetError),
    Refusal("a dtype the target cannot run", lambda o, t: _dtype_problem(o, t) is not None,
            lambda o, t: _dtype_problem(o, t), TargetError),
    # quantization
    Refusal("--quantize-lm-head without --quant", lambda o, t: o.quant.mode == "none" and o.quant.quantize_lm_head,
            lambda o, t: "--quantize-lm-head needs --quant int8, int4 or fp8"),
    Refusal("an unknown --quant", lambda o, t: o.quant.mode not in ("none", "int8", "int4", "fp8"),
            lambda o, t: f"unknown --quant {o.quant.mode!r}; choose one of none, int8, int4, fp8"),
    Refusal("an unknown --int4-accuracy", lambda o, t: o.quant.int4_accuracy not in (None, *ACCURACY_LEVELS),
            lambda o, t: f"unknown --int4-accuracy {o.quant.int4_accuracy!r}; choose one of "
                         f"{', '.join(map(str, ACCURACY_LEVELS))} (MatMulNBits accuracy_level: 0 fp32 activations, "
                         "4 int8 activations)"),
    Refusal("--int4-accuracy without --quant int4", lambda o, t: o.quant.int4_accuracy is not None
            and o.quant.mode != "int4",
            lambda o, t: f"--int4-accuracy sets MatMulNBits' accuracy level of --quant int4 engines, not --quant "
                         f"{o.quant.mode}; drop --int4-accuracy"),
    Refusal("--int4-accuracy 4 on a GPU target", lambda o, t: o.quant.int4_accuracy == 4 and t.kind != "cpu",
            lambda o, t: f"--int4-accuracy 4 is ONNX Runtime's CPU int8-activation path; on {t.name} the CUDA "
                         "MatMulNBits ignores accuracy_level (and TensorRT / the kernel pack keep fp activations), "
                         "so the engine would not compute what its parity gate checked; drop --int4-accuracy "
                         "(GPU targets build at 0) or use --target cpu", TargetError),
    Refusal("--quant fp8 before sm_89", lambda o, t: o.quant.mode == "fp8" and t.kind == "gpu"
            and "fp8" not in t.dtypes,
            lambda o, t: f"target {t.name} ({t.arch}) cannot run --quant fp8: fp8 e4m3 needs sm_89 or newer; use "
                         f"--quant int8 or int4, or an fp8 target ({_gpu_fp8_targets()})", TargetError),
    Refusal("--quant with aoti", lambda o, t: o.quant.mode != "none" and "aoti" in o.backends,
            lambda o, t: "--backend aoti cannot take a quantized model (its qwen3export:: quantized ops would tie "
                         "the .pt2 to a Python process); use --backend onnx", TargetError),
    # engine dtype (a streamed engine is not verified in fp16/bf16, so its dtype combinations are its own)
    Refusal("--dtype fp16/bf16 with aoti", lambda o, t: o.dtype != "fp32" and "aoti" in o.backends,
            lambda o, t: f"--dtype {o.dtype} cannot go with --backend aoti: AOTInductor packages are compiled and "
                         "verified on this machine's CPU in fp32; build aoti with --dtype fp32", TargetError),
    Refusal("--dtype bf16 with onnx", lambda o, t: o.dtype == "bf16" and "onnx" in o.backends and not o.emit.stream,
            lambda o, t: "--dtype bf16 cannot go with --backend onnx: ONNX Runtime's CPU provider, where engines "
                         "are verified, has no bf16 kernels; use --dtype fp16 (verified here) or --backend tensorrt "
                         "(bf16 through TensorRT's builder flag)", TargetError),
    Refusal("--dtype fp16 with --onnx-ops ort", lambda o, t: o.dtype == "fp16" and o.emit.onnx_ops == "ort"
            and not o.emit.stream,
            lambda o, t: "--dtype fp16 cannot go with --onnx-ops ort: fp16 engines use standard ONNX ops; drop "
                         "--onnx-ops or pass --onnx-ops standard", TargetError),
    Refusal("--dtype fp16/bf16 with --quant", lambda o, t: o.dtype != "fp32" and o.quant.mode != "none",
            lambda o, t: f"--dtype {o.dtype} cannot go with --quant {o.quant.mode}: quantized engines keep fp32 "
                         "activations here; drop one of them", TargetError),
    Refusal("a streamed fp16/bf16 engine with verification", lambda o, t: o.emit.stream and o.dtype != "fp32"
            and o.emit.verify,
            lambda o, t: f"--stream --dtype {o.dtype}: a {o.dtype} engine cannot be checked against eager here (ONNX "
                         "Runtime's CPU provider runs fp32); pass --no-verify to write it with parity recorded as "
                         "not run, or build fp32", TargetError),
)


@dataclass(frozen=True)
class ModelRefusal:
    """A combination that needs the model: `when(options, target, spec, source)`, `message(...)`."""

    flags: str
    when: Callable[..., bool]
    message: Callable[..., str]
    error: type = InputError


def _prequantized(source) -> Any:
    return source.config if is_prequantized(source) else None


MODEL_REFUSALS: tuple[ModelRefusal, ...] = (
    ModelRefusal("--quant on a pre-quantized checkpoint of another mode",
                 lambda o, t, s, src: _prequantized(src) is not None and o.quant.mode not in (
                     "none", _prequantized(src).mode),
                 lambda o, t, s, src: f"{s.name} is already quantized ({_prequantized(src).scheme} "
                                      f"{_prequantized(src).mode}); drop --quant {o.quant.mode} to build it as it is, "
                                      "or give the unquantized checkpoint"),
    ModelRefusal("--quantize-lm-head on a checkpoint whose lm_head is not quantized",
                 lambda o, t, s, src: _prequantized(src) is not None and o.quant.quantize_lm_head
                 and not _prequantized(src).quantize_lm_head,
                 lambda o, t, s, src: f"{s.name}'s lm_head is not quantized in the checkpoint; drop --quantize-lm-head"),
    ModelRefusal("--int4-accuracy 4 on a pre-quantized checkpoint",
                 lambda o, t, s, src: _prequantized(src) is not None and o.quant.int4_accuracy == 4,
                 lambda o, t, s, src: f"{s.name} is a pre-quantized ({_prequantized(src).scheme}) checkpoint, built "
                                      "at MatMulNBits accuracy level 0 (its parity reference has no int8-activation "
                                      "emulation yet); drop --int4-accuracy"),
    ModelRefusal("--int4-accuracy 4 with --onnx-ops standard on a MoE model",
                 lambda o, t, s, src: o.quant.int4_accuracy == 4 and o.emit.onnx_ops == "standard"
                 and bool(s.moe_layers),
                 lambda o, t, s, src: f"--int4-accuracy 4 with --onnx-ops standard: {s.name}'s experts are "
                                      "dequantized there and run fp32 activations while its linears would run int8 "
                                      "ones; use --onnx-ops ort (QMoE at level 4) or --int4-accuracy 0"),
    ModelRefusal("a pre-quantized checkpoint with aoti",
                 lambda o, t, s, src: _prequantized(src) is not None and "aoti" in o.backends,
                 lambda o, t, s, src: "--backend aoti cannot take a quantized model (its qwen3export:: quantized ops "
                                      "would tie the .pt2 to a Python process); use --backend onnx", TargetError),
    ModelRefusal("--quant fp8 on a MoE model",
                 lambda o, t, s, src: o.quant.mode == "fp8" and bool(s.moe_layers) and _prequantized(src) is None,
                 lambda o, t, s, src: f"--quant fp8 covers dense models only and {s.name} has MoE layers (no fp8 "
                                      "expert op); use --quant int8 or int4, or a dense model (e.g. --model tiny)"),
)


def check_refusals(options: BuildOptions, target) -> None:
    for r in REFUSALS:
        if r.when(options, target):
            raise r.error(r.message(options, target))


def check_model_refusals(options: BuildOptions, target, spec, source) -> None:
    for r in MODEL_REFUSALS:
        if r.when(options, target, spec, source):
            raise r.error(r.message(options, target, spec, source))


# ------------------------------------------------------------------------------------------- the plan
@dataclass(frozen=True)
class Output:
    """One artifact the build writes: its backend, folder and the ONNX flavour of its engine (None: no ONNX)."""

    backend: str
    folder: Path
    onnx_flavour: str | None


@dataclass(frozen=True)
class BuildPlan:
    """Everything the stages need, decided and checked: no stage after plan_build sees the options."""

    variant: str  # in-memory | streamed | sharded
    target: Any  # targets.Target
    spec: Any  # spec.ModelSpec
    source: Any  # weights.WeightSource (or a pre-quantized source)
    ref: Any  # model.ModelRef
    dtype: str
    quant: Any  # quant.QuantConfig | None
    serving: ServingRecord
    outputs: tuple[Output, ...]
    lower: bool  # the lowering passes were asked for (--no-lower: False)
    tp: int
    ep: int
    verify: bool
    force: bool
    sign: Path | None
    dump_ir: Path | None

    @property
    def backends(self) -> tuple[str, ...]:
        return tuple(o.backend for o in self.outputs)


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


# What quantizing the lm_head costs, int4 g128 RTN at accuracy level 4, measured 2026-11-30 with
# `benchmarks/quant_quality.py --models qwen3-0.6b --layers 4 --modes int4:128,int4:128:head,int4:128:a4,
# int4:128:a4:head,int4:32` (Qwen3-0.6B shapes, 4 layers, trained statistics, against the fp32 eager model over
# the parity prompts and 32 greedy tokens, 89 positions): KL mean 0.639 -> 0.638 and KL max 7.18 -> 7.25 with the
# head quantized, top-1 agreement 0.876 and greedy match 16/32 (mean) both ways: within noise of what the body's
# int4 costs (int8 activations add 1%: KL mean 0.631 -> 0.639). The head is V x H weights that decode reads per
# token (a third of Qwen3-0.6B's bytes in fp32) and the peer (ONNX Runtime GenAI) quantizes it by default, so
# int4 does too; --no-quantize-lm-head keeps it fp32.
def quantize_lm_head(quant: QuantOptions) -> bool:
    """--quantize-lm-head / --no-quantize-lm-head as given, else int4's default (yes) and int8 / fp8's (no)."""
    return quant.mode == "int4" if quant.quantize_lm_head is None else quant.quantize_lm_head


def accuracy_level(quant: QuantOptions, target, onnx_ops: str | None = None) -> int:
    """MatMulNBits / QMoE accuracy_level of an int4 build: --int4-accuracy as given, else 4 on CPU targets with
    the ort flavour (int8 activations per block: the peer's CPU int4, 2.3x its level-0 decode as
    onnxruntime/mobius#402 measured, QMoE 5x here; the gate emulates it and measures its rounding noise floor,
    quant_parity.check_engine_parity) and 0 otherwise: GPU
    targets, whose CUDA MatMulNBits reads only K, N, bits and block_size (onnxruntime
    contrib_ops/cuda/quantization/matmul_nbits.h), so 4 would record an arithmetic the GPU does not run; and
    --onnx-ops standard, whose dequantized experts keep fp32 activations while ORT's DequantizeLinear + MatMul
    fusion would quantize the linears' (asked for explicitly, a dense model takes 4 there). int8 / fp8: 0."""
    if quant.mode != "int4":
        return 0
    if quant.int4_accuracy is not None:
        return quant.int4_accuracy
    return 4 if target.kind == "cpu" and (onnx_ops or "ort") == "ort" else 0


def artifact_name(spec, target: str, backend: str) -> str:
    return f"{spec.name.lower()}-{target}-{backend}"


def output_folder(options: BuildOptions, name: str) -> Path:
    """`--out` is always the parent folder (default ./dist) and the artifact is `<out>/<name>`; `--artifact`
    names the artifact folder itself, for a one-backend build (REFUSALS holds the combinations refused)."""
    if options.emit.artifact is not None:
        return Path(options.emit.artifact)
    return Path(options.emit.out or "dist") / name


def plan_build(options: BuildOptions) -> BuildPlan:
    """Check the options (REFUSALS), resolve the model, check what needs it (MODEL_REFUSALS, quantizability,
    parallel degrees, memory, serving limits, output folders) -> the frozen BuildPlan. Nothing is written."""

    target = get_target(options.target)
    check_refusals(options, target)
    group_size = options.quant.group_size or DEFAULT_GROUP_SIZE
    quant_args = dict(mode=options.quant.mode, group_size=group_size, quantize_lm_head=quantize_lm_head(options.quant),
                      accuracy_level=accuracy_level(options.quant, target, options.emit.onnx_ops))
    if options.quant.mode != "none":
        QuantConfig(**quant_args)  # the group-size rule

    spec, source, ref = resolve(options.model, options.seed, weight_stats=options.weight_stats, **options.overrides)
    check_model_refusals(options, target, spec, source)
    qcfg = _prequantized(source)
    if qcfg is None and options.quant.mode != "none":
        qcfg = QuantConfig(**quant_args)
        check_quantizable(spec, qcfg)
    tp, ep = options.parallel.tp, options.parallel.ep
    if options.variant == "sharded":
        _check_sharded(spec, target, tp, ep)
    # the engine's serving limits and its KV cache at them (modelled); a GPU it cannot fit is refused here
    serving = serving_limits(spec, target, options.dtype, qcfg.mode if qcfg else "none",
                           qcfg.group_size if qcfg else group_size, bool(qcfg and qcfg.quantize_lm_head), tp=tp,
                           ep=ep, max_batch=options.serving.max_batch, max_seq=options.serving.max_seq)
    if options.variant == "sharded":
        outputs = (Output(PARALLEL_BACKEND, output_folder(options, f"{spec.name.lower()}-{target.name}-tp{tp}-ep{ep}"),
                          None),)
    else:
        outputs = tuple(Output(b, output_folder(options, artifact_name(spec, target.name, b)),
                               onnx_flavour(b, target, options.emit.onnx_ops)) for b in options.backends)
    for o in outputs:  # refuse before spending minutes on a build
        art.check_replaceable(o.folder, options.emit.force)
    if options.variant == "in-memory":
        check_load_memory(spec, qcfg.mode if qcfg else "none", extra_fp16=options.dtype == "fp16")
    return BuildPlan(variant=options.variant, target=target, spec=spec, source=source, ref=ref, dtype=options.dtype,
                     quant=qcfg, serving=serving, outputs=outputs, lower=options.emit.lower, tp=tp, ep=ep,
                     verify=options.emit.verify, force=options.emit.force, sign=options.emit.sign,
                     dump_ir=options.emit.dump_ir)


def _check_sharded(spec, target, tp: int, ep: int) -> None:
    """The degrees against the model, and every rank process plus the eager reference against this host."""

    check_parallelism(spec, tp, ep)
    p = plan_for_target(spec, target, PlanOptions(dtype="fp32", tp=tp, ep=ep, max_batch=2, max_seq=64))
    ranks_bytes = p["per_rank"]["weight_bytes"] * tp * ep
    need, have = ranks_bytes + 4 * spec.param_count() + (2 << 30), host_memory_bytes()
    if need > have:
        raise InputError(f"{spec.name} tp {tp} x ep {ep}: the {tp * ep} rank processes ({ranks_bytes / 2**30:.1f} "
                         f"GiB of fp32 weights) and the eager reference need ~{need / 2**30:.1f} GiB, this host has "
                         f"{have / 2**30:.1f} GiB [modelled]; build a smaller model here (`qwen3export plan` shows "
                         "per-rank figures)")


LOAD_BYTES_PER_PARAM = {"none": 4.0, "int8": 1.0, "fp8": 1.0, "int4": 0.5}  # what the loaded decoder holds, at least


def check_load_memory(spec, quant: str, extra_fp16: bool = False, available: int | None = None) -> None:
    """Before the load stage: refuse a model whose loaded decoder alone (a lower bound of the build's peak) is
    larger than the memory this machine has available, instead of swapping or being killed minutes later."""

    need = spec.param_count() * (LOAD_BYTES_PER_PARAM[quant] + (2.0 if extra_fp16 else 0.0))
    have = available_memory_bytes() if available is None else available
    if need > have:
        raise InputError(f"{spec.name} needs at least {need / 2**30:.1f} GiB to load in memory "
                         f"({spec.param_count():,} parameters{'' if quant == 'none' else ', ' + quant}), but this "
                         f"machine has {have / 2**30:.1f} GiB available; build with --stream (peak memory bounded by "
                         "the largest tensor), or on a machine with more memory")
