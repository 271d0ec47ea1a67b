"""Cross-compile kernel configs for sm_80/86/89/90 with no GPU and read registers, spills and shared memory.

Feeds the `kernels` backend and `qwen3export kernels compile`: `compile_report(arch)` says which configs
fit each arch. Compiling takes ~0.5-3 s per function, so measurements are cached on disk.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.language import standard

from qwen3export.errors import InputError, TargetError
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, arch_limits
from qwen3export.kernels.launch import INTERPRET_ENV, as_jit

KERNELS = ("rms_norm", "qk_norm_rope", "attention_prefill", "attention_decode", "moe_routing", "moe_align",
           "fused_moe", "wq_matmul", "fused_moe_wq", "fp8_matmul")
DTYPES = ("fp16", "bf16", "fp32")
DEFAULT_CACHE_DIR = Path.home() / ".cache" / "qwen3export" / "kernel-compile"
# cuobjdump --dump-resource-usage prints, per function: "REG:86 STACK:0 SHARED:0 LOCAL:0 CONSTANT[0]:408 …"
_RESOURCE_LINE = re.compile(r"Function\s+(\S+):\s*\n\s*REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")


def kernel_module(name: str):
    if name not in KERNELS:
        raise InputError(f"unknown kernel {name!r}; known kernels: {', '.join(KERNELS)}")
    return importlib.import_module(f"qwen3export.kernels.{name}")


def supports(name: str, arch: ArchLimits) -> bool:
    """Whether a kernel runs on `arch`: a module's ARCHS (e.g. fp8_matmul's sm_89 / sm_90) limits it; default all."""
    return arch.arch in getattr(kernel_module(name), "ARCHS", (arch.arch,))


def kernels_for_arch(arch_or_cc: str | int) -> tuple[str, ...]:
    arch = arch_limits(arch_or_cc)
    return tuple(k for k in KERNELS if supports(k, arch))


def cuobjdump_path() -> str:
    return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump")


def parse_resource_usage(text: str) -> dict[str, dict[str, int]]:
    """cuobjdump --dump-resource-usage text -> {function: {registers, stack, shared, local}}."""
    return {m[1]: {"registers": int(m[2]), "stack": int(m[3]), "shared": int(m[4]), "local": int(m[5])}
            for m in _RESOURCE_LINE.finditer(text)}


def ast_source(spec: CompileSpec):
    """The triton ASTSource of one spec: signature, constexprs and divisibility hints as the runtime specialises.
    A kernel pack rebuilds the same source to relaunch its cubins (qwen3export/backends/kernel_pack.py)."""
    fn = as_jit(spec.fn)
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in spec.constexprs:
            signature[name] = "constexpr"
        elif name in spec.pointers:
            signature[name] = "*" + spec.pointers[name]
            attrs[(index,)] = [["tt.divisibility", 16]]  # torch allocations are 256-byte aligned
        else:
            signature[name] = spec.scalars.get(name, "i32")
            if name in spec.aligned:
                attrs[(index,)] = [["tt.divisibility", 16]]
            elif name in spec.divisible:  # a multiple of 8, 4 or 2 at this shape (config.divisibility_hints)
                attrs[(index,)] = [["tt.divisibility", spec.divisible[name]]]
    return ASTSource(fn, signature, constexprs=dict(spec.constexprs), attrs=attrs)


def cross_compile(spec: CompileSpec, cc: int):
    """triton.compile of one spec for compute capability `cc` (no GPU needed); returns triton's CompiledKernel."""
    # enable_fp_fusion given explicitly: Triton 3.9 warns that its default (on) changes in 3.10
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": True}
    return triton.compile(ast_source(spec), target=GPUTarget("cuda", cc, 32), options=options)


def measure(spec: CompileSpec, cc: int) -> dict[str, Any]:
    """Compile one spec and read REG / STACK / SHARED / LOCAL from its cubin with the bundled cuobjdump."""
    start = time.perf_counter()
    try:
        compiled = cross_compile(spec, cc)
    except Exception as exc:  # a config the compiler rejects is a result, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                "seconds": round(time.perf_counter() - start, 2)}
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        text = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(cubin)], capture_output=True,
                              text=True, check=True).stdout
    usage = parse_resource_usage(text).get(compiled.metadata.name)
    if usage is None:
        return {"error": f"cuobjdump printed no resource usage for {compiled.metadata.name}",
                "seconds": round(time.perf_counter() - start, 2)}
    # Triton allocates its shared memory dynamically (metadata.shared); cuobjdump's SHARED is the static part
    return {"registers": usage["registers"], "spill_bytes": usage["stack"], "local_bytes": usage["local"],
            "shared_bytes": usage["shared"] + compiled.metadata.shared,
            "seconds": round(time.perf_counter() - start, 2)}


