"""The verify stage, for every kind of artifact: an engine (ONNX Runtime / AOTInductor) against eager PyTorch, a
quantized engine against eager on its dequantized weights, a kernel pack (cubins, loader, interpreter), and
tp x ep rank parts as gloo processes; each also checks its sampling graph against torch. `parity_gate` is the one place
a failed report stops a build."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import artifact as art
from .backends.kernel_pack import verify_kernel_pack
from .errors import ParityError
from .model import build_module, is_prequantized
from .parallel_artifact import ParallelEngine
from .parity import check_parity, check_sampling_parity
from .quant import QuantizedSource
from .quant_parity import check_engine_parity, compare_to_unquantized, dequantized_reference
from .references import artifact_quant_config, eager_for, source_for
from .runner import open_engine, sampling_pair
from .spec import ModelSpec
from .stages import Progress

HOLD_BOTH_BYTES = 4 << 30  # the quantized-vs-unquantized comparison holds both fp32 models below this size


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


def verify_engine(artifact: art.Artifact, eager: torch.nn.Module, threads: int | None = None) -> dict[str, Any]:
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


def verify_pack(folder: Path, manifest: dict[str, Any], progress: Progress = lambda s: None,
                threads: int | None = None) -> dict[str, Any]:
    """A kernel-pack artifact: the pack's own checks (kernel_pack.verify_kernel_pack) and its sampling graph."""

    report = verify_kernel_pack(folder, manifest, progress)
    return with_sampling_check(report, sampling_pair(art.staged_artifact(folder, manifest), threads))


def verify_parallel(artifact: art.Artifact, eager: torch.nn.Module, threads: int | None = None,
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
