"""The Target dataclass and the registry of known targets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qwen3export.errors import TargetError


@dataclass(frozen=True)
class Target:
    """A deployment machine. GPU figures per device; `compute_capability` None for CPU targets.

    peak_flops: dense (no sparsity) FLOP/s per dtype name ("fp32", "tf32", "fp16", "bf16", "fp8").
    """

    name: str
    description: str
    kind: str  # "gpu" | "cpu"
    compute_capability: int | None = None  # e.g. 80 for sm_80
    sm_count: int = 0
    shared_mem_per_sm: int = 0  # bytes
    shared_mem_per_block: int = 0  # bytes, max opt-in dynamic shared memory per block
    registers_per_sm: int = 0  # 32-bit registers
    registers_per_thread: int = 255
    max_threads_per_sm: int = 0
    max_warps_per_sm: int = 0
    memory_bytes: int = 0
    memory_bandwidth: float = 0.0  # bytes/s
    peak_flops: dict[str, float] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("fp32",)  # dtypes the target's engines can run
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    trt_builder_flags: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("onnx",)

    @property
    def arch(self) -> str | None:
        return f"sm_{self.compute_capability}" if self.compute_capability else None

    def check_dtype(self, dtype: str) -> None:
        if dtype not in self.dtypes:
            raise TargetError(f"target {self.name} cannot run dtype {dtype}: it supports "
                              f"{', '.join(self.dtypes)}; pass --dtype {self.dtypes[0]} or another target")

    def check_backend(self, backend: str) -> None:
        if backend not in self.backends:
            raise TargetError(f"backend {backend!r} is not available for target {self.name}; choose from "
                              f"{', '.join(self.backends)}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch
        return d


CPU = Target(
    name="cpu",
    description="any x86-64/aarch64 CPU through ONNX Runtime's CPU execution provider",
    kind="cpu",
    # ONNX Runtime's CPU provider has no bf16 kernels and fp16 only for a few ops on x86 (MatMul,
    # Softmax… are fp32-only there), so engines for this target are fp32.
    dtypes=("fp32",),
    ort_providers=("CPUExecutionProvider",),
    backends=("onnx", "aoti"),
)

TARGETS: dict[str, Target] = {t.name: t for t in (CPU,)}


def target_names() -> list[str]:
    return list(TARGETS)


def get_target(name: str) -> Target:
    if name not in TARGETS:
        raise TargetError(f"unknown target {name!r}; known targets: {', '.join(TARGETS)}")
    return TARGETS[name]
