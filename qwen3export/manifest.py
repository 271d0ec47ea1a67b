"""The artifact manifest and the parity report: their one definition, as TypedDicts with a schema version.

Builders annotate what they produce with these types (mypy checks the keys; tests/test_manifest.py runs it),
and `check_manifest` validates a manifest read from disk against the same definitions at runtime, so a resealed
manifest of the wrong shape is refused in one line before anything reads it. Records that vary by backend (the
`engine` entry) and by check (the parity report of an engine, a kernel pack, a streamed build) are one TypedDict
per kind, chosen by the manifest's own fields (`engine_type`, `parity_type`).

Which keys are closed: the top level is closed (a key this version does not know means another version wrote
the manifest: rebuild); a nested record's declared keys are checked, and keys it does not declare are left to
the code that reads them (a newer record read by an older `inspect` stays readable). Pure Python: no torch.
"""

from __future__ import annotations

import types
import typing
from typing import Any, Literal, Mapping, TypedDict, Union

# 2: the ort decoder's in-place KV interface (seqlens_k, total_sequence_length, logits_index) and the sampling
# graph's id-list state (seen_ids, generated_ids); an artifact of version 1 is refused with "rebuild"
# 3: the ort decoder takes attention_mask (seqlens_k / total_sequence_length computed in the graph) and an optional
# logits_index, so ONNX Runtime GenAI runs it (genai_config.json, past_present_share_buffer); version 2 is refused
SCHEMA_VERSION = 3
SCHEMA = f"qwen3export.artifact/{SCHEMA_VERSION}"
BACKENDS = ("onnx", "tensorrt", "aoti", "kernels", "torch-export")  # torch-export: the --tp/--ep rank parts


class FileEntry(TypedDict):
    size: int
    sha256: str


class ModelRecord(TypedDict):
    ref: dict[str, Any]  # spec.ModelRef.to_dict(); ModelRef.from_dict validates it
    spec: dict[str, Any]  # spec.ModelSpec.to_dict(); ModelSpec.from_dict validates it
    param_count: int


class _TargetRequired(TypedDict):
    name: str
    kind: str  # "gpu" | "cpu"
    ort_providers: list[str]
    backends: list[str]
    dtypes: list[str]


class TargetRecord(_TargetRequired, total=False):  # targets.Target.to_dict(); Target.from_dict reads it back
    arch: str | None
    compute_capability: int | None
    description: str
    memory_bytes: int
    memory_bandwidth: float
    peak_flops: dict[str, float]


class TensorRTRecord(TypedDict, total=False):
    status: Literal["pending", "built"]
    missing: list[str]  # pending: what this machine lacks
    settings: str
    finish: str
    plan: str  # built
    timing_cache: str
    tensorrt: str


class _OnnxEngineRequired(TypedDict):
    file: str
    inputs: list[str]
    outputs: list[str]
    shapes: dict[str, list[str | int]]
    opset: int
    onnx_ops: str | None
    external_data: bool
    baked_weights: int


class OnnxEngineRecord(_OnnxEngineRequired, total=False):  # onnx, and tensorrt (its verified fp32 ONNX)
    status: str
    kv_cache: str  # "shared_buffer" (the ort flavour: backends/onnx.py share_kv_buffer) | "concat"
    genai_config: str  # genai_config.json (backends/genai_config.py): ONNX Runtime GenAI loads the artifact
    tensorrt: TensorRTRecord


class AotiEngineRecord(TypedDict):
    file: str
    sampling_file: str
    device: str
    torch: str


class KernelPackEngineRecord(TypedDict):
    format: Literal["triton-kernel-pack"]
    index: str
    arch: str
    dtype: str
    functions: int
    kernels: list[dict[str, Any]]  # per kernel: table, sources, configs (describe.engine_lines prints them)
    sources: list[str]
    status: str
    loader: str


class ParallelEngineRecord(TypedDict):
    status: str
    parts: int
    program: str
    weights: str
    runner: str


EngineRecord = Union[OnnxEngineRecord, AotiEngineRecord, KernelPackEngineRecord, ParallelEngineRecord]


class _SamplingRequired(TypedDict):
    file: str
    inputs: list[str]
    outputs: list[str]
    early_stop_ids: list[int]
    defaults: dict[str, dict[str, Any]]  # "thinking" / "non_thinking": SamplingParams fields
    tokenizer_files: list[str]


class SamplingRecord(_SamplingRequired, total=False):
    opset: int
    shapes: dict[str, list[str | int]]


class ServingRecord(TypedDict, total=False):  # memory_plan.serving_limits
    max_batch: int
    max_seq: int
    dtype: str
    quant: str
    ranks: int
    kv_cache_bytes: int
    kv_cache_bytes_per_sequence: int
    kv_cache_bytes_per_token: int
    total_bytes_per_rank: int
    target_memory_bytes: int
    fits: bool
    figures: str


