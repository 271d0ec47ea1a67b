"""The Target dataclass (one deployment machine, validated once) and the `cpu` target.

GPU targets live in targets/gpus.py, the registry by name in targets/registry.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from qwen3export.errors import TargetError

DTYPES = ("fp32", "tf32", "fp16", "bf16", "fp8")  # names used by peak_flops and dtypes
# The oldest compute capability with hardware support for each dtype: bf16 and TF32 tensor cores
# arrived with Ampere sm_80 (A100 whitepaper, "Third-Generation Tensor Core"); fp8 (E4M3/E5M2)
# tensor cores with Ada sm_89 and Hopper sm_90 (Ada whitepaper "Fourth-Generation Tensor Cores",
# H100 whitepaper "FP8"). CUDA Programming Guide, "Features and Technical Specifications".
MIN_COMPUTE_CAPABILITY = {"tf32": 80, "bf16": 80, "fp8": 89}
ORT_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")
TRT_FLAGS = {"tf32": "TF32", "fp16": "FP16", "bf16": "BF16", "fp8": "FP8"}  # tensorrt.BuilderFlag names
BACKENDS = ("onnx", "aoti", "tensorrt", "kernels")


@dataclass(frozen=True)
class Target:
    """A deployment machine. GPU figures per device; `compute_capability` None for CPU targets.

    peak_flops: dense (no sparsity) FLOP/s per dtype name ("fp32", "tf32", "fp16", "bf16", "fp8"); the
    tensor-core figures are those with fp32 accumulation, which is what the Triton kernels use.
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
    max_blocks_per_sm: int = 0
    memory_bytes: int = 0
    memory_bandwidth: float = 0.0  # bytes/s
    clock_hz: float = 0.0  # the SM clock at which the peak_flops figures are quoted (boost)
    peak_flops: dict[str, float] = field(default_factory=dict)
    dtypes: tuple[str, ...] = ("fp32",)  # dtypes the target's engines can run
    ort_providers: tuple[str, ...] = ("CPUExecutionProvider",)
    trt_builder_flags: tuple[str, ...] = ()
    backends: tuple[str, ...] = ("onnx",)

    def __post_init__(self) -> None:
        self.validate()

    @property
    def arch(self) -> str | None:
        return f"sm_{self.compute_capability}" if self.compute_capability else None

    def validate(self) -> None:
        def need(cond: bool, why: str) -> None:
            if not cond:
                raise TargetError(f"target {self.name}: {why}")

        need(self.kind in ("gpu", "cpu"), f"kind {self.kind!r} must be 'gpu' or 'cpu'")
        unknown = [d for d in (*self.dtypes, *self.peak_flops) if d not in DTYPES]
        need(not unknown, f"unknown dtypes {unknown}; known: {', '.join(DTYPES)}")
        need(all(b in BACKENDS for b in self.backends), f"backends {self.backends} must be among {BACKENDS}")
        need(bool(self.dtypes), "must support at least one dtype")
        if self.kind == "cpu":
            need(self.compute_capability is None, "a cpu target has no compute capability")
            return
        cc = self.compute_capability
        need(isinstance(cc, int) and cc >= 70, f"compute_capability {cc!r} must be an int like 80")
        for d in self.dtypes:
            need(cc >= MIN_COMPUTE_CAPABILITY.get(d, 0), f"lists dtype {d} which needs sm_{MIN_COMPUTE_CAPABILITY.get(d)}")
        for fld in ("sm_count", "shared_mem_per_sm", "shared_mem_per_block", "registers_per_sm",
                    "registers_per_thread", "max_threads_per_sm", "max_warps_per_sm", "max_blocks_per_sm",
                    "memory_bytes"):
            need(getattr(self, fld) > 0, f"{fld} must be positive for a GPU")
        need(self.memory_bandwidth > 0 and self.clock_hz > 0, "memory_bandwidth and clock_hz must be positive")
        need(self.max_threads_per_sm == 32 * self.max_warps_per_sm, "max_threads_per_sm must be 32 x max_warps_per_sm")
        need(self.shared_mem_per_block <= self.shared_mem_per_sm, "shared memory per block exceeds per SM")
        missing = [d for d in self.dtypes if d not in self.peak_flops]
        need(not missing, f"no peak_flops for its dtypes {missing}")
        need(self.ort_providers[-1:] == ("CPUExecutionProvider",), "CPUExecutionProvider must be the last provider")

    def check_dtype(self, dtype: str) -> None:
        if dtype in self.dtypes:
            return
        why = f"it supports {', '.join(self.dtypes)}"
        need_cc = MIN_COMPUTE_CAPABILITY.get(dtype)
        if self.kind == "gpu" and need_cc and (self.compute_capability or 0) < need_cc:
            why = f"{dtype} needs sm_{need_cc} or newer; {why}"
        where = f"target {self.name} ({self.arch})" if self.arch else f"target {self.name}"
        fallback = "bf16" if "bf16" in self.dtypes else self.dtypes[0]
        raise TargetError(f"{where} cannot run dtype {dtype}: {why}; pass --dtype {fallback} or another target")

    def check_backend(self, backend: str) -> None:
        if backend not in self.backends:
            raise TargetError(f"backend {backend!r} is not available for target {self.name}; choose from "
                              f"{', '.join(self.backends)}")

    def trt_flags(self, dtype: str) -> list[str]:
        """TensorRT builder flags for engines of `dtype`: TF32 always (where listed), plus the dtype's own flag;
        fp8 keeps FP16/BF16 on so layers TensorRT cannot run in fp8 fall back to 16 bits, not fp32."""
        self.check_dtype(dtype)
        wanted = {"tf32"} | ({dtype} if dtype != "fp32" else set()) | ({"fp16", "bf16"} if dtype == "fp8" else set())
        return [f for f in self.trt_builder_flags if any(TRT_FLAGS[d] == f for d in wanted)]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["arch"] = self.arch
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Target":
        """Inverse of to_dict (the manifest's target entry); tuples restored, `arch` recomputed."""
        data = {k: v for k, v in data.items() if k != "arch"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise TargetError(f"target entry has unknown fields {sorted(unknown)}")
        for key in ("dtypes", "ort_providers", "trt_builder_flags", "backends"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)


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
