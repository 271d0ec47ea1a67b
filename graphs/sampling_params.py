"""Sampling parameters of the sampling graph: the per-row dataclass, its validation (done on the host,
before any graph runs), Qwen3's recommended defaults and a checkpoint's generation_config.json.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from qwen3export.errors import ConfigError, InputError

# Parameter tensors, in the graph's input order, each [B]:
PARAM_DTYPES: dict[str, torch.dtype] = {
    "temperature": torch.float32,  # 0 = greedy (argmax of the penalised logits)
    "top_k": torch.int64,  # 0 = off; values above the vocabulary size keep everything
    "top_p": torch.float32,  # 1 = off
    "min_p": torch.float32,  # 0 = off
    "repetition_penalty": torch.float32,  # 1 = off
    "presence_penalty": torch.float32,  # 0 = off
    "enable_thinking": torch.bool,
    "thinking_budget": torch.int64,  # -1 = unlimited
}
PARAM_NAMES = tuple(PARAM_DTYPES)

# Recommended sampling per mode, from the Qwen3 model cards ("Best Practices", e.g. Qwen/Qwen3-8B on the
# Hugging Face Hub; DESIGN §6): thinking T=0.6, top_p=0.95, top_k=20, min_p=0 ("DO NOT use greedy
# decoding" when thinking); non-thinking T=0.7, top_p=0.8, top_k=20, min_p=0.
QWEN3_DEFAULTS: dict[str, dict[str, float | int]] = {
    "thinking": {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0},
    "non_thinking": {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0},
}

# generation_config.json keys that map onto SamplingParams fields (transformers GenerationConfig names)
_GENERATION_CONFIG_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def _is_int(x: Any) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


# (name, valid(value as a float64 array) -> bool array, the valid range in words)
_RANGES: tuple[tuple[str, Callable[[np.ndarray], np.ndarray], str], ...] = (
    ("temperature", lambda x: np.isfinite(x) & (x >= 0), "a finite number >= 0 (0 = greedy)"),
    ("top_k", lambda x: x >= 0, "an integer >= 0 (0 = off)"),
    ("top_p", lambda x: (x > 0) & (x <= 1), "in (0, 1] (1 = off)"),
    ("min_p", lambda x: (x >= 0) & (x <= 1), "in [0, 1] (0 = off)"),
    # transformers RepetitionPenaltyLogitsProcessor: "has to be a strictly positive float"
    ("repetition_penalty", lambda x: np.isfinite(x) & (x > 0), "a finite number > 0 (1 = off)"),
    # OpenAI API and vLLM SamplingParams: presence_penalty in [-2, 2]
    ("presence_penalty", lambda x: (x >= -2) & (x <= 2), "in [-2, 2] (0 = off)"),
    ("thinking_budget", lambda x: x >= -1, "an integer >= -1 (-1 = unlimited)"),
)


def check_params(params: Mapping[str, Any]) -> None:
    """Validate a batch of parameter tensors/arrays (e.g. from `stack_params`): every name present, [B],
    values in range. Raises InputError naming the parameter, the row and the valid range."""
    missing = [n for n in PARAM_NAMES if n not in params]
    if missing:
        raise InputError(f"sampling parameters {missing} are missing")
    batch = None
    for name in PARAM_NAMES:
        a = np.asarray(params[name])
        if a.ndim != 1 or (batch is not None and a.shape[0] != batch):
            raise InputError(f"sampling parameter {name} must be one value per row [{batch or 'B'}], "
                             f"got shape {list(a.shape)}")
        batch = a.shape[0]
        want = PARAM_DTYPES[name]
        if (want == torch.bool) != (a.dtype == np.bool_) or (want == torch.int64) != np.issubdtype(a.dtype, np.integer):
            raise InputError(f"sampling parameter {name} must be {str(want).removeprefix('torch.')}, got {a.dtype}")
    for name, valid, words in _RANGES:
        a = np.asarray(params[name], dtype=np.float64)
        ok = valid(a)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            raise InputError(f"sampling parameter {name} must be {words}, got {a[row]:g} (row {row})")


@dataclass(frozen=True)
class SamplingParams:
    """One row's sampling parameters; validated on construction. Defaults switch every filter off
    (plain sampling at T=1); `recommended()` gives Qwen3's per-mode values."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    enable_thinking: bool = True
    thinking_budget: int = -1

    def __post_init__(self) -> None:
        for name in ("top_k", "thinking_budget"):
            if not _is_int(getattr(self, name)):
                raise InputError(f"sampling parameter {name} must be an integer, got {getattr(self, name)!r}")
        if not isinstance(self.enable_thinking, (bool, np.bool_)):
            raise InputError(f"sampling parameter enable_thinking must be true or false, got {self.enable_thinking!r}")
        for name, _, words in _RANGES:
            v = getattr(self, name)
            if not isinstance(v, (int, float, np.integer, np.floating)) or isinstance(v, bool):
                raise InputError(f"sampling parameter {name} must be {words}, got {v!r}")
        try:
            check_params(self.to_tensors(1))
        except InputError as e:  # same message without the row, which means nothing for one row
            raise InputError(str(e).removesuffix(" (row 0)")) from None

    def to_tensors(self, batch: int) -> dict[str, torch.Tensor]:
        """This row's values repeated `batch` times: name -> [batch] tensor of the graph's dtype."""
        return {n: torch.full((batch,), getattr(self, n), dtype=d) for n, d in PARAM_DTYPES.items()}

    def replace(self, **changes: Any) -> "SamplingParams":
        return dataclasses.replace(self, **changes)

    @classmethod
    def recommended(cls, enable_thinking: bool = True,
                    defaults: Mapping[str, Mapping[str, float | int]] | None = None,
                    **overrides: Any) -> "SamplingParams":
        """Qwen3's recommended values for the mode (or `defaults`, e.g. from `sampling_defaults`)."""
        table = QWEN3_DEFAULTS if defaults is None else defaults
        mode = table["thinking" if enable_thinking else "non_thinking"]
        return cls(**{**mode, "enable_thinking": enable_thinking, **overrides})


def stack_params(rows: Sequence[SamplingParams]) -> dict[str, torch.Tensor]:
    """Per-row parameters -> name -> [B] tensor (rows may differ)."""
    if not rows:
        raise InputError("stack_params needs at least one row of sampling parameters")
    return {n: torch.tensor([getattr(r, n) for r in rows], dtype=d) for n, d in PARAM_DTYPES.items()}


def read_generation_config(folder: Path) -> dict[str, float | int]:
    """The sampling fields of a checkpoint folder's generation_config.json ({} when it has none).

    `do_sample: false` means greedy and maps to temperature 0.
    """
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); restore the checkpoint's generation_config.json") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    out: dict[str, float | int] = {k: cfg[k] for k in _GENERATION_CONFIG_KEYS if cfg.get(k) is not None}
    if cfg.get("do_sample") is False:
        out["temperature"] = 0.0
    try:
        SamplingParams(**out)
    except InputError as e:
        raise ConfigError(f"{path}: {e}") from None
    return out


def sampling_defaults(generation_config: Mapping[str, float | int] | None = None,
                      ) -> dict[str, dict[str, float | int]]:
    """QWEN3_DEFAULTS with a checkpoint's generation_config values laid over the thinking mode.

    Released Qwen3 checkpoints ship their thinking-mode values in generation_config.json (the model card:
    "the default setting in generation_config.json"), since thinking is the chat template's default;
    the non-thinking values exist only on the model card and stay as they are.
    """
    table = copy.deepcopy(QWEN3_DEFAULTS)
    table["thinking"].update(generation_config or {})
    return table

