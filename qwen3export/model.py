"""Load stage: resolve `--model` (a Hugging Face folder or a preset name) into a ModelSpec, a weight
source and the eager Qwen3Decoder module."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen3export.graphs.decoder import Qwen3Decoder

from .errors import ConfigError
from .prequantized import PrequantizedSource, open_prequantized
from .spec import PRESETS, ModelSpec, preset, read_config, read_think_ids, spec_from_hf_config, unknown_model
from .synthetic_weights import DEFAULT_WEIGHT_STATS
from .weights import RandomSource, SafetensorsSource, WeightSource, check_names, load_into, parse_dtype

DEFAULT_SEED = 0


@dataclass(frozen=True)
class ModelRef:
    """Where a model came from, recorded in manifests so `verify` can rebuild the same eager model."""

    kind: str  # "preset" | "folder"
    name: str  # preset name or folder path
    seed: int = DEFAULT_SEED
    overrides: tuple[tuple[str, Any], ...] = ()  # preset field overrides, e.g. (("num_hidden_layers", 2),)
    weight_stats: str | None = None  # a preset's random-weight statistics (synthetic_weights.py); None: a folder

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "name": self.name, "seed": self.seed, "overrides": dict(self.overrides)}
        if self.weight_stats is not None:
            d["weight_stats"] = self.weight_stats
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelRef":
        # manifests written before the "trained" statistics existed drew the "small" ones
        stats = d.get("weight_stats", "small") if d["kind"] == "preset" else None
        return cls(d["kind"], d["name"], int(d.get("seed", DEFAULT_SEED)),
                   tuple(sorted(d.get("overrides", {}).items())), stats)



def resolve(model: str | Path, seed: int = DEFAULT_SEED, *, weight_stats: str = DEFAULT_WEIGHT_STATS,
            **overrides: Any) -> tuple[ModelSpec, WeightSource, ModelRef]:
    """A folder with config.json, or a preset name (with optional field overrides; its random weights drawn
    with `weight_stats`, synthetic_weights.py)."""
    text = str(model)
    path = Path(text).expanduser()
    if path.is_dir():
        if set(overrides) - {"rope_scaling"}:
            raise ConfigError("field overrides apply to presets only; edit the folder's config.json instead")
        cfg = read_config(path)
        if cfg.get("quantization_config"):  # AWQ / GPTQ: loaded into quant.py's representation

            spec, source = open_prequantized(path, read_think_ids(path))
        else:
            spec = spec_from_hf_config(cfg, name=path.resolve().name, think_ids=read_think_ids(path))
            source = SafetensorsSource(path)
        if overrides:  # --rope-scaling: what Qwen3's model card tells users to add to config.json
            spec = spec.replace(**overrides)
        check_names(spec, source)  # names and shapes against the safetensors headers, before anything is allocated
        return spec, source, ModelRef("folder", str(path.resolve()), DEFAULT_SEED,
                                                       tuple(sorted(overrides.items())))
    if text in PRESETS:
        spec = preset(text, **overrides)
        return spec, RandomSource(spec, seed, weight_stats), ModelRef("preset", text, seed,
                                                                      tuple(sorted(overrides.items())), weight_stats)
    raise unknown_model(text)



def resolve_ref(ref: ModelRef) -> tuple[ModelSpec, WeightSource]:
    spec, source, _ = resolve(ref.name, ref.seed, weight_stats=ref.weight_stats or DEFAULT_WEIGHT_STATS,
                              **dict(ref.overrides))
    return spec, source


def is_prequantized(source: WeightSource) -> bool:
    """Whether `source` is an AWQ / GPTQ checkpoint (prequantized.PrequantizedSource)."""

    return isinstance(source, PrequantizedSource)


def build_module(spec: ModelSpec, source: WeightSource, dtype: torch.dtype) -> Qwen3Decoder:
    """The eager decoder (a pre-quantized checkpoint loads dequantized: quant_parity's reference)."""
    module = Qwen3Decoder.empty(spec, dtype)
    load_into(module, spec, source, dtype)
    return module


def load_model(model: str | Path, dtype: str | torch.dtype = "fp32", seed: int = DEFAULT_SEED, *,
               weight_stats: str = DEFAULT_WEIGHT_STATS, **overrides: Any) -> Qwen3Decoder:
    """The eager Qwen3Decoder for a Hugging Face folder or a preset name, with weights in `dtype`.

    >>> m = load_model("tiny-moe")            # preset, random weights from seed 0
    >>> m = load_model("/ckpt/Qwen3-0.6B", dtype="bf16")
    """
    torch_dtype = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    spec, source, _ = resolve(model, seed, weight_stats=weight_stats, **overrides)
    return build_module(spec, source, torch_dtype)
