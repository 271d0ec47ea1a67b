"""Rotary-embedding frequencies for the Qwen3 graphs: default RoPE, linear scaling and YaRN.

Computed once per model as the reference does (transformers `modeling_rope_utils`:
`_compute_default_rope_parameters`, `_compute_linear_scaling_rope_parameters`,
`_compute_yarn_parameters`), so cos/sin tables match it to fp32 rounding at every position.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from qwen3export.errors import ConfigError

# Qwen3 model cards ("Processing Long Texts"): native context 32,768 tokens; YaRN factor 4.0 with
# original_max_position_embeddings 32768 reaches 131,072.
QWEN3_NATIVE_CONTEXT = 32768
ROPE_TYPES = ("linear", "yarn")


def normalise_rope_scaling(raw: Any, fallback_original: int) -> dict[str, Any] | None:
    """Validate a config.json `rope_scaling` (or transformers 5 `rope_parameters`) dict -> canonical dict."""
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"config field 'rope_scaling' must be an object, got {raw!r}")
    kind = raw.get("rope_type") or raw.get("type") or "default"
    if kind == "default":
        return None
    if kind == "dynamic":
        raise ConfigError("config field 'rope_scaling' has rope_type 'dynamic': dynamic NTK recomputes the "
                          "frequencies from each sequence's length at run time, which a fixed engine cannot "
                          "reproduce; use {\"rope_type\": \"yarn\", \"factor\": 4.0} as Qwen3 recommends")
    if kind not in ROPE_TYPES:
        raise ConfigError(f"config field 'rope_scaling' has rope_type {kind!r}; supported: default, "
                          f"{', '.join(ROPE_TYPES)}")
    factor = raw.get("factor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not factor >= 1.0:
        raise ConfigError(f"config field 'rope_scaling.factor' must be a number >= 1, got {factor!r}")
    out: dict[str, Any] = {"rope_type": kind, "factor": float(factor)}
    if kind == "yarn":
        orig = raw.get("original_max_position_embeddings", fallback_original)
        if isinstance(orig, bool) or not isinstance(orig, int) or orig <= 0:
            raise ConfigError("config field 'rope_scaling.original_max_position_embeddings' must be a positive "
                              f"integer, got {orig!r}")
        out["original_max_position_embeddings"] = orig
        for key in ("beta_fast", "beta_slow", "attention_factor", "mscale", "mscale_all_dim"):
            v = raw.get(key)
            if v is not None:
                if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
                    raise ConfigError(f"config field 'rope_scaling.{key}' must be a positive number, got {v!r}")
                out[key] = float(v)
        if "truncate" in raw:
            out["truncate"] = bool(raw["truncate"])
    return out


def parse_rope_flag(text: str) -> dict[str, Any]:
    """`--rope-scaling yarn:4.0[:32768]` or `linear:2.0` -> a rope_scaling dict."""
    parts = text.split(":")
    try:
        kind, factor = parts[0], float(parts[1])
        orig = int(parts[2]) if len(parts) > 2 else QWEN3_NATIVE_CONTEXT
        if len(parts) > 3:
            raise ValueError
    except (IndexError, ValueError):
        raise ConfigError(f"--rope-scaling {text!r} must look like yarn:4.0, yarn:4.0:32768 or linear:2.0") from None
    raw: dict[str, Any] = {"rope_type": kind, "factor": factor}
    if kind == "yarn":
        raw["original_max_position_embeddings"] = orig
    return normalise_rope_scaling(raw, QWEN3_NATIVE_CONTEXT) or {}


def scaled_max_positions(max_position_embeddings: int, rope_scaling: dict[str, Any] | None) -> int:
    """Longest position the model serves: YaRN/linear stretch the original window by `factor`."""
    if not rope_scaling:
        return max_position_embeddings
    orig = rope_scaling.get("original_max_position_embeddings", max_position_embeddings)
    return max(max_position_embeddings, int(rope_scaling["factor"] * orig))


def rope_parameters(head_dim: int, theta: float, rope_scaling: dict[str, Any] | None) -> tuple[torch.Tensor, float]:
    """(inv_freq [head_dim/2] fp32, attention scaling applied to cos/sin)."""
    dim = head_dim
    pos_freqs = theta ** (torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim)
    inv_freq = 1.0 / pos_freqs
    if not rope_scaling:
        return inv_freq, 1.0
    factor = rope_scaling["factor"]
    if rope_scaling["rope_type"] == "linear":
        return inv_freq / factor, 1.0
    # YaRN (Peng et al. 2023, arXiv:2309.00071), as transformers' _compute_yarn_parameters
    orig = rope_scaling["original_max_position_embeddings"]

    def get_mscale(scale: float, mscale: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = rope_scaling.get("attention_factor")
    if attention_factor is None:
        ms, ms_all = rope_scaling.get("mscale"), rope_scaling.get("mscale_all_dim")
        attention_factor = get_mscale(factor, ms) / get_mscale(factor, ms_all) if ms and ms_all else get_mscale(factor)
    beta_fast = rope_scaling.get("beta_fast") or 32.0
    beta_slow = rope_scaling.get("beta_slow") or 1.0

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(orig / (num_rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rope_scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation = 1 - ramp  # 1: keep the original frequency (high-frequency dims), 0: interpolate
    # the same expressions as the reference, so inv_freq matches bit for bit: at position 131,071 one ulp
    # of a frequency moves the angle by ~1e-2 rad
    inv_freq_interpolation = 1.0 / (factor * pos_freqs)
    inv_freq = inv_freq_interpolation * (1 - extrapolation) + inv_freq * extrapolation
    return inv_freq, float(attention_factor)
