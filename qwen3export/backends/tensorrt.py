"""TensorRT backend: a TensorRT plan built from the decoder ONNX that ONNX Runtime has already verified.

TensorRT needs NVIDIA's libraries and a GPU, which this project's machines do not have. So `build`
writes everything the target machine needs (the verified ONNX, optimization profiles and builder
settings as JSON) and marks the engine `pending`; `qwen3export finish ARTIFACT` on the target machine
runs `build_plan` below. This module is the only code that touches TensorRT: thin, written against
TensorRT 10's Python API, and type-checked in CI with mypy against the `tensorrt-stubs` package.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from qwen3export.artifact import MANIFEST, check_relative_path, read_json
from qwen3export.errors import ArtifactError, TargetError

SETTINGS_FILE = "tensorrt/build.json"
PLAN_FILE = "tensorrt/decoder.plan"
TIMING_CACHE_FILE = "tensorrt/timing.cache"
EXIT_PENDING = 3  # `build`/`finish` exit code: artifact complete and verified, TensorRT plan pending


def missing_requirements() -> list[str]:
    """What this machine lacks to build a TensorRT plan (empty when it can)."""
    missing = []
    try:
        import tensorrt  # lazy: optional; only on the target machine (no TensorRT can be installed here)
        usable = hasattr(tensorrt, "Builder")  # tensorrt-stubs alone leaves an empty namespace package
    except ImportError:
        usable = False
    if not usable:
        missing.append("the tensorrt Python package (pip install tensorrt-cu12 on the target machine)")
    import torch  # lazy: the CLI's `finish` and build summary read this module's names without loading torch

    if not torch.cuda.is_available():
        missing.append("an NVIDIA GPU with CUDA")
    return missing


def profiles(spec, max_batch: int, max_seq: int, opt_batch: int = 1, opt_seq: int = 512) -> dict[str, list[list[int]]]:
    """min/opt/max shapes per input: prefill (S up to max_seq, no past) to decode (S 1, past up to max_seq)."""
    opt_batch, opt_seq = min(opt_batch, max_batch), min(opt_seq, max_seq)
    hkv, d = spec.num_key_value_heads, spec.head_dim
    out = {
        "input_ids": [[1, 1], [opt_batch, 1], [max_batch, max_seq]],
        "position_ids": [[1, 1], [opt_batch, 1], [max_batch, max_seq]],
        "attention_mask": [[1, 1], [opt_batch, opt_seq], [max_batch, max_seq]],
    }
    for i in range(spec.num_hidden_layers):
        for kv in ("key", "value"):
            out[f"past_key_values.{i}.{kv}"] = [[1, hkv, 0, d], [opt_batch, hkv, opt_seq - 1, d],
                                                [max_batch, hkv, max_seq - 1, d]]
    return out


def settings(spec, target, dtype: str, max_batch: int, max_seq: int) -> dict[str, Any]:
    """Builder settings recorded in the artifact. fp32 / bf16: the ONNX is fp32 and precision comes from the
    builder flags (bf16 keeps fp32's range). fp16: the ONNX itself is fp16 with the residual stream and the
    norms' statistics in fp32 (verified here in ONNX Runtime), and the network is built strongly typed, so
    TensorRT keeps those types instead of choosing fp16 for the norms, where a massive activation of ~2,000
    squares past fp16's 65,504 (TensorRT forbids precision flags on strongly typed networks)."""
    strongly_typed = dtype == "fp16"
    flags = [] if strongly_typed else [f for f in target.trt_builder_flags if dtype != "fp32" or f == "TF32"]
    return {"onnx": "decoder.onnx", "plan": PLAN_FILE, "timing_cache": TIMING_CACHE_FILE,
            "target": target.name, "arch": target.arch, "dtype": dtype, "builder_flags": flags,
            "strongly_typed": strongly_typed,
            "profiles": profiles(spec, max_batch, max_seq), "workspace_bytes": 4 << 30,
            "tensorrt_version": ">=10", "plugins": [], "plugins_note": PLUGINS_NOTE}


# Why the plan has no plugins: the standard-ops ONNX (backends/onnx_ops.py, flavour "standard") expresses
# attention (MatMul/Softmax over the grouped heads with the mask as a bias) and the MoE (TopK routing; under an
# If, decode steps Gather the chosen experts' weights, prefill runs every expert in one Gemm) in ops TensorRT's
# parser maps to its own layers (conditionals included), which its builder fuses and times per GPU. The tuned Triton kernels ship in the kernel pack (--backend kernels) for runtimes that
# launch them; none is registered with TensorRT.
PLUGINS_NOTE = ("none: every op of the standard-ops ONNX maps to TensorRT's own layers (attention and MoE "
                "included); the tuned Triton kernels ship in the kernel pack (--backend kernels)")


def write_settings(folder: Path, s: dict[str, Any]) -> None:
    path = folder / SETTINGS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(s, indent=2, sort_keys=True) + "\n")