def verdict(measured: dict[str, Any], num_warps: int, limits: ArchLimits) -> tuple[bool, str]:
    """valid = compiled, no spills, shared memory and registers within the arch's per-block limits."""
    if "error" in measured:
        return False, f"compile failed: {measured['error']}"
    threads = 32 * num_warps
    block_regs = limits.block_registers(measured["registers"], num_warps)
    reasons = []
    if measured["spill_bytes"] or measured["local_bytes"]:
        reasons.append(f"spills {measured['spill_bytes']} B stack / {measured['local_bytes']} B local")
    if measured["shared_bytes"] > limits.max_shared_per_block:
        reasons.append(f"shared {measured['shared_bytes']} B > {limits.max_shared_per_block} B per block")
    if measured["registers"] > limits.registers_per_thread:
        reasons.append(f"{measured['registers']} registers > {limits.registers_per_thread} per thread")
    if block_regs > limits.registers_per_block:
        reasons.append(f"{block_regs} registers per block > {limits.registers_per_block}")
    if threads > limits.max_threads_per_block:
        reasons.append(f"{threads} threads > {limits.max_threads_per_block} per block")
    return not reasons, "; ".join(reasons) or "ok"


def _jobs(arch: ArchLimits, kernels, dtype: str, configs) -> list[dict[str, Any]]:
    jobs = []
    for name in kernels:
        module = kernel_module(name)
        if not supports(name, arch):
            raise TargetError(f"kernel {name} runs only on {', '.join(module.ARCHS)}, not {arch.arch}")
        if configs == "space":
            chosen = [c for c in module.CONFIG_SPACE if module.keep(c, arch)]
        elif configs == "default":
            chosen = [module.DEFAULT_CONFIG]
        else:
            chosen = [c for c in configs if c.kernel == name]
        for config in chosen:
            for shape in module.COMPILE_SHAPES:
                for index, spec in enumerate(module.compile_specs(config, dtype, shape)):
                    jobs.append({"kernel": name, "config": config.to_dict(), "dtype": dtype, "shape": shape,
                                 "index": index, "cc": arch.compute_capability, "spec": spec})
    return jobs


def _cache_key(job: dict[str, Any]) -> str:
    """What the compiler sees: the kernel file's source, the specialisation, the arch, Triton's version.
    Configs that specialise a function identically (e.g. the decode reduce kernel, which ignores
    BLOCK_N) share one compile."""
    spec: CompileSpec = job["spec"]
    module = kernel_module(job["kernel"])
    # a kernel calling @triton.jit helpers of another kernel file names it in JIT_DEPENDS (fused_moe_wq)
    files = [module.__file__] + [importlib.import_module(m).__file__ for m in getattr(module, "JIT_DEPENDS", ())]
    source = b"".join(Path(f).read_bytes() for f in files)
    key = {"source": hashlib.sha256(source).hexdigest(), "triton": triton.__version__, "cc": job["cc"],
           "function": as_jit(spec.fn).__name__, "pointers": spec.pointers, "aligned": sorted(spec.aligned),
           "divisible": spec.divisible,
           "constexprs": {k: repr(v) for k, v in spec.constexprs.items()}, "scalars": spec.scalars,
           "num_warps": spec.num_warps, "num_stages": spec.num_stages}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


def _spec_of(job: dict[str, Any]) -> CompileSpec:
    module = kernel_module(job["kernel"])
    return module.compile_specs(KernelConfig.from_dict(job["config"]), job["dtype"], job["shape"])[job["index"]]


def _interpreting() -> bool:
    return type(standard.sum).__name__ == "InterpretedFunction"


