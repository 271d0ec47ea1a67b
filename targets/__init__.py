"""Targets: one frozen spec per deployment machine (GPU or CPU), validated once, looked up by name.

The emit, tune and verify stages read a Target; nothing else knows what hardware is behind a name.
"""

from __future__ import annotations

from .registry import TARGETS, get_target, gpu_targets, target_names
from .spec import Target

__all__ = ["TARGETS", "Target", "get_target", "gpu_targets", "target_names"]
