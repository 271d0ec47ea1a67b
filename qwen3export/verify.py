"""The verify stage, for every kind of artifact: an engine (ONNX Runtime / AOTInductor) against eager PyTorch, a
quantized engine against eager on its dequantized weights, a kernel pack (cubins, loader, interpreter), and
tp x ep rank parts as gloo processes; each also checks its sampling graph against torch. `parity_gate` is the one place
a failed report stops a build."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch

from qwen3export.graphs.decoder import Qwen3Decoder
from qwen3export.kernels.compile import cuobjdump_path, parse_resource_usage
from qwen3export.kernels.launch import INTERPRET_ENV
from qwen3export.kernels.selected_configs import use_selected_configs

from . import artifact as art
from .backends.kernel_pack import WORKER_TIMEOUT_S, checked_index, clean_env, load_kernel_pack
from .errors import ParityError
from .manifest import Manifest
from .model import build_module, is_prequantized
from .parallel_artifact import ParallelEngine
from .parity import check_parity, check_sampling_parity
from .quant import QuantizedSource, build_quantized
from .quant_parity import check_engine_parity, compare_to_unquantized, dequantized_reference
from .references import artifact_quant_config, eager_for, source_for
from .runner import open_engine, sampling_pair
from .spec import ModelSpec
from .stages import Progress

HOLD_BOTH_BYTES = 4 << 30  # the quantized-vs-unquantized comparison holds both fp32 models below this size
INTERPRET_MAX_PARAMS = 200_000_000  # the interpreter runs numpy per tile: larger models take too long to check
INTERPRET_NEW_TOKENS = 8  # prefill + 8 greedy decode steps: every kernel (prefill and decode paths) runs


def parity_gate(report: dict[str, Any], what: str = "engine") -> None:
    """The parity gate of every build: raising here drops the staging folder, so nothing is written."""
    if not report["passed"]:
        raise ParityError(f"{what} failed the parity gate ({'; '.join(report['failures'])}); no artifact was "
                          "written: report this with --debug output")


def with_sampling_check(report: dict[str, Any], graph_and_sampler) -> dict[str, Any]:
    """The artifact's sampling graph against the torch one (token ids bit-identical, ties included), into the
    report; a mismatch fails it."""
    report["sampling"] = check_sampling_parity(*graph_and_sampler)
    if not report["sampling"]["identical"]:
        report["passed"] = False
        report["failures"].append(f"sampling graph differs from torch in {report['sampling']['mismatches']} "
                                  "tokens/state rows")
    return report


def verify_engine(artifact: art.Artifact, eager: Qwen3Decoder, threads: int | None = None) -> dict[str, Any]:
    engine = open_engine(artifact, threads)
    report = check_parity(engine, engine.empty_cache(2), eager, eager.empty_cache(2),
                          eager.spec.vocab_size, artifact.manifest["dtype"])
    report["providers"] = engine.providers
    return with_sampling_check(report, sampling_pair(artifact, threads, engine))


def verify_quantized(artifact: art.Artifact, spec: ModelSpec, source, qcfg, threads: int | None = None
                     ) -> dict[str, Any]:
    """A quantized engine, parity two ways (quant_parity.py): gated, the engine against eager PyTorch on the
    same dequantized weights; reported, the quantized model against the unquantized one (not for an AWQ /
    GPTQ checkpoint: its unquantized weights are not here). The report is check_parity's (it gates and
    prints like any build's) with `quantization` holding the second comparison."""

    engine = open_engine(artifact, threads)
    qsource = source if is_prequantized(source) else QuantizedSource(source, spec, qcfg)
    reference = dequantized_reference(spec, qsource, torch.float32)
    parity_dtype = "fp8" if qcfg.mode == "fp8" else artifact.manifest["dtype"]  # parity.THRESHOLDS["fp8"]
    report = check_engine_parity(engine, engine.empty_cache(2), reference, parity_dtype)
    report["providers"] = engine.providers
    with_sampling_check(report, sampling_pair(artifact, threads, engine))
    del engine
    if is_prequantized(source):
        quality = {"gated": False, "not_run": f"pre-quantized {qcfg.scheme} checkpoint: no unquantized weights to "
                   "compare with"}
    else:
        # over HOLD_BOTH_BYTES the two fp32 models are held one at a time (the reference is rebuilt)
        if 4 * spec.param_count() > HOLD_BOTH_BYTES:
            del reference
            reference = lambda: dequantized_reference(spec, qsource, torch.float32)  # noqa: E731
        quality = compare_to_unquantized(reference, lambda: build_module(spec, source, torch.float32))
    quality["quantization"] = qcfg.to_dict()
    report["quantization"] = quality
    return report


