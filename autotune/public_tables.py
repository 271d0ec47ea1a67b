"""Public measured fused-MoE configs (vLLM's `fused_moe/configs/E=…,N=…,device_name=….json`, Apache-2.0), read
from a folder given by the caller and mapped onto our fused_moe config space. Feeds the tune stage's evidence
order (tables.py) and the cost-model calibration (calibration.py). Nothing is copied into the project.

vLLM's Triton fused_moe kernel is the twin of ours (kernels/fused_moe.py): expert-sorted pairs padded to
BLOCK_SIZE_M by moe_align, one launch config for both expert GEMMs, M = tokens. Each file records the config
vLLM's tuner (benchmarks/kernels/benchmark_moe.py --tune) timed fastest per M on one GPU; it holds no timings.
Such a config is a measurement of the twin kernel on that GPU, never of ours: entries made from it are tagged
`measured-public` and carry their source (repo, path, commit) and the mapping applied.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from qwen3export.errors import ConfigError, InputError
from qwen3export.kernels.config import KernelConfig
from qwen3export.targets import Target, get_target

from .search import kept_space
from .tables import shape_key, table_entry

KERNEL = "fused_moe"
REPO = "vllm-project/vllm"
CONFIGS_PATH = "vllm/model_executor/layers/fused_moe/configs"
LICENSE = "Apache-2.0"
VLLM_KEYS = ("BLOCK_SIZE_M", "BLOCK_SIZE_N", "BLOCK_SIZE_K", "GROUP_SIZE_M", "num_warps", "num_stages")
OURS = {"BLOCK_SIZE_M": "BLOCK_M", "BLOCK_SIZE_N": "BLOCK_N", "BLOCK_SIZE_K": "BLOCK_K", "GROUP_SIZE_M": "GROUP_SIZE_M",
        "num_warps": "num_warps", "num_stages": "num_stages"}
# A file without a dtype suffix is vLLM's unquantized table, used for both fp16 and bf16 weights
# (fused_moe.py get_config_file_name: dtype=None for fp16/bf16); our bf16 and fp16 tables may take it.
UNQUANTIZED = "bf16/fp16"
FP8 = "fp8_w8a8"
_NAME = re.compile(r"^E=(?P<E>\d+),N=(?P<N>\d+),device_name=(?P<device>[^,]+)"
                   r"(?:,dtype=(?P<dtype>[a-z0-9_]+))?(?:,block_shape=\[(?P<block>[0-9, ]+)\])?\.json$")
_COMMIT = re.compile(r"^\|\s*`(?P<file>[^`]+\.json)`\s*\|.*\|\s*`(?P<commit>[0-9a-f]{40})`\s*\|\s*$")

# GPU spec variants vLLM measured that our registry names differently. A100 PCIe parts are the SXM part's
# GA100 (108 SMs, 1410 MHz boost, same peaks) with less bandwidth: NVIDIA A100 datasheet, PCIe columns,
# 40GB HBM2 1,555 GB/s and 80GB HBM2e 1,935 GB/s. A10 (not AWS's A10G): NVIDIA A10 datasheet, 72 SMs,
# 31.2 TF FP32, 125 TF BF16/FP16 dense with fp32 accumulate at full rate (1,024 FLOP/clock/SM at
# 1,695 MHz), 24 GB GDDR6 at 600 GB/s.
_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "NVIDIA_A100-PCIe-40GB": ("a100", {"name": "a100-pcie-40gb", "memory_bandwidth": 1555e9}),
    "NVIDIA_A100_80GB_PCIe": ("a100", {"name": "a100-pcie-80gb", "memory_bandwidth": 1935e9}),
    "NVIDIA_A10": ("a10g", {"name": "a10", "sm_count": 72, "clock_hz": 1695e6,
                            "peak_flops": {"fp32": 31.2e12, "tf32": 62.5e12, "fp16": 125e12, "bf16": 125e12}}),
}
# vLLM's device_name is torch.cuda.get_device_name() with spaces as '_'. "NVIDIA H100 80GB HBM3" is the
# SXM5 part (the PCIe and NVL parts report "H100 PCIe" / "H100 NVL"). Plain "NVIDIA_H100" is left out: the
# name does not say which of the three H100s (132, 114 or 132 SMs at different clocks) was measured.
DEVICE_TARGETS = {"NVIDIA_A100-SXM4-80GB": "a100", "NVIDIA_H100_80GB_HBM3": "h100", "NVIDIA_H200": "h200",
                  "NVIDIA_L40S": "l40s", "NVIDIA_L4": "l4", "NVIDIA_GeForce_RTX_4090": "rtx4090"}


@dataclass(frozen=True)
class PublicTable:
    """One vLLM config file: its keys, provenance and per-M best config (vLLM's field names)."""

    file: str
    experts: int  # E
    n: int  # N = moe_intermediate_size / TP: our shape's I
    device_name: str
    quant: str  # UNQUANTIZED, or vLLM's dtype suffix (fp8_w8a8, int8_w8a16, ...)
    block_shape: tuple[int, ...] | None
    triton_version: str | None
    commit: str | None
    entries: dict[int, dict[str, int]]

    @property
    def source(self) -> dict[str, Any]:
        """Where the figures come from, as every entry made from them records it."""
        return {"repo": REPO, "path": f"{CONFIGS_PATH}/{self.file}", "commit": self.commit, "license": LICENSE,
                "device_name": self.device_name, "triton": self.triton_version}

    @property
    def target(self) -> Target | None:
        """Our target spec for the GPU measured (a registry target or a datasheet variant); None if we have none."""
        return device_target(self.device_name)

    def nearest(self, m: int) -> tuple[int, dict[str, int]]:
        """vLLM's run-time lookup: the entry whose M is closest to m (ties: the smaller M)."""
        key = min(self.entries, key=lambda k: (abs(k - m), k))
        return key, self.entries[key]


def device_target(device_name: str) -> Target | None:
    if device_name in DEVICE_TARGETS:
        return get_target(DEVICE_TARGETS[device_name])
    if device_name in _VARIANTS:
        base, changes = _VARIANTS[device_name]
        tgt = get_target(base)
        return dataclasses.replace(tgt, description=f"{device_name} (variant of {tgt.description})", **changes)
    return None


def read_commits(folder: Path) -> dict[str, str]:
    """file name -> commit, from the folder README's index table (column 'Commit (as read)'); {} without one."""
    readme = Path(folder) / "README.md"
    if not readme.is_file():
        return {}
    found = {}
    for line in readme.read_text().splitlines():
        hit = _COMMIT.match(line.strip())
        if hit:
            found[hit["file"]] = hit["commit"]
    return found


def parse_name(file: str) -> dict[str, Any]:
    """'E=128,N=768,device_name=NVIDIA_H200,dtype=fp8_w8a8,block_shape=[128,128].json' -> its keys."""
    hit = _NAME.match(file)
    if not hit:
        raise ConfigError(f"{file}: not a vLLM fused_moe config name (E=…,N=…,device_name=…[,dtype=…]"
                          f"[,block_shape=[…]].json)")
    block = tuple(int(v) for v in hit["block"].split(",")) if hit["block"] else None
    return {"experts": int(hit["E"]), "n": int(hit["N"]), "device_name": hit["device"],
            "quant": hit["dtype"] or UNQUANTIZED, "block_shape": block}


def read_public_table(path: Path, commit: str | None = None) -> PublicTable:
    """One vLLM config file, checked once here: M keys are token counts, every value holds the six launch
    fields (extra ones such as SPLIT_K are dropped: our kernel has no split-K); 'triton_version' is kept."""
    path = Path(path)
    keys = parse_name(path.name)
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"vLLM config {path} cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"vLLM config {path} is not a JSON object")
    entries = {}
    for key, value in data.items():
        if key == "triton_version":
            continue
        if not key.isdigit() or not isinstance(value, dict) or any(k not in value for k in VLLM_KEYS):
            raise ConfigError(f"vLLM config {path}: entry {key!r} is not M -> {{{', '.join(VLLM_KEYS)}}}")
        entries[int(key)] = {k: int(value[k]) for k in VLLM_KEYS}
    if not entries:
        raise ConfigError(f"vLLM config {path} has no M entries")
    return PublicTable(file=path.name, triton_version=data.get("triton_version"), commit=commit,
                       entries=dict(sorted(entries.items())), **keys)


def read_public_tables(folder: str | Path) -> list[PublicTable]:
    """Every vLLM config file in `folder` (sorted by name), with commits from its README."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"no folder of vLLM fused_moe configs at {folder}; give the folder holding "
                         f"'E=…,N=…,device_name=….json' files (vLLM's {CONFIGS_PATH})")
    commits = read_commits(folder)
    return [read_public_table(p, commits.get(p.name)) for p in sorted(folder.glob("E=*.json"))]


def _log2_distance(a: int, b: int) -> float:
    return abs(math.log2(a) - math.log2(b))


def map_config(vllm: dict[str, int], space: tuple[KernelConfig, ...] | list[KernelConfig]
               ) -> tuple[KernelConfig, list[str]]:
    """vLLM's launch fields -> the nearest config of our kept space, with a note per field that changed.

    Field for field (BLOCK_SIZE_M -> BLOCK_M, …) the same meaning in both kernels, except that our gate/up
    program computes BLOCK_N columns of gate AND of up (vLLM's w1 program: BLOCK_SIZE_N of the 2N columns).
    Values outside our choices go to the nearest in log2 (BLOCK 256 -> 128, GROUP_SIZE_M 16..64 -> 8,
    num_stages 5 -> 4); BLOCK_M is matched first, so it changes only when no kept config has it."""
    want = {OURS[k]: v for k, v in vllm.items()}

    def distance(config: KernelConfig) -> tuple[float, ...]:
        have = config.constexprs | {"num_warps": config.num_warps, "num_stages": config.num_stages}
        fields = ("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages", "GROUP_SIZE_M")
        return tuple(_log2_distance(have[f], want[f]) for f in fields[:1]) + \
            (sum(_log2_distance(have[f], want[f]) for f in fields[1:]),)

    best = min(space, key=distance)
    have = best.constexprs | {"num_warps": best.num_warps, "num_stages": best.num_stages}
    notes = [f"{k} {want[k]} -> {have[k]}" for k in ("BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_SIZE_M", "num_warps",
                                                       "num_stages") if have[k] != want[k]]
    return best, notes


def is_twin_shape(table: PublicTable, shape: dict[str, int], dtype: str) -> bool:
    """Whether `table` measured the twin kernel at our table's shape: same E and N = I, unquantized weights
    for our fp16/bf16 tables. vLLM's name keys no hidden size or top-k (its tuner takes them from the model
    it was run for), so those cannot be checked."""
    return (table.experts == shape["E"] and table.n == shape["I"] and table.quant == UNQUANTIZED
            and table.block_shape is None and dtype in ("bf16", "fp16"))


def public_entries(tables: list[PublicTable], target: Target, dtype: str, shape: dict[str, int],
                   buckets: tuple[dict[str, int], ...], usable: Callable[[KernelConfig], str | None]
                   ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """measured-public table entries for our fused_moe table (target, dtype, model shape): per bucket whose M a
    twin table measured on exactly this GPU (DEVICE_TARGETS; datasheet variants are other GPUs) at this
    shape, vLLM's config mapped onto our kept space. `usable(config)` says why our compiled kernel cannot run
    a config (spills, limits) or None; such a bucket is left to the model. Returns (entries, notes)."""
    entries, notes = {}, []
    twins = [t for t in tables if DEVICE_TARGETS.get(t.device_name) == target.name and is_twin_shape(t, shape, dtype)]
    if len(twins) > 1:
        raise ConfigError(f"{len(twins)} public tables measured {target.name} at {shape}: "
                          f"{', '.join(t.file for t in twins)}; keep one")
    for table in twins:
        space = kept_space(KERNEL, target.arch)
        for bucket in buckets:
            m = bucket["M"]
            if m not in table.entries:
                notes.append(f"{table.file} has no M={m} entry")
                continue
            config, mapping = map_config(table.entries[m], space)
            why_not = usable(config)
            if why_not:
                notes.append(f"{table.file} M={m}: mapped config {config.label} is unusable here ({why_not})")
                continue
            evidence = table.source | {
                "vllm_M": m, "vllm_config": dict(table.entries[m]), "mapping": mapping,
                "why": f"vLLM measured its twin fused_moe kernel's best config at E={table.experts}, N={table.n} "
                       f"({UNQUANTIZED}) on {table.device_name}; not a measurement of this kernel"}
            entries[shape_key(bucket)] = table_entry(config, "measured-public", None, 0, evidence)
    return entries, notes
