"""The eager references an artifact is checked against: the model it was built from, rebuilt from its recorded
source (or a --model override), and the quantization it was built with."""

from __future__ import annotations

import torch

from qwen3export.graphs.decoder import Qwen3Decoder

from . import artifact as art
from .errors import ParityError
from .model import ModelRef, build_module, resolve, resolve_ref
from .quant_format import QuantConfig
from .synthetic_weights import DEFAULT_WEIGHT_STATS


def artifact_quant_config(artifact: art.Artifact):
    """The QuantConfig a quantized artifact was built with (its manifest's `quantization`)."""

    q = artifact.manifest["quantization"]
    return QuantConfig(q["mode"], q["group_size"] if q.get("group_size") is not None else 128,
                       bool(q.get("quantize_lm_head")), scheme=q.get("scheme", "rtn"),
                       accuracy_level=q.get("accuracy_level", 0))


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


def eager_for(artifact: art.Artifact, model_override: str | None = None) -> Qwen3Decoder:
    """Rebuild the eager model an artifact was built from (its recorded source, or `model_override`), in fp32:
    every engine, fp16 ones included, is checked against fp32 eager (at its dtype's thresholds)."""
    spec, source = source_for(artifact, model_override)
    return build_module(spec, source, torch.float32)
