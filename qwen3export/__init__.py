"""qwen3export: export, lower, autotune and verify engines for the Qwen3 family of LLMs.

Public API: load_model (eager module from a Hugging Face folder or preset) and capture (torch.export).
Imported lazily (PEP 562): `qwen3export --help`, `targets` and `inspect` never import torch.
"""

from __future__ import annotations

import importlib
from typing import Any

from .errors import Qwen3ExportError

__version__ = "0.1.0"
__all__ = ["ModelSpec", "Qwen3ExportError", "capture", "load_model", "preset", "__version__"]
_LAZY = {"capture": ".graph_capture", "load_model": ".model", "ModelSpec": ".spec", "preset": ".spec"}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value  # no submodule shares a public name, so nothing rebinds it later
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
