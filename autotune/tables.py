"""Tuned-config tables: JSON per (target, kernel, dtype, model shape) keyed by shape bucket; written by tune,
read by build (select_configs) and the launchers' runtime lookup (table_config). A missing table is an error.

File `<dir>/<target>/<kernel>,<shape key>,dtype=<dtype>.json` (table_filename builds every name), e.g.
`a100/fused_moe,E=128,H=2048,I=768,K=8,dtype=bf16.json`, holding
{"schema": 1, "kernel", "target", "arch", "dtype", "shape": {...}, "bucket_keys": ["M"],
 "entries": {"M=16": {"BLOCK_M": 16, …, "num_warps": 4, "num_stages": 3, "source": "modelled"|"measured"|
                      "measured-public", "objective_us": 12.3, "trials": 32, "triton": "3.9.0",
                      "qwen3export": "0.1.0", "evidence": {...}}, …}}
Keys are sorted on write so tables diff stably (vLLM's fused_moe/configs/*.json, with provenance added).
Sources, in the order a shipped table takes them per bucket (choose_entry): "measured" (timed by us on the
target's GPU), "measured-public" (the twin kernel's best measured by others on that GPU at that shape:
vLLM's tables, autotune/public_tables.py; objective_us is null, they hold no timings), "modelled" (the cost
model, calibrated where autotune/configs/calibration.json has the kernel). The optional "evidence" says why.
"""

from __future__ import annotations

import json
import os
from importlib import metadata
from pathlib import Path
from typing import Any

from qwen3export import __version__
from qwen3export.errors import ConfigError, TargetError
from qwen3export.kernels.compile import kernel_module
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.selected_configs import nearest_bucket, parse_shape_key, shape_key  # noqa: F401 (re-exported)
from qwen3export.spec import ModelSpec
from qwen3export.targets import Target, get_target

from .workloads import kernels_for, workload

SCHEMA = 1
SOURCES = ("modelled", "measured", "measured-public")
EVIDENCE_ORDER = ("measured", "measured-public", "modelled")  # best evidence first (choose_entry)
SHIPPED_DIR = Path(__file__).parent / "tables"
USER_DIR_ENV = "QWEN3EXPORT_TABLES"  # where `qwen3export tune` writes and build looks first
PROVENANCE = ("source", "objective_us", "trials", "triton", "qwen3export")
OPTIONAL_PROVENANCE = ("evidence",)  # why this source: the public table (repo, path, commit) or the calibration


class MissingTableError(TargetError):
    """No tuned table for a (target, kernel, dtype, shape): tune one; there is no silent default."""


def user_dir() -> Path:
    return Path(os.environ.get(USER_DIR_ENV) or Path.home() / ".cache" / "qwen3export" / "tables")


def search_dirs(dirs: list[Path] | None = None) -> list[Path]:
    """Where tables are looked up, first hit wins: given dirs (else the user dir), then the shipped tables."""
    return [Path(d) for d in (dirs if dirs is not None else [user_dir()])] + [SHIPPED_DIR]


def table_filename(target: str, kernel: str, dtype: str, shape: dict[str, int]) -> str:
    """The one place a table's relative path is made: '<target>/<kernel>,<shape key>,dtype=<dtype>.json'."""
    return f"{target}/{kernel},{shape_key(shape)},dtype={dtype}.json"


def config_params(config: KernelConfig) -> dict[str, int]:
    """A config as flat table fields: its constexprs plus num_warps and num_stages."""
    return config.constexprs | {"num_warps": config.num_warps, "num_stages": config.num_stages}


def config_from_params(kernel: str, params: dict[str, int]) -> KernelConfig:
    """Inverse of config_params, splitting block sizes from meta values as the kernel's DEFAULT_CONFIG does."""
    default = kernel_module(kernel).DEFAULT_CONFIG
    names = set(config_params(default))
    given = {k: v for k, v in params.items() if k not in PROVENANCE + OPTIONAL_PROVENANCE}
    if set(given) != names:
        raise ConfigError(f"{kernel} config {sorted(given)} must have exactly the fields {sorted(names)}")
    meta_names = {k for k, _ in default.meta}
    return KernelConfig(kernel, blocks={k: v for k, v in given.items() if k in dict(default.blocks)},
                        meta={k: v for k, v in given.items() if k in meta_names},
                        num_warps=given["num_warps"], num_stages=given["num_stages"])


