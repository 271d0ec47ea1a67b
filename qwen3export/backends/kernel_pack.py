"""The `kernels` backend: the model's Triton kernels cross-compiled for the target's arch, one per tuned config.

For every kernel the model runs (autotune/workloads.py kernels_for) and every distinct config its tuned table
selects (autotune/tables.py select_configs; a kernel without a table gets its DEFAULT_CONFIG, tagged
"default"), each @triton.jit function is compiled for the target's sm_XX with the model's own constants
(head_dim, GQA group, experts, top-k, hidden sizes) and the pack keeps, per function, Triton's own files:
    kernels/<kernel>/<config label>/<function>.json    Triton's metadata (name, num_warps, shared, target, hash…)
    kernels/<kernel>/<config label>/<function>.cubin   the binary for the arch
    kernels/<kernel>/<config label>/<function>.ptx     PTX (newer GPUs JIT it)
    kernels/<kernel>/<config label>/<function>.source  the Python source it was compiled from

plus kernels/pack.json: the selection (kernel -> shape bucket -> config, with its measured/modelled/default
tag), the launch signature of every function, and its resource report (registers, spills, shared memory) read
from the cubin with the bundled cuobjdump. The manifest lists every file with its sha256 (artifact.seal).

`load_kernel_pack` rebuilds Triton's CompiledKernel objects from those files (what Triton does on a cache hit)
and `KernelPack.launch` runs one on a CUDA device of the pack's arch: the only GPU-only code here.
Verification on this machine is in verify.py (`verify_kernel_pack`): every cubin is re-read (resources as
recorded, within the arch's limits, no spills), every CompiledKernel is rebuilt from the pack, and the model is
run with the pack's configs through Triton's interpreter against eager PyTorch (small models).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
import triton
from triton.compiler import CompiledKernel

from qwen3export.artifact import check_relative_path, read_json
from qwen3export.autotune.tables import active_selection, select_configs
from qwen3export.errors import ArtifactError, TargetError
from qwen3export.kernels.compile import (ast_source, cross_compile, cuobjdump_path, kernel_module, parse_resource_usage,
                                         supports, verdict)
from qwen3export.kernels.config import KernelConfig, arch_limits
from qwen3export.kernels.launch import INTERPRET_ENV, as_jit
from qwen3export.manifest import KernelsRecord
from qwen3export.spec import ModelSpec

PACK_DIR = "kernels"
PACK_INDEX = "kernels/pack.json"
PACK_SUFFIXES = (".json", ".cubin", ".ptx", ".source")
WORKER_TIMEOUT_S = 1800


def pack_dtype(target, dtype: str) -> str:
    """The dtype the kernels are compiled for: the build's if it is a GPU compute dtype, else the target's best
    16-bit dtype (engines are verified in fp32 here; on the GPU they run in 16 bits)."""
    if dtype in ("fp16", "bf16"):
        target.check_dtype(dtype)
        return dtype
    return "bf16" if "bf16" in target.dtypes else "fp16"


def compile_shape(kernel: str, spec: ModelSpec, config: dict[str, Any] | None = None,
                  block_m: int | None = None) -> dict[str, Any]:
    """The model's constants in each kernel's compile_specs vocabulary (kernels/<name>.py COMPILE_SHAPES)."""
    if kernel == "rms_norm":
        return {"hidden": spec.hidden_size}
    if kernel in ("qk_norm_rope", "attention_prefill"):
        return {"head_dim": spec.head_dim}
    if kernel == "attention_decode":
        return {"head_dim": spec.head_dim, "group": spec.num_attention_heads // spec.num_key_value_heads}
    if kernel == "moe_routing":
        return {"hidden": spec.hidden_size, "experts": spec.num_experts, "top_k": spec.num_experts_per_tok,
                "normalize": spec.norm_topk_prob}
    if kernel == "moe_align":
        return {"experts": spec.num_experts, "block_m": block_m or 64}
    if kernel == "fused_moe":
        return {"hidden": spec.hidden_size, "inter": spec.moe_intermediate_size}
    raise TargetError(f"the kernels backend has no compile shape for kernel {kernel!r}")


# ------------------------------------------------------------------------- quantized builds (build --quant)
QUANT_KERNELS = {"int4": ("wq_matmul", "fused_moe_wq"), "int8": ("wq_matmul", "fused_moe_wq"),
                 "fp8": ("fp8_matmul",)}
QUANT_NOT_TUNED = ("no tuned table: the quantized kernels are not in autotune's workloads yet; the pack compiles "
                   "the kernel's DEFAULT_CONFIG")


def quantized_selection(selection: list[dict[str, Any]], spec: ModelSpec, target,
                        quantization: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """select_configs' entries for a quantized model: fused_moe gives way to fused_moe_wq (quantized experts),
    and the GEMM kernels the quantized linears run (wq_matmul for int4 / int8, fp8_matmul for fp8) join with
    their DEFAULT_CONFIG (source "default": no tuned table exists for them). Unchanged when not quantized."""
    if not quantization:
        return selection
    wanted = [k for k in QUANT_KERNELS[quantization["mode"]] if k != "fused_moe_wq" or spec.is_moe]
    out = [e for e in selection if not (e["kernel"] == "fused_moe" and spec.is_moe)]
    for kernel in wanted:
        if not supports(kernel, arch_limits(target.compute_capability)):
            raise TargetError(f"--quant {quantization['mode']} runs {kernel}, which does not compile for "
                              f"{target.arch}; use --quant int8 or int4")
        out.append({"kernel": kernel, "table": None, "shipped": False, "shape": {},
                    "configs": {"*": {"config": kernel_module(kernel).DEFAULT_CONFIG.to_dict(), "source": "default"}},
                    "sources": ["default"], "tune": QUANT_NOT_TUNED})
    return out


def quant_compile_shapes(kernel: str, spec: ModelSpec, quantization: Mapping[str, Any]) -> list[tuple[str, dict]]:
    """(label suffix, shape) per distinct binary a quantized kernel needs for this model: wq_matmul once per
    (group layout, zero points) over the quantized linears' K (q/k/v/gate/up and lm_head read hidden, o_proj
    heads * head_dim, a dense down_proj the intermediate size), fused_moe_wq once per zero-point variant,
    fp8_matmul once (K and N are run-time arguments). AWQ / GPTQ checkpoints get the zero-point variants too."""
    mode, group = quantization["mode"], quantization.get("group_size")
    bits = 4 if mode == "int4" else 8
    zero_points = (0, 1) if quantization.get("scheme", "rtn") != "rtn" else (0,)
    if kernel == "fp8_matmul":
        return [("", {"K": spec.hidden_size, "N": spec.num_attention_heads * spec.head_dim})]
    per_channel = group is None or group == -1  # int8 RTN, or a checkpoint's group_size -1
    if kernel == "fused_moe_wq":
        return [(f",zp={zp}" if len(zero_points) > 1 else "",
                 {"bits": bits, "hidden": spec.hidden_size, "inter": spec.moe_intermediate_size,
                  "group": 0 if per_channel else group, "zero_points": zp}) for zp in zero_points]
    if kernel != "wq_matmul":
        raise TargetError(f"the kernels backend has no quantized compile shape for kernel {kernel!r}")
    linears = [(spec.hidden_size, spec.num_attention_heads * spec.head_dim),  # q_proj: K hidden
               (spec.num_attention_heads * spec.head_dim, spec.hidden_size)]  # o_proj
    if len(spec.moe_layers) < spec.num_hidden_layers:
        linears.append((spec.intermediate_size, spec.hidden_size))  # a dense layer's down_proj
    shapes: dict[tuple, tuple[str, dict]] = {}
    for k, n in linears:
        g = k if group is None or group == -1 else group  # per channel, or the group
        layout = g if k // g > 1 else "K"  # block_k_for: capped at the group only when there are several
        for zp in zero_points:
            shapes.setdefault((layout, zp), (f",bits={bits},group={layout},zp={zp}",
                                             {"bits": bits, "K": k, "N": n, "group": g, "zero_points": zp}))
    return list(shapes.values())


def plan_jobs(selection: list[dict[str, Any]], spec: ModelSpec, dtype: str, cc: int,
              quantization: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """One compile job per (kernel, distinct config, compile shape, Triton function). moe_align is compiled
    once per BLOCK_M that the selected fused_moe / fused_moe_wq configs use (its sort tile must equal the
    expert GEMM's); the quantized kernels once per shape quant_compile_shapes names."""
    block_ms = sorted({c["config"]["blocks"]["BLOCK_M"] for e in selection
                       if e["kernel"] in ("fused_moe", "fused_moe_wq") for c in e["configs"].values()}) or [None]
    jobs: list[dict[str, Any]] = []
    for entry in selection:
        kernel = entry["kernel"]
        configs = {KernelConfig.from_dict(c["config"]) for c in entry["configs"].values()}
        for config in sorted(configs, key=lambda c: c.label):
            if kernel == "moe_align":
                shapes = [(f",block_m={m}" if m else "", compile_shape(kernel, spec, block_m=m)) for m in block_ms]
            elif quantization and kernel in QUANT_KERNELS[quantization["mode"]]:
                shapes = quant_compile_shapes(kernel, spec, quantization)
            else:
                shapes = [("", compile_shape(kernel, spec))]
            for suffix, shape in shapes:
                specs = kernel_module(kernel).compile_specs(config, dtype, shape)
                for index, cs in enumerate(specs):
                    label = config.label + suffix
                    function = getattr(cs.fn, "__name__", None) or cs.fn.fn.__name__
                    jobs.append({"kernel": kernel, "config": config.to_dict(), "label": label, "dtype": dtype,
                                 "shape": shape, "index": index, "cc": cc, "function": function,
                                 "variant": f"{index}-{function}", "dir": f"{PACK_DIR}/{kernel}/{label}/{index}"})
    return jobs


def _spec(job: dict[str, Any]):
    return kernel_module(job["kernel"]).compile_specs(KernelConfig.from_dict(job["config"]), job["dtype"],
                                                      job["shape"])[job["index"]]


def _launch_signature(spec) -> list[dict[str, Any]]:
    """Every argument of the @triton.jit function in order: pointer (with element type), scalar or constexpr
    (with its compiled value). A launcher passes them all, constexprs included, as Triton's own launch does."""
    out = []
    for name in as_jit(spec.fn).arg_names:
        if name in spec.constexprs:
            value = spec.constexprs[name]
            out.append({"name": name, "kind": "constexpr", "value": value if isinstance(value, (bool, int, float))
                        else str(value)})
        elif name in spec.pointers:
            out.append({"name": name, "kind": "pointer", "dtype": spec.pointers[name]})
        else:
            out.append({"name": name, "kind": "scalar", "dtype": spec.scalars.get(name, "i32"),
                        "divisible_by_16": name in spec.aligned,
                        "divisible_by": 16 if name in spec.aligned else spec.divisible.get(name, 1)})
    return out


def _compile_job(job: dict[str, Any], root: Path) -> dict[str, Any]:
    """Compile one function for its arch, copy Triton's files into the pack, read the cubin's resources."""
    spec = _spec(job)
    compiled = cross_compile(spec, job["cc"])
    folder = root / job["dir"]
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for name, path in sorted(compiled.metadata_group.items()):
        if Path(name).suffix in PACK_SUFFIXES:
            shutil.copyfile(path, folder / name)
            files.append(f"{job['dir']}/{name}")
    cubin = folder / f"{compiled.metadata.name}.cubin"
    text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                          check=True).stdout
    usage = parse_resource_usage(text)[compiled.metadata.name]
    return {"name": compiled.metadata.name, "hash": compiled.hash, "files": files,
            "num_warps": compiled.metadata.num_warps, "num_stages": compiled.metadata.num_stages,
            "registers": usage["registers"], "spill_bytes": usage["stack"], "local_bytes": usage["local"],
            "shared_bytes": usage["shared"] + compiled.metadata.shared, "signature": _launch_signature(spec)}


