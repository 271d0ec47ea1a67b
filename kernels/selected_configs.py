"""Which tuned config each kernel launch uses: a per-context selection of {kernel: {bucket key: config}}.

The build (and a deployed runtime) activates the configs chosen for its target (autotune/tables.py
select_configs, or a kernel pack's manifest) with `use_selected_configs(...)`; the custom ops in kernels/ops.py
ask `selected_config(kernel, **dims)` at every launch and get the config of the nearest tuned bucket, or None
(the kernel's DEFAULT_CONFIG) when nothing is active for that kernel.
"""

from __future__ import annotations

import contextvars
import math
from contextlib import contextmanager
from typing import Iterator, Mapping

from qwen3export.errors import ConfigError
from qwen3export.kernels.config import KernelConfig

Selection = Mapping[str, Mapping[str, KernelConfig]]  # kernel -> shape-bucket key ("M=16") -> config
_ACTIVE: contextvars.ContextVar[Selection | None] = contextvars.ContextVar("qwen3export_kernel_configs",
                                                                          default=None)


def shape_key(shape: Mapping[str, int]) -> str:
    """{'M': 16, 'E': 128} -> 'E=128,M=16' (names sorted)."""
    return ",".join(f"{k}={shape[k]}" for k in sorted(shape))


def parse_shape_key(key: str) -> dict[str, int]:
    try:
        return {name: int(value) for name, value in (part.split("=") for part in key.split(","))}
    except ValueError:
        raise ConfigError(f"bad shape key {key!r}: expected 'NAME=int,…'") from None


def nearest_bucket(keys: list[str], query: Mapping[str, int]) -> str:
    """The bucket closest to `query` in log2 distance summed over the bucket dims (ties: the smaller bucket)."""
    def distance(key: str) -> tuple[float, list[int]]:
        bucket = parse_shape_key(key)
        missing = set(bucket) - set(query)
        if missing:
            raise ConfigError(f"bucket lookup needs {sorted(missing)}, got {sorted(query)}")
        return sum(abs(math.log2(max(query[k], 1)) - math.log2(max(v, 1))) for k, v in bucket.items()), \
            [bucket[k] for k in sorted(bucket)]

    return min(keys, key=distance)


@contextmanager
def use_selected_configs(selection: Selection) -> Iterator[None]:
    """Launches inside this block use `selection`'s configs (nearest bucket); outside, the defaults."""
    for kernel, buckets in selection.items():
        for key, config in buckets.items():
            if key != "*":
                parse_shape_key(key)
            if not isinstance(config, KernelConfig) or config.kernel != kernel:
                raise ConfigError(f"kernel config selection: {kernel} bucket {key} holds {config!r}")
    token = _ACTIVE.set(selection)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def selected_config(kernel: str, **dims: int) -> KernelConfig | None:
    """The active config for a launch of `kernel` with these bucket dims (e.g. M=rows), or None (default).
    A selection bucket "*" applies to every shape (an untuned kernel's one config)."""
    active = _ACTIVE.get()
    if not active or kernel not in active or not active[kernel]:
        return None
    buckets = active[kernel]
    if "*" in buckets:
        return buckets["*"]
    return buckets[nearest_bucket(sorted(buckets), dims)]
