"""qwen3export: export, lower, autotune and verify engines for the Qwen3 family of LLMs.

Public API: load_model (eager module from a Hugging Face folder or preset) and capture (torch.export).
"""

from .capture import capture
from .errors import Qwen3ExportError
from .model import load_model
from .spec import ModelSpec, preset

__version__ = "0.1.0"
__all__ = ["ModelSpec", "Qwen3ExportError", "capture", "load_model", "preset", "__version__"]