def clean_env() -> dict[str, str]:
    """An interpreter that imported triton in interpreter mode cannot compile: workers start without it."""
    return {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", INTERPRET_ENV)}


def compile_jobs(jobs: list[dict[str, Any]], root: Path) -> list[dict[str, Any]]:
    """Run the compile jobs in a clean subprocess (`python -m qwen3export.backends.kernel_pack compile`)."""
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "jobs.json").write_text(json.dumps(jobs))
        proc = subprocess.run([sys.executable, "-m", "qwen3export.backends.kernel_pack", "compile",
                               str(Path(tmp) / "jobs.json"), str(root), str(Path(tmp) / "out.json")],
                              env=clean_env(), capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise TargetError(f"cross-compiling the kernel pack failed: {tail}")
        return json.loads((Path(tmp) / "out.json").read_text())


def emit_kernel_pack(spec: ModelSpec, target, dtype: str, folder: Path, tables: list[Path] | None = None,
                     progress: Callable[[str], None] = lambda s: None,
                     quantization: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write the pack into `folder` (an artifact being staged); returns the manifest's `engine` entry.
    `quantization` (the manifest's record of a quantized build) adds the quantized GEMM kernels the model runs."""
    if target.kind != "gpu":
        raise TargetError(f"--backend kernels cross-compiles for an NVIDIA GPU arch; target {target.name} has none")
    kdtype = pack_dtype(target, dtype)
    selection = quantized_selection(select_configs(target, spec, kdtype, tables, missing="default"), spec, target,
                                    quantization)
    jobs = plan_jobs(selection, spec, kdtype, target.compute_capability, quantization)
    progress(f"cross-compiling {len(jobs)} kernel functions for {target.arch} ({kdtype})")
    results = compile_jobs(jobs, folder)
    limits = arch_limits(target.compute_capability)
    functions, invalid = [], []
    for job, res in zip(jobs, results):
        valid, reason = verdict({k: res[k] for k in ("registers", "spill_bytes", "local_bytes", "shared_bytes")},
                                res["num_warps"], limits)
        functions.append({"kernel": job["kernel"], "config": job["label"], "variant": job["variant"],
                          "shape": job["shape"], "index": job["index"], "config_dict": job["config"],
                          "valid": valid, "reason": reason, **res})
        if not valid:
            invalid.append(f"{job['kernel']} {job['label']} {job['function']}: {reason}")
    if invalid:
        raise TargetError(f"the tuned kernel configs do not fit {target.arch} at this model's shapes "
                          f"({'; '.join(invalid[:3])}); retune with `qwen3export tune --target {target.name} "
                          f"--model {spec.name}`")
    index = {"schema": 1, "arch": target.arch, "compute_capability": target.compute_capability, "dtype": kdtype,
             "triton": _triton_version(), "selection": selection, "functions": functions,
             "quantization": quantization}
    (folder / PACK_INDEX).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    sources = sorted({s for e in selection for s in e["sources"]})
    return {"format": "triton-kernel-pack", "index": PACK_INDEX, "arch": target.arch, "dtype": kdtype,
            "functions": len(functions), "kernels": [_kernel_summary(e) for e in selection],
            "sources": sources, "status": "built",
            "loader": "qwen3export.backends.kernel_pack.load_kernel_pack (needs a CUDA GPU of this arch to launch)"}


def _kernel_summary(entry: dict[str, Any]) -> dict[str, Any]:
    return {"kernel": entry["kernel"], "table": entry["table"], "shipped": entry["shipped"],
            "sources": entry["sources"],
            "configs": {key: {"config": _label(c["config"]), "source": c["source"],
                              **({"objective_us": c["objective_us"]} if "objective_us" in c else {})}
                        for key, c in entry["configs"].items()}}


def _label(config: dict[str, Any]) -> str:
    return KernelConfig.from_dict(config).label


def _triton_version() -> str:
    return triton.__version__


# ------------------------------------------------------------------------------------------------ load
@dataclass
class KernelPack:
    """A loaded pack: Triton CompiledKernel objects by (kernel, config label, variant), variant being
    "<index>-<function name>" (one kernel may compile a function more than once, e.g. rms_norm with and
    without the residual add)."""

    folder: Path
    index: dict[str, Any]
    compiled: dict[tuple[str, str, str], Any] = field(default_factory=dict)

    def selection(self) -> dict[str, dict[str, Any]]:
        """kernels/selected_configs.py's {kernel: {bucket: KernelConfig}} for these configs."""
        return active_selection(self.index["selection"])

    def function(self, kernel: str, label: str, variant: str):
        try:
            return self.compiled[(kernel, label, variant)]
        except KeyError:
            raise TargetError(f"kernel pack {self.folder} has no {kernel} {variant} for config {label}") from None

    def launch(self, kernel: str, label: str, variant: str, grid: tuple[int, ...], *args: Any) -> None:
        """Launch one packed function on the current CUDA device (which must be the pack's arch): every
        argument of the @triton.jit signature in order (pack.json `signature`), constexprs included."""
        if not torch.cuda.is_available():
            raise TargetError("launching a kernel pack needs a CUDA GPU; this machine has none")
        major, minor = torch.cuda.get_device_capability()
        if 10 * major + minor != self.index["compute_capability"]:
            raise TargetError(f"this kernel pack is for {self.index['arch']}; the GPU here is sm_{major}{minor}")
        self.function(kernel, label, variant)[grid](*args)


def checked_index(folder: Path) -> dict[str, Any]:
    """The pack index, its file names kept inside the artifact: every function's files are plain relative paths
    (the artifact loader checks they are listed and checksummed), and its cubin is one of them."""
    fix = "rebuild the artifact"
    index = read_json(folder / PACK_INDEX, "kernel pack index", fix)
    functions = index.get("functions") if isinstance(index, dict) else None
    if not isinstance(functions, list):
        raise ArtifactError(f"{PACK_INDEX} is malformed (no list of functions); {fix}")
    for f in functions:
        if not (isinstance(f, dict) and isinstance(f.get("files"), list) and f["files"]
                and isinstance(f.get("name"), str)):
            raise ArtifactError(f"{PACK_INDEX} is malformed (a function without files or name); {fix}")
        for rel in f["files"]:
            check_relative_path(folder, rel)
        cubin = f"{Path(f['files'][0]).parent.as_posix()}/{f['name']}.cubin"
        if cubin not in f["files"]:
            raise ArtifactError(f"{PACK_INDEX}: function {f['name'][:60]!r} names no cubin among its files; {fix}")
    return index


def load_kernel_pack(folder: str | Path) -> KernelPack:
    """Rebuild every packed function as a Triton CompiledKernel (no GPU needed until a launch)."""
    folder = Path(folder)
    path = folder / PACK_INDEX
    if not path.is_file():
        raise ArtifactError(f"{folder} has no {PACK_INDEX}; it is not a kernel-pack artifact")
    index = checked_index(folder)
    pack = KernelPack(folder, index)
    for f in index["functions"]:
        group = {Path(p).name: str(folder / p) for p in f["files"]}
        missing = [p for p in f["files"] if not (folder / p).is_file()]
        if missing:
            raise ArtifactError(f"kernel pack file {missing[0]} is missing; rebuild the artifact")
        job = {"kernel": f["kernel"], "config": f["config_dict"], "dtype": index["dtype"], "shape": f["shape"],
               "index": f["index"]}
        compiled = CompiledKernel(ast_source(_spec(job)), group, f["hash"])
        pack.compiled[(f["kernel"], f["config"], f["variant"])] = compiled
    return pack


# ---------------------------------------------------------------------------------------------- verify
if __name__ == "__main__":
    command = sys.argv[1]
    if command == "compile":  # jobs.json root out.json
        jobs_in = json.loads(Path(sys.argv[2]).read_text())
        Path(sys.argv[4]).write_text(json.dumps([_compile_job(j, Path(sys.argv[3])) for j in jobs_in]))
    else:
        raise SystemExit(f"unknown command {command!r}")


def tuned_kernels_record(spec: ModelSpec, target, dtype: str, quantization: Mapping[str, Any] | None = None
                         ) -> KernelsRecord | None:
    """The manifest's `kernels` entry for a GPU target: per kernel the model runs, the config chosen for each
    shape bucket and how (measured / modelled, from the target's tuned table; default where no table has the
    model's shapes, with the `tune` command that would make one). None for CPU targets (no Triton kernels)."""
    if target.kind != "gpu":
        return None

    kdtype = pack_dtype(target, dtype)
    selected = quantized_selection(select_configs(target, spec, kdtype, missing="default"), spec, target,
                                   quantization)
    return {"dtype": kdtype, "arch": target.arch, "sources": sorted({s for e in selected for s in e["sources"]}),
            "kernels": [{k: e[k] for k in ("kernel", "table", "shipped", "sources", "configs", "tune") if k in e}
                        for e in selected]}
