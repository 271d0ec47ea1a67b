"""Kernel configurations (block sizes, warps, stages) and the per-arch hardware limits they must fit.

A KernelConfig is data: the tune stage writes them to JSON tables, launchers read them back, and the
kernels backend cross-compiles them (kernels/compile.py) to check they fit each arch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from qwen3export.errors import ConfigError, TargetError

_WARP_COUNTS = (1, 2, 4, 8, 16, 32)


def _sorted_items(values: Any, what: str) -> tuple[tuple[str, int], ...]:
    items = dict(values or {})
    for name, value in items.items():
        if not isinstance(name, str) or isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ConfigError(f"kernel config {what} entry {name!r}={value!r} must map a name to a positive int")
    return tuple(sorted(items.items()))


@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of one kernel.

    blocks: tile sizes passed as constexprs (BLOCK_M, BLOCK_N, …); meta: other integer constexprs
    (NUM_SPLITS, GROUP_SIZE_M, …). Both are stored as name-sorted tuples so configs hash, compare
    and serialise stably; pass dicts, they are normalised.
    """

    kernel: str
    blocks: tuple[tuple[str, int], ...] = ()
    num_warps: int = 4
    num_stages: int = 2
    meta: tuple[tuple[str, int], ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "blocks", _sorted_items(self.blocks, "block"))
        object.__setattr__(self, "meta", _sorted_items(self.meta, "meta"))
        if self.num_warps not in _WARP_COUNTS:
            raise ConfigError(f"kernel config for {self.kernel}: num_warps={self.num_warps} must be one of "
                              f"{_WARP_COUNTS}")
        if not 1 <= self.num_stages <= 8:
            raise ConfigError(f"kernel config for {self.kernel}: num_stages={self.num_stages} must be in 1..8")
        overlap = {k for k, _ in self.blocks} & {k for k, _ in self.meta}
        if overlap:
            raise ConfigError(f"kernel config for {self.kernel}: {sorted(overlap)} given both as block and meta")

    def __getitem__(self, name: str) -> int:
        values = self.constexprs
        if name not in values:
            raise ConfigError(f"kernel config for {self.kernel} has no {name!r}; it has {sorted(values)}")
        return values[name]

    @property
    def constexprs(self) -> dict[str, int]:
        """Every block size and meta value, as the kernel's constexpr keyword arguments."""
        return dict(self.blocks) | dict(self.meta)

    @property
    def threads(self) -> int:
        return 32 * self.num_warps  # 32 threads per warp on every NVIDIA arch

    @property
    def label(self) -> str:
        """A short stable name, e.g. 'BLOCK_M=64,BLOCK_N=64,GROUP_SIZE_M=8,w4,s3'."""
        parts = [f"{k}={v}" for k, v in self.blocks + self.meta]
        return ",".join(parts + [f"w{self.num_warps}", f"s{self.num_stages}"])

    def to_dict(self) -> dict[str, Any]:
        return {"kernel": self.kernel, "blocks": dict(self.blocks), "num_warps": self.num_warps,
                "num_stages": self.num_stages, "meta": dict(self.meta)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "KernelConfig":
        unknown = set(data) - {"kernel", "blocks", "num_warps", "num_stages", "meta"}
        if unknown or "kernel" not in data:
            raise ConfigError(f"kernel config {data!r} must have 'kernel' and only blocks/num_warps/num_stages/meta")
        return cls(kernel=data["kernel"], blocks=data.get("blocks", {}), num_warps=data.get("num_warps", 4),
                   num_stages=data.get("num_stages", 2), meta=data.get("meta", {}))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "KernelConfig":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class ArchLimits:
    """Per-block and per-SM limits of one compute capability that a compiled kernel must fit."""

    arch: str  # "sm_80"
    compute_capability: int  # 80
    max_shared_per_block: int  # bytes, opt-in dynamic shared memory per block
    shared_per_sm: int  # bytes
    max_warps_per_sm: int
    registers_per_thread: int = 255
    registers_per_sm: int = 65536  # 32-bit registers
    registers_per_block: int = 65536
    max_threads_per_block: int = 1024
    # registers are allocated per warp in units of 256 (CUDA Occupancy Calculator, "Register
    # allocation unit size" 256, "allocation granularity" warp, for cc 5.0-9.0)
    register_alloc_unit: int = 256

    def block_registers(self, registers_per_thread: int, num_warps: int) -> int:
        """Registers a block of `num_warps` warps occupies, with the per-warp allocation rounding."""
        per_warp = -(-registers_per_thread * 32 // self.register_alloc_unit) * self.register_alloc_unit
        return per_warp * num_warps


# NVIDIA CUDA C++ Programming Guide, "Technical Specifications per Compute Capability" table:
#   max shared memory per SM: 8.0 164 KB, 8.6 100 KB, 8.9 100 KB, 9.0 228 KB;
#   max shared memory per block (opt-in): 8.0 163 KB, 8.6 99 KB, 8.9 99 KB, 9.0 227 KB;
#   32-bit registers per SM 64 K, per block 64 K, per thread 255; threads per block 1024 (all four);
#   max resident warps per SM: 8.0 64, 8.6 48, 8.9 48, 9.0 64.
_KB = 1024
ARCH_LIMITS: dict[str, ArchLimits] = {
    "sm_80": ArchLimits("sm_80", 80, max_shared_per_block=163 * _KB, shared_per_sm=164 * _KB, max_warps_per_sm=64),
    "sm_86": ArchLimits("sm_86", 86, max_shared_per_block=99 * _KB, shared_per_sm=100 * _KB, max_warps_per_sm=48),
    "sm_89": ArchLimits("sm_89", 89, max_shared_per_block=99 * _KB, shared_per_sm=100 * _KB, max_warps_per_sm=48),
    "sm_90": ArchLimits("sm_90", 90, max_shared_per_block=227 * _KB, shared_per_sm=228 * _KB, max_warps_per_sm=64),
}


def arch_limits(arch_or_cc: str | int) -> ArchLimits:
    """Limits for 'sm_80', 'sm80', '80', '8.0' or 80."""
    text = str(arch_or_cc).strip().lower().removeprefix("sm_").removeprefix("sm")
    if "." in text:
        major, _, minor = text.partition(".")
        text = major + minor
    key = f"sm_{text}"
    if key not in ARCH_LIMITS:
        raise TargetError(f"no kernel limits for arch {arch_or_cc!r}; known: {', '.join(ARCH_LIMITS)}")
    return ARCH_LIMITS[key]


@dataclass
class CompileSpec:
    """One Triton function specialised as the runtime would launch it, for cross-compilation.

    pointers: pointer argument -> element type ("fp16", "fp32", "i32", "i64", …); constexprs: the
    constexpr arguments plus int arguments the runtime specialises to 1 (unit strides); aligned: int
    arguments divisible by 16 (the runtime's `tt.divisibility` hint; every pointer gets it too);
    divisible: int arguments that are multiples of 8, 4 or 2 but not of 16 at this shape, hinted with
    that divisor (see divisibility_hints); every other argument is an i32. shape names the
    representative problem the constexprs came from.
    """

    fn: Any
    pointers: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    shape: str
    aligned: tuple[str, ...] = ()
    scalars: dict[str, str] = field(default_factory=dict)
    divisible: dict[str, int] = field(default_factory=dict)


def divisibility_hints(values: dict[str, int]) -> dict[str, Any]:
    """CompileSpec's `aligned` and `divisible` for the int arguments' values at a compile shape (pass each
    stride as the model dimension it is a multiple of): each gets the largest power of two up to 16 that
    divides it. A hint is a promise the binary vectorises on, checked by Triton's JIT at every launch but
    not by a packed cubin, so a head_dim of 24 or a hidden size of 72 must not be compiled as a multiple
    of 16; they are multiples of 8, and saying so keeps 16-byte vector loads for 2-byte elements. Without
    it fused_moe's default tile spilled 3256 B (gate/up) and 80 B (down) at hidden 72 / inter 40 on
    sm_80 bf16; with it, 196 and 122 registers and no spill, as at hidden 2048 / inter 768."""
    largest = {name: min(16, value & -value) if value else 16 for name, value in values.items()}
    return {"aligned": tuple(name for name, d in largest.items() if d == 16),
            "divisible": {name: d for name, d in largest.items() if 1 < d < 16}}


def aligned_args(values: dict[str, int]) -> tuple[str, ...]:
    """The int arguments whose value at a compile shape is a multiple of 16 (divisibility_hints' `aligned`):
    only those get the 16 hint."""
    return divisibility_hints(values)["aligned"]
