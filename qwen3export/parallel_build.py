"""`build --tp N --ep M`: the sharded variant of the build, one part per rank.

Steps (options.plan_build has checked degrees, backend, target and memory before any work): write the rank parts
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

from typing import Any

import torch

from qwen3export.graphs.parallel import layouts

from . import artifact as art
from .lowering import lowering_record
from .manifest import Manifest, VariantFields
from .model import build_module
from .parallel_artifact import PROGRAM_RECORD, parallel_record, write_parts
from .stages import Progress, Stages
from .streaming import parity_not_run
from .verify import verify_parallel


class ShardedSteps:
    """Write the rank parts (one shard in memory at a time) and verify them as N gloo processes."""

    gated = "the rank parts"

    def __init__(self, plan):
        self.plan = plan
        (output,) = plan.outputs
        self.ranks = layouts(plan.spec, plan.tp, plan.ep)
        self.not_run = parity_not_run(plan, output.folder)

    def stage_count(self) -> int:
        return 2 + (self.not_run is None)

    def prepare(self, stages: Stages, progress: Progress) -> None:
        self.progress = progress  # nothing to capture: each rank process re-captures its program at load

    def manifest_fields(self, output) -> VariantFields:
        record = lowering_record(None)
        record["notes"] = ["the rank parts are the captured (unlowered) programs: torch runs them with their "
                           "collectives; the qwen3export:: lowering targets ONNX/Triton engines"]
        return VariantFields(dtype="fp32", lowering=record, parallel=parallel_record(self.plan.tp, self.plan.ep))

    def emit(self, stages: Stages, output, folder, manifest: Manifest, sampling_ep) -> None:
        plan, ranks = self.plan, self.ranks
        manifest["ranks"] = stages.run("emit", f"{len(ranks)} rank parts (weight shards; programs re-captured "
                                               f"from the spec at load) -> {output.folder}",
                                       lambda: write_parts(folder, plan.spec, plan.source, ranks, torch.float32,
                                                           self.progress))
        manifest["engine"] = {"status": "built", "parts": len(ranks), "program": PROGRAM_RECORD,
                              "weights": "rank<r>/weights.safetensors", "runner": "qwen3export.parallel_artifact."
                              "ParallelEngine (N gloo processes; `qwen3export run` starts them)"}

    def verify(self, stages: Stages, output, folder, manifest: Manifest, progress: Progress
               ) -> dict[str, Any]:
        if self.not_run is not None:
            return self.not_run
        plan = self.plan
        return stages.run("verify", f"{len(self.ranks)} gloo rank processes against unsharded eager PyTorch",
                          lambda: verify_parallel(art.staged_artifact(folder, manifest),
                                                  build_module(plan.spec, plan.source, torch.float32),
                                                  progress=progress))