class _LoweringRequired(TypedDict):
    enabled: bool
    passes: dict[str, int]  # sites replaced per pass
    notes: list[str]


class LoweringRecord(_LoweringRequired, total=False):
    onnx_ops: str | None  # the ONNX flavour the lowered ops were translated to (None: not an ONNX engine)


class QuantizationRecord(TypedDict, total=False):  # in_memory.quantization_record
    mode: str
    scheme: str
    group_size: int | None
    quantize_lm_head: bool
    linears: int
    moe_blocks: int
    quantized_bytes: int
    weight_bytes: int
    fp_weight_bytes: int
    fp32_model_bytes: int
    accuracy_level: int  # MatMulNBits / QMoE accuracy level of an int4 ONNX engine (4: int8 activations)


class KernelsRecord(TypedDict, total=False):  # kernel_pack.tuned_kernels_record: a GPU target's tuned configs
    arch: str
    dtype: str
    kernels: list[dict[str, Any]]
    sources: list[str]


class ParallelRecord(TypedDict):
    tp: int
    ep: int
    world: int
    rank_order: str
    collectives: str
    groups: dict[str, str]


class RankRecord(TypedDict):
    rank: int
    tp_rank: int
    ep_rank: int
    heads: list[int]  # [first, end)
    kv_heads: list[int]
    experts: list[int]
    vocab: list[int]
    files: list[str]


class StreamingRecord(TypedDict, total=False):
    weights: str
    weight_bytes: int
    bound_bytes: int
    largest_parameter_bytes: int
    rule: str


# -- the parity report (manifest["parity"]) ------------------------------------------------------------------------

class LogitsErrors(TypedDict):
    max_abs: float | None
    max_rel: float | None
    scaled: float | None
    top1_agreement: float
    finite: dict[str, bool]  # "engine" / "reference": no NaN or Inf
    scaled_median: float | None


class SamplingParity(TypedDict):
    reference: str
    rows: int
    steps: int
    identical: bool
    mismatches: int


class _EngineParityRequired(TypedDict):  # parity.check_parity
    reference: str
    dtype: str
    batch: int
    prompt_lengths: list[int]
    new_tokens: int
    prefill: LogitsErrors
    decode: LogitsErrors
    metric: str
    logits_scaled_err: float | None
    logits_max_abs: float | None
    logits_max_rel: float | None
    top1_agreement: float
    greedy_match: bool
    greedy_tokens_matching: int
    thresholds: dict[str, Any]
    bound: float
    passed: bool
    failures: list[str]


class QuantizationQuality(TypedDict, total=False):  # quant_parity.compare_to_unquantized: recorded, not gated
    reference: str
    compared: str
    gated: bool
    batch: int
    positions: int
    new_tokens: int
    logits_kl: dict[str, float]
    top1_agreement: float
    greedy_match_length: dict[str, Any]
    hidden_state_rel_error: list[float]
    router_topk_agreement: dict[str, dict[str, float]]
    quantization: dict[str, Any]


class EngineParity(_EngineParityRequired, total=False):  # parity.check_parity (+ what verify adds)
    logits_scaled_median: float | None  # the median row (the int8_activations gate reads it)
    quant_gate: dict[str, Any]  # a quantized engine's gate: kind, accuracy level, what the reference emulated
    noise_floor: dict[str, Any]  # level-4 int4: the reference against itself, one ulp off (quant_parity.noise_floor)
    providers: list[str]
    sampling: SamplingParity
    quantization: QuantizationQuality


class KernelPackParity(TypedDict, total=False):  # verify_pack: the pack's kernels run by Triton's interpreter
    passed: bool
    failures: list[str]
    functions: int
    gpu: str
    launched_on_gpu: bool
    reference: str
    interpreter: EngineParity | ParityNotRun  # not run over INTERPRET_MAX_PARAMS
    sampling: SamplingParity


class _ParityNotRunRequired(TypedDict):
    passed: None
    not_run: str  # why


class ParityNotRun(_ParityNotRunRequired, total=False):  # a check that could not run here
    command: str | None  # the command that runs it later, where there is one


ParityReport = Union[EngineParity, KernelPackParity, ParityNotRun]


# -- the manifest ----------------------------------------------------------------------------------------------------

class _ManifestRequired(TypedDict):  # what the manifest skeleton holds from the start (artifact.new_manifest)
    schema: str
    created: str
    versions: dict[str, str]
    model: ModelRecord
    target: TargetRecord
    backend: str
    dtype: str


class Manifest(_ManifestRequired, total=False):
    # the emit stage adds `engine`, the seal stage `files` and `manifest_sha256`: SEALED says a manifest read from
    # disk must hold them
    engine: dict[str, Any]  # one of EngineRecord, by engine_type(); checked by check_manifest
    files: dict[str, FileEntry]
    manifest_sha256: str
    lowering: LoweringRecord
    serving: ServingRecord
    sampling: SamplingRecord
    parity: dict[str, Any]  # one of ParityReport, by parity_type(); checked by check_manifest
    quantization: QuantizationRecord
    kernels: KernelsRecord | None
    parallel: ParallelRecord
    ranks: list[RankRecord]
    streaming: StreamingRecord


