"""The build pipeline: one ordered list of stages over a BuildPlan (options.plan_build).

    plan -> lock -> [variant] prepare (load / capture / lower) -> per artifact: manifest, sampling graph,
    [variant] emit -> [variant] verify -> gate -> seal (atomic rename)

The variant (in-memory, streamed, sharded) chooses how the programs are obtained (real weights, the meta device,
per rank) and how weights reach the engine (in memory, streamed tensor by tensor, one shard per rank); its steps
live in in_memory.py, streaming.py and parallel_build.py. Everything else is here, once. Progress goes to a
callback (the CLI prints it to stderr so `--json` output stays clean).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from . import artifact as art
from .describe import quality_line, summary_line
from .in_memory import InMemorySteps
from .manifest import Manifest, ModelRecord
from .options import BuildOptions, BuildPlan, Output, plan_build
from .parallel_build import ShardedSteps
from .sampling_files import emit_sampling, sampling_program
from .signing import sign_artifact
from .stages import Progress, Stages, VariantSteps
from .streaming import StreamedSteps
from .verify import parity_gate

VARIANT_STEPS: dict[str, type[VariantSteps]] = {"in-memory": InMemorySteps, "streamed": StreamedSteps,
                                                 "sharded": ShardedSteps}


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest


def build(options: BuildOptions, progress: Progress = lambda s: None) -> list[BuildResult]:
    """Build, verify and write the artifacts `options` asks for. plan_build checks everything before any work;
    each output folder's lock is held from then to the end of the build (artifact.lock_scope)."""
    with art.lock_scope():
        plan = plan_build(options)
        for output in plan.outputs:  # every refusal is behind us: hold the folders for the rest of the build
            art.hold_build_lock(output.folder)
        steps = VARIANT_STEPS[plan.variant](plan)
        stages = Stages(steps.stage_count(), progress)
        steps.prepare(stages, progress)
        sampling_ep = sampling_program(plan.spec, plan.ref)
        return [write_artifact(plan, steps, output, stages, sampling_ep, progress) for output in plan.outputs]


def model_record(plan: BuildPlan) -> ModelRecord:
    return {"ref": plan.ref.to_dict(), "spec": plan.spec.to_dict(), "param_count": plan.spec.param_count()}


def write_artifact(plan: BuildPlan, steps: VariantSteps, output: Output, stages: Stages, sampling_ep,
                   progress: Progress) -> BuildResult:
    """One artifact, in a staging folder renamed into place only when it is complete and has passed its gate."""
    with art.staging(output.folder, plan.force) as tmp:
        manifest = art.new_manifest(model_record(plan), plan.target.to_dict(), output.backend,
                                    steps.manifest_fields(output))
        manifest["serving"] = plan.serving
        # the sampling graph (thinking control baked in) ships beside every decoder
        manifest["sampling"] = emit_sampling(plan.spec, plan.ref, tmp, sampling_ep)
        steps.emit(stages, output, tmp, manifest, sampling_ep)
        report = steps.verify(stages, output, tmp, manifest, progress)
        progress(summary_line(report))
        if "quantization" in report:
            progress(quality_line(report["quantization"]))
        if report.get("passed") is not None:  # None: a streamed / sharded build that records parity as NOT run
            parity_gate(report, steps.gated)
        manifest["parity"] = report
        # checksums of every file into the manifest, then the atomic rename
        stages.run("seal", "checksums + manifest", lambda: art.seal(tmp, manifest))
        if plan.sign is not None:  # before the rename: a signed build never appears unsigned
            sign_artifact(tmp, plan.sign, verify_checksums=False)
    return BuildResult(output.folder, manifest)