def settings_paths_checked(folder: Path) -> dict[str, Any]:
    """tensorrt/build.json, with the files it names kept inside the artifact: the ONNX it parses must be a listed
    file, and the plan and timing cache it writes are plain relative paths under tensorrt/ (a resealed manifest
    could otherwise point `finish` at any file on the machine)."""

    fix = "rebuild the artifact"
    s = read_json(folder / SETTINGS_FILE, "TensorRT build settings", fix)
    files = (read_json(folder / MANIFEST, "manifest", fix) or {}).get("files") or {}
    if not isinstance(s, dict) or not all(isinstance(s.get(k), str) for k in ("onnx", "plan", "timing_cache")):
        raise ArtifactError(f"{SETTINGS_FILE} is malformed (onnx, plan, timing_cache must be paths); {fix}")
    for key in ("onnx", "plan", "timing_cache"):
        check_relative_path(folder, s[key])
    if s["onnx"] not in files:
        raise ArtifactError(f"{SETTINGS_FILE} names {s['onnx']!r} to parse, which is not a listed file; {fix}")
    for key in ("plan", "timing_cache"):
        if not s[key].startswith("tensorrt/"):
            raise ArtifactError(f"{SETTINGS_FILE} writes {key} to {s[key]!r}, outside tensorrt/; {fix}")
    return s


def build_plan(folder: Path) -> dict[str, Any]:
    """Build the TensorRT plan from the artifact's ONNX and settings (needs TensorRT and a GPU)."""
    missing = missing_requirements()
    if missing:
        raise TargetError(f"TensorRT plan cannot be built here: missing {'; '.join(missing)}")
    import tensorrt as trt  # lazy: optional, as above

    s = settings_paths_checked(folder)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    # TensorRT 10: explicit batch is the only mode; strongly typed keeps the ONNX's own types (fp16 engines)
    flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if s.get("strongly_typed") else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(folder / s["onnx"])):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise TargetError(f"TensorRT's ONNX parser rejected {s['onnx']}: {errors}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(s["workspace_bytes"]))
    for flag in s["builder_flags"]:
        config.set_flag(getattr(trt.BuilderFlag, flag))
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in s["profiles"].items():
        profile.set_shape(name, tuple(lo), tuple(opt), tuple(hi))
    config.add_optimization_profile(profile)
    cache_path = folder / s["timing_cache"]
    cache = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
    config.set_timing_cache(cache, ignore_mismatch=False)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise TargetError("TensorRT failed to build the plan; rerun with --debug to see its log")
    (folder / s["plan"]).write_bytes(bytes(plan))
    timing = config.get_timing_cache()
    if timing is not None:
        cache_path.write_bytes(bytes(timing.serialize()))
    return {"status": "built", "plan": s["plan"], "timing_cache": s["timing_cache"], "tensorrt": trt.__version__}