def verify_pack(folder: Path, manifest: Manifest, progress: Progress = lambda s: None,
                threads: int | None = None) -> dict[str, Any]:
    """A kernel-pack artifact: the pack's own checks (kernel_pack.verify_kernel_pack) and its sampling graph."""

    report = verify_kernel_pack(folder, manifest, progress)
    return with_sampling_check(report, sampling_pair(art.staged_artifact(folder, manifest), threads))


def verify_parallel(artifact: art.Artifact, eager: Qwen3Decoder, threads: int | None = None,
                    progress: Progress = lambda s: None) -> dict[str, Any]:
    """The parts as N gloo processes against the unsharded eager model (parity.check_parity's gate, its
    prompts and its 32 greedy steps), and the sampling graph against torch."""

    m = artifact.manifest
    progress(f"  starting {m['parallel']['world']} rank processes (gloo)")
    with ParallelEngine(artifact, threads) as engine:
        report = check_parity(engine, engine.empty_cache(2), eager, eager.empty_cache(2), eager.spec.vocab_size,
                              m["dtype"])
        report["providers"] = engine.providers
    report["reference"] += f"; engine: the {m['parallel']['world']} rank parts (tp {m['parallel']['tp']} x ep " \
                           f"{m['parallel']['ep']}) as gloo processes"
    return with_sampling_check(report, sampling_pair(artifact, threads))


def verify_artifact(artifact: art.Artifact, model_override: str | None = None, threads: int | None = None,
                    progress: Progress = lambda s: None) -> dict[str, Any]:
    """`qwen3export verify`: re-run the parity checks an artifact's backend has."""
    if "parallel" in artifact.manifest:  # tp x ep rank parts: N gloo processes vs unsharded eager
        return verify_parallel(artifact, eager_for(artifact, model_override), threads, progress)
    if artifact.backend == "kernels":
        if model_override is not None:
            eager_for(artifact, model_override)  # the same spec check; the interpreter rebuilds from the record
        return verify_pack(Path(artifact.path), artifact.manifest, progress, threads)
    if artifact.manifest.get("quantization"):
        spec, source = source_for(artifact, model_override)
        return verify_quantized(artifact, spec, source, artifact_quant_config(artifact), threads)
    return verify_engine(artifact, eager_for(artifact, model_override), threads)


# ---------------------------------------------------------------------- kernel packs

def verify_kernel_pack(folder: Path, manifest: Manifest, progress: Progress = lambda s: None
                       ) -> dict[str, Any]:
    """What can be proven without a GPU; `passed` is False if any check fails (the build then stops)."""
    index = checked_index(folder)
    failures: list[str] = []
    pack = load_kernel_pack(folder)
    for f in index["functions"]:
        compiled = pack.compiled[(f["kernel"], f["config"], f["variant"])]
        cubin = folder / f"{Path(f['files'][0]).parent}/{f['name']}.cubin"
        run = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True)
        if run.returncode != 0:
            failures.append(f"{f['kernel']} {f['name']}: cuobjdump cannot read its cubin ({run.stderr.strip()[:120]})")
            continue
        text = run.stdout
        usage = parse_resource_usage(text).get(f["name"])
        if usage is None or usage["registers"] != f["registers"] or usage["stack"] != f["spill_bytes"]:
            failures.append(f"{f['kernel']} {f['name']}: cubin resources differ from the recorded report")
        if compiled.metadata.num_warps != f["num_warps"] or compiled.metadata.target.arch != index["compute_capability"]:
            failures.append(f"{f['kernel']} {f['name']}: metadata does not match the pack index")
        if not f["valid"]:
            failures.append(f"{f['kernel']} {f['name']}: {f['reason']}")
    report: dict[str, Any] = {
        "reference": "kernel pack: cubins re-read with cuobjdump; CompiledKernel rebuilt from the pack",
        "functions": len(index["functions"]), "launched_on_gpu": False,
        "gpu": "not run: no CUDA GPU of this arch here (the loader launches them on the target)"}
    spec = ModelSpec.from_dict(manifest["model"]["spec"])
    if spec.param_count() <= INTERPRET_MAX_PARAMS:
        progress("running the model with the pack's configs through Triton's interpreter")
        report["interpreter"] = interpreter_parity(folder, manifest)
        if not report["interpreter"]["passed"]:
            failures += [f"interpreter: {x}" for x in report["interpreter"]["failures"]]
    else:
        report["interpreter"] = {"passed": None, "not_run": f"{spec.param_count():,} parameters is over the "
                                 f"interpreter check's {INTERPRET_MAX_PARAMS:,}; the kernels are checked against "
                                 "their references by the test suite at representative shapes"}
    report["failures"], report["passed"] = failures, not failures
    return report


