"""Known targets by name: the CPU target and the GPU targets; the lookup every stage uses."""

from __future__ import annotations

from qwen3export.errors import TargetError

from .gpus import GPUS
from .spec import CPU, Target

TARGETS: dict[str, Target] = {t.name: t for t in (CPU, *GPUS)}


def target_names() -> list[str]:
    return list(TARGETS)


def gpu_targets() -> list[Target]:
    return [t for t in TARGETS.values() if t.kind == "gpu"]


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]
