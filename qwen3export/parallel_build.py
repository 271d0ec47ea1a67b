"""`build --tp N --ep M`: the parallel counterpart of pipeline.build, one part per rank.

Stages: check (degrees, backend, target, memory: one-line errors before any work) -> write the rank parts
(parallel_artifact.py: each rank's weight shard as safetensors; no program is stored, each rank process
re-captures its torch.export program with the collectives from the manifest's spec, so the artifact holds
data only) and the sampling graph beside them -> verify (the N parts as N gloo processes against the
unsharded eager model: greedy tokens identical, fp32 logits within parity.THRESHOLDS) -> seal.

Why torch.export programs and not ONNX / AOTInductor parts: ONNX Runtime's CPU provider has no collective
ops (com.microsoft AllReduce/AllGather exist only in its CUDA + NCCL builds), TensorRT would need
TensorRT-LLM's plugins, and AOTInductor-compiled parts with functional collectives were seen to hang in gloo
on their 4th call; torch runs the exported programs and their collectives directly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from . import artifact as art
from .errors import InputError, TargetError
from .parallel_artifact import BACKEND, PROGRAM_RECORD, ParallelEngine, parallel_record, write_parts

Progress = Callable[[str], None]

REFUSED_BACKENDS = {
    "onnx": "ONNX Runtime's CPU provider has no collective ops (com.microsoft AllReduce exists only in its "
            "CUDA + NCCL builds)",
    "tensorrt": "a TensorRT plan with collectives needs TensorRT-LLM's NCCL plugins, which this tool does not emit",
    "aoti": "AOTInductor-compiled parts with collectives hung in gloo (on their 4th call) when tried",
    "kernels": "the kernel pack does not depend on --tp/--ep; build it without them",
}


def check_parallel_options(opts, spec) -> Any:
    """Everything a parallel build can refuse, before any weight is read or any file written -> target."""
    from qwen3export.targets import get_target

    from .plan import check_parallelism, host_memory_bytes, plan_for_target, PlanOptions

    for b in opts.backends:
        if b != BACKEND:
            why = REFUSED_BACKENDS.get(b, "unknown backend")
            raise TargetError(f"--tp/--ep builds emit one torch.export program per rank (--backend {BACKEND}), not "
                              f"{b}: {why}; pass --backend {BACKEND} or drop --backend")
    if opts.quant != "none":
        raise InputError(f"--tp/--ep cannot go with --quant {opts.quant}: the rank decoders (graphs/parallel.py) "
                         "have no quantized layers yet; drop one of them")
    if opts.dtype != "fp32":
        raise TargetError(f"--tp/--ep parts are verified here in fp32 against the eager model; --dtype {opts.dtype} "
                          "is not supported for them: drop --dtype")
    target = get_target(opts.target)
    if target.kind != "cpu":
        raise TargetError(f"--tp/--ep parts run on CPU processes over gloo here (ParallelEngine); running them "
                          f"under NCCL on {target.name} GPUs is not implemented: use --target cpu")
    if opts.onnx_ops is not None:
        raise InputError("--onnx-ops applies to ONNX engines; a --tp/--ep build has none: drop --onnx-ops")
    check_parallelism(spec, opts.tp, opts.ep)
    # all ranks and the eager reference share this host: refuse a build whose processes cannot all fit
    p = plan_for_target(spec, target, PlanOptions(dtype="fp32", tp=opts.tp, ep=opts.ep, max_batch=2, max_seq=64))
    ranks_bytes = p["per_rank"]["weight_bytes"] * opts.tp * opts.ep
    need, have = ranks_bytes + 4 * spec.param_count() + (2 << 30), host_memory_bytes()
    if need > have:
        raise InputError(f"{spec.name} tp {opts.tp} x ep {opts.ep}: the {opts.tp * opts.ep} rank processes "
                         f"({ranks_bytes / 2**30:.1f} GiB of fp32 weights) and the eager reference need "
                         f"~{need / 2**30:.1f} GiB, this host has {have / 2**30:.1f} GiB [modelled]; build a smaller "
                         "model here (`qwen3export plan` shows per-rank figures)")
    return target


def verify_parallel(artifact: art.Artifact, eager: torch.nn.Module, threads: int | None = None,
                    progress: Progress = lambda s: None) -> dict[str, Any]:
    """The parts as N gloo processes against the unsharded eager model (parity.check_parity's gate, its
    prompts and its 32 greedy steps), and the sampling graph against torch."""
    from .parity import check_parity, check_sampling_parity
    from .pipeline import sampling_pair

    m = artifact.manifest
    progress(f"  starting {m['parallel']['world']} rank processes (gloo)")
    with ParallelEngine(artifact, threads) as engine:
        report = check_parity(engine, engine.empty_cache(2), eager, eager.empty_cache(2), eager.spec.vocab_size,
                              m["dtype"])
        report["providers"] = engine.providers
    report["reference"] += f"; engine: the {m['parallel']['world']} rank parts (tp {m['parallel']['tp']} x ep " \
                           f"{m['parallel']['ep']}) as gloo processes"
    report["sampling"] = check_sampling_parity(*sampling_pair(artifact, threads))
    if not report["sampling"]["identical"]:
        report["passed"] = False
        report["failures"].append(f"sampling graph differs from torch in {report['sampling']['mismatches']} "
                                  "tokens/state rows")
    return report


def build_parallel(opts, progress: Progress = lambda s: None) -> list:
    """Write, verify and seal a tp x ep artifact (see the module docstring) -> [BuildResult]."""

    from qwen3export.graphs.parallel import layouts
    from qwen3export.graphs.sampling import capture_sampling

    from .model import build_module, resolve
    from .parity import summary_line
    from .pipeline import BuildResult, _Stages, emit_sampling, gate, lowering_record, output_folder, sampling_graph_for
    from .plan import serving_plan
    from .streaming import parity_not_run

    if opts.stream:
        raise InputError("--stream cannot go with --tp/--ep: a parallel build already writes one rank's shard at a "
                         "time; drop --stream")
    spec, source, ref = resolve(opts.model, opts.seed, weight_stats=opts.weight_stats, **opts.overrides)
    target = check_parallel_options(opts, spec)
    serving = serving_plan(spec, target, "fp32", tp=opts.tp, ep=opts.ep, max_batch=opts.max_batch,
                           max_seq=opts.max_seq)
    name = f"{spec.name.lower()}-{target.name}-tp{opts.tp}-ep{opts.ep}"
    out = output_folder(opts, spec, target.name, "torch-export", name=name)
    art.check_replaceable(out, opts.force)
    art.hold_build_lock(out)
    ranks = layouts(spec, opts.tp, opts.ep)
    not_run = parity_not_run(opts, spec, out)
    stages = _Stages(3 + (not_run is None), progress)

    with art.staging(out, opts.force, opts.sign) as tmp:
        record = lowering_record(None)
        record["notes"] = ["the rank parts are the captured (unlowered) programs: torch runs them with their "
                           "collectives; the qwen3export:: lowering targets ONNX/Triton engines"]
        manifest = art.default_manifest(
            model={"ref": ref.to_dict(), "spec": spec.to_dict(), "param_count": spec.param_count()},
            target=target.to_dict(), backend=BACKEND, dtype="fp32", lowering=record,
            parallel=parallel_record(opts.tp, opts.ep))
        manifest["serving"] = serving
        # 1. emit: the rank parts, one shard in memory at a time; the programs are re-captured at load
        manifest["ranks"] = stages.run("emit", f"{len(ranks)} rank parts (weight shards; programs re-captured "
                                               f"from the spec at load) -> {out}",
                                       lambda: write_parts(tmp, spec, source, ranks, torch.float32, progress))
        manifest["engine"] = {"status": "built", "parts": len(ranks), "program": PROGRAM_RECORD,
                              "weights": "rank<r>/weights.safetensors", "runner": "qwen3export.parallel_artifact."
                              "ParallelEngine (N gloo processes; `qwen3export run` starts them)"}
        # 2. the sampling graph beside the parts, as for every engine
        manifest["sampling"] = stages.run("sampling", "sampling graph (ONNX)", lambda: emit_sampling(
            spec, ref, tmp, capture_sampling(sampling_graph_for(spec, ref))))
        # 3. verify: N processes against the unsharded eager model
        if not_run is None:
            report = stages.run("verify", f"{len(ranks)} gloo rank processes against unsharded eager PyTorch",
                                lambda: verify_parallel(art.staged_artifact(tmp, manifest),
                                                        build_module(spec, source, torch.float32), progress=progress))
            gate(report, "the rank parts")
        else:
            report = not_run
        progress(summary_line(report))
        manifest["parity"] = report
        # 4. seal
        stages.run("seal", "checksums + manifest", lambda: art.seal(tmp, manifest))
    return [BuildResult(out, manifest)]