def _measure_in_subprocesses(jobs: list[dict[str, Any]], workers: int) -> list[dict[str, Any]]:
    """Compile in clean interpreters: one that imported triton in interpreter mode cannot compile."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", INTERPRET_ENV)}
    portable = [{k: v for k, v in job.items() if k != "spec"} for job in jobs]
    chunks = [chunk for chunk in (portable[i::workers] for i in range(workers)) if chunk]
    results: list[dict[str, Any]] = [{}] * len(jobs)
    with tempfile.TemporaryDirectory() as tmp:
        procs = []
        for worker, chunk in enumerate(chunks):  # files, not pipes: workers run at once and never block
            (Path(tmp) / f"{worker}.in").write_text(json.dumps(chunk))
            with open(Path(tmp) / f"{worker}.in") as stdin, open(Path(tmp) / f"{worker}.out", "w") as stdout, \
                    open(Path(tmp) / f"{worker}.err", "w") as stderr:
                procs.append(subprocess.Popen([sys.executable, "-m", "qwen3export.kernels.compile"], stdin=stdin,
                                              stdout=stdout, stderr=stderr, env=env))
        for worker, proc in enumerate(procs):
            if proc.wait() != 0:
                tail = (Path(tmp) / f"{worker}.err").read_text().strip().splitlines()[-1:]
                raise RuntimeError(f"kernel compile worker failed: {tail}")
            for offset, measured in enumerate(json.loads((Path(tmp) / f"{worker}.out").read_text())):
                results[worker + offset * workers] = measured
    return results


def compile_report(arch_or_cc: str | int, kernels: list[str] | None = None, dtype: str = "fp16", *,
                   configs: str | list[KernelConfig] = "space", cache_dir: str | Path | None = None,
                   workers: int = 1) -> list[dict[str, Any]]:
    """Cross-compile kernel configs for one arch; one record per (config, shape, Triton function).

    kernels: default every kernel the arch supports (kernels_for_arch); naming one it does not is a TargetError.
    configs: "space" (each kernel's CONFIG_SPACE after its keep filter), "default" (DEFAULT_CONFIG) or
    an explicit list. Each record: {kernel, function, arch, dtype, shape, config (label), blocks, meta,
    num_warps, num_stages, registers, spill_bytes, local_bytes, shared_bytes, compile_seconds, cached,
    valid, reason}; a config is usable on the arch when all its records are valid.
    """
    if dtype not in DTYPES:
        raise InputError(f"kernel compile dtype {dtype!r} unknown; choose from {', '.join(DTYPES)}")
    arch = arch_limits(arch_or_cc)
    jobs = _jobs(arch, kernels or kernels_for_arch(arch.arch), dtype, configs)
    cache = Path(cache_dir) if cache_dir is not None else DEFAULT_CACHE_DIR
    cache.mkdir(parents=True, exist_ok=True)
    keys = [_cache_key(job) for job in jobs]
    measured = [json.loads((cache / f"{k}.json").read_text()) if (cache / f"{k}.json").exists() else None
                for k in keys]
    todo = list({keys[i]: i for i, m in enumerate(measured) if m is None}.values())  # one job per key
    if todo and (workers > 1 or _interpreting()):
        fresh = _measure_in_subprocesses([jobs[i] for i in todo], max(1, workers))
    else:
        fresh = [measure(jobs[i]["spec"], arch.compute_capability) for i in todo]
    by_key = {}
    for i, result in zip(todo, fresh):
        partial = cache / f"{keys[i]}.json.{os.getpid()}"
        partial.write_text(json.dumps(result, sort_keys=True))
        partial.replace(cache / f"{keys[i]}.json")  # atomic: a concurrent reader never sees half a record
        by_key[keys[i]] = dict(result, fresh=True)
    measured = [by_key.get(k, m) for k, m in zip(keys, measured)]
    records = []
    for job, result in zip(jobs, measured):
        config = KernelConfig.from_dict(job["config"])
        valid, reason = verdict(result, job["spec"].num_warps, arch)  # the reduce kernel has its own warps
        records.append({
            "kernel": job["kernel"], "function": as_jit(job["spec"].fn).__name__, "arch": arch.arch,
            "dtype": dtype, "shape": job["spec"].shape, "config": config.label, "blocks": dict(config.blocks),
            "meta": dict(config.meta), "num_warps": config.num_warps, "num_stages": config.num_stages,
            "registers": result.get("registers"), "spill_bytes": result.get("spill_bytes"),
            "local_bytes": result.get("local_bytes"), "shared_bytes": result.get("shared_bytes"),
            "compile_seconds": result.get("seconds"), "cached": not result.get("fresh", False),
            "valid": valid, "reason": reason})
    return records


def valid_configs(records: list[dict[str, Any]]) -> dict[str, list[str]]:
    """kernel -> labels of the configs whose every record (shape x function) is valid."""
    verdicts: dict[tuple[str, str], bool] = {}
    for r in records:
        key = (r["kernel"], r["config"])
        verdicts[key] = verdicts.get(key, True) and r["valid"]
    out: dict[str, list[str]] = {}
    for (kernel, label), ok in verdicts.items():
        out.setdefault(kernel, [])
        if ok:
            out[kernel].append(label)
    return out


def compile_summary(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per kernel: configs compiled, configs valid, and the DEFAULT_CONFIG's records (for the CLI's table)."""
    usable = valid_configs(records)
    out: dict[str, dict[str, Any]] = {}
    for kernel, labels in usable.items():
        default = kernel_module(kernel).DEFAULT_CONFIG.label
        mine = [r for r in records if r["kernel"] == kernel]
        out[kernel] = {
            "configs": len({r["config"] for r in mine}), "valid": len(labels), "default": default,
            "default_records": [{k: r[k] for k in ("function", "shape", "registers", "spill_bytes", "shared_bytes",
                                                   "valid", "reason")} for r in mine if r["config"] == default]}
    return out


if __name__ == "__main__":  # compile worker: JSON jobs on stdin -> JSON measurements on stdout
    _jobs_in = json.loads(sys.stdin.read())
    json.dump([measure(_spec_of(job), job["cc"]) for job in _jobs_in], sys.stdout)