def table_entry(config: KernelConfig, source: str, objective_us: float | None, trials: int,
                evidence: dict[str, Any] | None = None) -> dict[str, Any]:
    """A table entry; objective_us is None only for "measured-public" (a public table holds no timings), and
    `triton` is then the version the public measurement recorded (None if it recorded none)."""
    if source not in SOURCES:
        raise ConfigError(f"table entry source {source!r} must be one of {SOURCES}")
    if (objective_us is None) != (source == "measured-public"):
        raise ConfigError(f"a {source} entry {'needs' if objective_us is None else 'has no'} objective_us")
    version = (evidence or {}).get("triton") if source == "measured-public" else metadata.version("triton")
    entry = config_params(config) | {"source": source, "trials": int(trials), "triton": version,
                                     "qwen3export": __version__,
                                     "objective_us": None if objective_us is None else round(float(objective_us), 3)}
    return entry | ({"evidence": dict(evidence)} if evidence else {})


def choose_entry(candidates: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """The entry of the best evidence present (EVIDENCE_ORDER): source -> entry or None."""
    for source in EVIDENCE_ORDER:
        entry = candidates.get(source)
        if entry is not None:
            if entry["source"] != source:
                raise ConfigError(f"candidate for {source} is tagged {entry['source']}")
            return entry
    raise ConfigError(f"no candidate entry among {sorted(candidates)}")


def validate_table(data: Any, where: str) -> dict[str, Any]:
    """Check a table read from disk once, at the boundary; returns it unchanged."""
    def need(cond: bool, why: str) -> None:
        if not cond:
            raise ConfigError(f"tuned table {where} {why}; regenerate it with `qwen3export tune`")

    need(isinstance(data, dict) and data.get("schema") == SCHEMA, f"is not a schema-{SCHEMA} table")
    for key in ("kernel", "target", "dtype", "shape", "bucket_keys", "entries"):
        need(key in data, f"lacks {key!r}")
    need(isinstance(data["entries"], dict) and data["entries"], "has no entries")
    for bucket, entry in data["entries"].items():
        need(sorted(parse_shape_key(bucket)) == sorted(data["bucket_keys"]), f"has bucket {bucket!r} not keyed by "
             f"{data['bucket_keys']}")
        need(isinstance(entry, dict) and entry.get("source") in SOURCES, f"entry {bucket} has no valid source")
        need(all(k in entry for k in PROVENANCE), f"entry {bucket} lacks one of {PROVENANCE}")
        need((entry["objective_us"] is None) == (entry["source"] == "measured-public"),
             f"entry {bucket}: objective_us must be null exactly for measured-public entries")
        if entry["source"] == "measured-public":
            source = (entry.get("evidence") or {})
            need(all(source.get(k) for k in ("repo", "path", "commit")),
                 f"entry {bucket} is measured-public without its source (evidence: repo, path, commit)")
        try:
            config_from_params(data["kernel"], entry)
        except ConfigError as exc:
            need(False, f"entry {bucket}: {exc}")
    return data


def read_table(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"tuned table {path} cannot be read ({exc}); regenerate it with `qwen3export tune`") from None
    return validate_table(data, str(path))


def write_table(out_dir: Path, target: Target, kernel: str, dtype: str, shape: dict[str, int],
                entries: dict[str, dict[str, Any]]) -> Path:
    """Merge `entries` (bucket key -> table_entry) into the table file, replacing equal buckets; atomic write."""
    path = Path(out_dir) / table_filename(target.name, kernel, dtype, shape)
    old = read_table(path)["entries"] if path.exists() else {}
    data = {"schema": SCHEMA, "kernel": kernel, "target": target.name, "arch": target.arch, "dtype": dtype,
            "shape": dict(shape), "bucket_keys": sorted(workload(kernel).bucket_keys), "entries": old | entries}
    validate_table(data, str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + f".{os.getpid()}")
    partial.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n")
    partial.replace(path)
    return path


def tune_command(target: str, kernel: str, dtype: str, model: str | None) -> str:
    return (f"qwen3export tune --target {target} --kernel {kernel}" + (f" --model {model}" if model else "")
            + f" --dtype {dtype}")


def find_table(target: str, kernel: str, dtype: str, shape: dict[str, int], dirs: list[Path] | None = None,
               model: str | None = None) -> tuple[Path, dict[str, Any]]:
    """The first table for these keys in search_dirs(dirs); MissingTableError naming it and the fix if none."""
    name = table_filename(target, kernel, dtype, shape)
    looked = search_dirs(dirs)
    for folder in looked:
        if (folder / name).is_file():
            return folder / name, read_table(folder / name)
    raise MissingTableError(f"no tuned {kernel} table for target {target} dtype {dtype} shape {shape_key(shape)}: "
                            f"{name} is in none of {', '.join(str(d) for d in looked)}; create it with "
                            f"`{tune_command(target, kernel, dtype, model)}`")


def table_config(target: str, kernel: str, dtype: str, shape: dict[str, int], dirs: list[Path] | None = None
               ) -> tuple[KernelConfig, dict[str, Any]]:
    """The tuned config for a full problem shape (model dims + bucket dims): nearest bucket of its table."""
    bucket_keys = workload(kernel).bucket_keys
    fixed = {k: v for k, v in shape.items() if k not in bucket_keys}
    _, table = find_table(target, kernel, dtype, fixed, dirs)
    key = nearest_bucket(sorted(table["entries"]), {k: shape[k] for k in bucket_keys if k in shape})
    entry = table["entries"][key]
    return config_from_params(kernel, entry), entry


def select_configs(target: str | Target, spec: ModelSpec, dtype: str, dirs: list[Path] | None = None,
                   missing: str = "raise") -> list[dict[str, Any]]:
    """Per kernel the model runs: its table and every bucket's config with its tag (measured / measured-public /
    modelled) and evidence, for the artifact manifest. A kernel without a table: missing="raise" raises MissingTableError (with the tune
    command); missing="default" selects the kernel's DEFAULT_CONFIG for every shape (bucket "*"), tagged
    source "default" (neither tuned nor modelled), with the tune command that would replace it."""
    if missing not in ("raise", "default"):
        raise ConfigError(f"select_configs(missing={missing!r}): choose 'raise' or 'default'")
    target = get_target(target) if isinstance(target, str) else target
    target.check_dtype(dtype)
    out = []
    for kernel in kernels_for(spec):
        shape = workload(kernel).fixed(spec)
        try:
            path, table = find_table(target.name, kernel, dtype, shape, dirs, model=spec.name)
        except MissingTableError:
            if missing == "raise":
                raise
            out.append({"kernel": kernel, "table": None, "shipped": False, "shape": shape,
                        "configs": {"*": {"config": kernel_module(kernel).DEFAULT_CONFIG.to_dict(),
                                          "source": "default"}},
                        "sources": ["default"], "tune": tune_command(target.name, kernel, dtype, spec.name)})
            continue
        configs = {key: {"config": config_from_params(kernel, entry).to_dict(),
                         **{k: entry[k] for k in PROVENANCE + OPTIONAL_PROVENANCE if k in entry}}
                   for key, entry in sorted(table["entries"].items())}
        out.append({"kernel": kernel, "table": table_filename(target.name, kernel, dtype, shape),
                    "shipped": path.is_relative_to(SHIPPED_DIR), "shape": shape, "configs": configs,
                    "sources": sorted({c["source"] for c in configs.values()})})
    return out


def active_selection(selected: list[dict[str, Any]]) -> dict[str, dict[str, KernelConfig]]:
    """select_configs' (or a manifest's) entries -> kernels/selected_configs.py's {kernel: {bucket: KernelConfig}}."""
    return {e["kernel"]: {key: KernelConfig.from_dict(c["config"]) for key, c in e["configs"].items()}
            for e in selected}