def interpreter_parity(folder: Path, manifest: Manifest) -> dict[str, Any]:
    """The eager model routed through the qwen3export:: custom ops with the pack's configs active, its kernels run
    by Triton's interpreter on CPU (fp32), against the same model in plain PyTorch: prefill + greedy decode."""
    env = clean_env() | {"TRITON_INTERPRET": "1", INTERPRET_ENV: "1"}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "manifest.json").write_text(json.dumps(manifest))
        proc = subprocess.run([sys.executable, "-m", "qwen3export.verify", "interpret", str(folder),
                               str(Path(tmp) / "manifest.json"), str(Path(tmp) / "out.json")], env=env,
                              capture_output=True, text=True, timeout=WORKER_TIMEOUT_S)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise ParityError(f"the kernel pack's interpreter check crashed: {tail}")
        return json.loads((Path(tmp) / "out.json").read_text())


def _interpret_main(folder: Path, manifest: Manifest) -> dict[str, Any]:
    artifact = art.staged_artifact(folder, manifest | {"dtype": "fp32"})
    if manifest.get("quantization"):
        kernels, eager = _quantized_pair(artifact)
    else:
        eager = eager_for(artifact)
        kernels = eager_for(artifact).use_custom_ops()
    pack = load_kernel_pack(folder)
    with torch.no_grad(), use_selected_configs(pack.selection()):
        report = check_parity(kernels, kernels.empty_cache(2), eager, eager.empty_cache(2), eager.spec.vocab_size,
                              "fp32", new_tokens=INTERPRET_NEW_TOKENS)
    report["reference"] = ("eager PyTorch vs the same model through the qwen3export:: ops, Triton kernels run by "
                           "the interpreter (fp32) with the pack's configs")
    if manifest.get("quantization"):
        report["reference"] += "; quantized: eager PyTorch on the same dequantized weights (fp8: op references)"
    return report


class _TorchReference:
    """A decoder run with every qwen3export:: op on its pure-torch reference, even inside the interpreter
    worker (kernels/launch.py ops_run_triton reads the environment at each call): the fp8 reference decoder
    itself calls fp8_linear."""

    def __init__(self, model):
        self.model, self.spec = model, model.spec

    def empty_cache(self, batch: int):
        return self.model.empty_cache(batch)

    def __call__(self, *args):
        saved = os.environ.pop(INTERPRET_ENV, None)
        try:
            return self.model(*args)
        finally:
            if saved is not None:
                os.environ[INTERPRET_ENV] = saved


def _quantized_pair(artifact):
    """(the quantized decoder through the custom ops, its torch reference) for a quantized build's pack."""
    spec, source = source_for(artifact)
    config = artifact_quant_config(artifact)
    qsource = source if is_prequantized(source) else QuantizedSource(source, spec, config)
    kernels = build_quantized(spec, qsource, config).use_custom_ops()
    return kernels, _TorchReference(dequantized_reference(spec, qsource))


if __name__ == "__main__":  # the interpreter worker: python -m qwen3export.verify interpret FOLDER MANIFEST OUT
    if sys.argv[1:2] != ["interpret"]:
        raise SystemExit(f"unknown command {sys.argv[1:2]!r}: python -m qwen3export.verify interpret FOLDER "
                         "MANIFEST.json OUT.json")
    result = _interpret_main(Path(sys.argv[2]), json.loads(Path(sys.argv[3]).read_text()))
    Path(sys.argv[4]).write_text(json.dumps(result))