class _VariantFieldsRequired(TypedDict):
    dtype: str


class VariantFields(_VariantFieldsRequired, total=False):
    """What a build variant's steps add to the manifest skeleton (`manifest_fields`)."""
    lowering: LoweringRecord
    kernels: KernelsRecord | None
    quantization: QuantizationRecord
    parallel: ParallelRecord


SEALED = ("engine", "files", "manifest_sha256")


def engine_type(manifest: Mapping[str, Any]) -> type:
    """The EngineRecord kind a manifest's `engine` entry is."""
    if "parallel" in manifest:
        return ParallelEngineRecord
    kinds: dict[Any, type] = {"aoti": AotiEngineRecord, "kernels": KernelPackEngineRecord}
    return kinds.get(manifest.get("backend"), OnnxEngineRecord)


def parity_type(report: Mapping[str, Any]) -> type:
    """The ParityReport kind of a manifest's `parity` entry."""
    if report.get("passed") is None and "not_run" in report:
        return ParityNotRun
    return KernelPackParity if "interpreter" in report else EngineParity


class ManifestShapeError(ValueError):
    """A manifest field of the wrong JSON type; `where` is its dotted path."""

    def __init__(self, where: str, expected: str):
        super().__init__(f"'{where}' is not {expected}")
        self.where, self.expected = where, expected


def check_manifest(manifest: Any) -> Manifest:
    """`manifest` checked against Manifest (and its engine and parity entries against their kinds) -> the same
    object, typed. Raises ManifestShapeError naming the first field of the wrong shape."""
    check_value(manifest, Manifest, "", closed=True)
    for key in SEALED:
        if key not in manifest:
            raise ManifestShapeError(key, "present (a sealed manifest holds it)")
    check_value(manifest["engine"], engine_type(manifest), "engine")
    if isinstance(manifest.get("parity"), dict):
        check_value(manifest["parity"], parity_type(manifest["parity"]), "parity")
    if manifest["backend"] not in BACKENDS:
        raise ManifestShapeError("backend", f"one of {', '.join(BACKENDS)}")
    return typing.cast(Manifest, manifest)


def _at(where: str, key: Any) -> str:
    return f"{where}.{str(key)[:60]}" if where else str(key)[:60]


def _describe(kind: Any) -> str:
    origin = typing.get_origin(kind)
    if typing.is_typeddict(kind) or kind is dict or origin is dict:
        return "a JSON object"
    if kind is list or origin is list:
        return "a JSON array"
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(kind))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(kind))
    return {str: "a JSON string", int: "a JSON integer", float: "a JSON number", bool: "a JSON boolean",
            type(None): "null"}.get(kind, str(kind))


def check_value(value: Any, kind: Any, where: str, closed: bool = False) -> None:
    """`value` (parsed JSON) against the type `kind`: TypedDicts (required keys present, declared keys typed;
    undeclared keys refused only when `closed`), list[X], dict[str, X], unions, Literal, Any and the JSON
    scalars (an integer is a number; a boolean is not an integer)."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if kind is Any:
        return
    if typing.is_typeddict(kind):
        if not isinstance(value, dict):
            raise ManifestShapeError(where, _describe(kind))
        hints = typing.get_type_hints(kind)
        for key in hints:  # in declaration order: the first missing field is named, the same one every time
            if key in kind.__required_keys__ and key not in value:
                raise ManifestShapeError(_at(where, key), f"present (it must be {_describe(hints[key])})")
        for key, item in value.items():
            if key in hints:
                check_value(item, hints[key], _at(where, key))
            elif closed:
                raise ManifestShapeError(_at(where, key), "a field of this schema version")
        return
    if origin in (Union, types.UnionType):
        for option in args:
            try:
                check_value(value, option, where)
                return
            except ManifestShapeError:
                continue
        raise ManifestShapeError(where, _describe(kind))
    if origin is Literal:
        if value not in args:
            raise ManifestShapeError(where, _describe(kind))
        return
    if kind is list or origin is list:
        if not isinstance(value, (list, tuple)):  # a tuple: a record not yet written (json writes it as an array)
            raise ManifestShapeError(where, "a JSON array")
        for i, item in enumerate(value if args else ()):
            check_value(item, args[0], f"{where}[{i}]")
        return
    if kind is dict or origin is dict:
        if not isinstance(value, dict):
            raise ManifestShapeError(where, "a JSON object")
        for key, item in (value.items() if args else ()):
            check_value(item, args[1], _at(where, key))
        return
    ok = {bool: lambda v: isinstance(v, bool),
          int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
          str: lambda v: isinstance(v, str),
          type(None): lambda v: v is None}[kind]
    if not ok(value):
        raise ManifestShapeError(where, _describe(kind))
