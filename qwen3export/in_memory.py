"""The in-memory variant of the build: the decoder loaded with its weights (quantized when asked), captured with
torch.export, lowered, and emitted per backend (ONNX, TensorRT's ONNX + settings, AOTInductor, the Triton kernel
pack); each engine verified against that eager decoder."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from qwen3export.graph_capture import capture

from . import artifact as art
from .backends import aoti, onnx as onnx_backend, tensorrt as trt_backend
from .backends.genai_config import write_genai_config
from .backends.kernel_pack import emit_kernel_pack, tuned_kernels_record
from .errors import TargetError
from .lowering import lower_program, lowering_record, unlowered_record
from .manifest import LoweringRecord, Manifest, QuantizationRecord, VariantFields
from .model import build_module, is_prequantized
from .options import BuildPlan, Output
from .quant import QuantizedSource, build_quantized
from .spec import ModelSpec
from .stages import Progress, Stages, dump_ir
from .verify import verify_engine, verify_pack, verify_quantized


def load_decoder(spec: ModelSpec, source, qcfg) -> torch.nn.Module:
    """Load stage: the fp32 decoder, or the quantized one (graphs/quantized.py) built tensor by tensor."""
    if qcfg is None:
        return build_module(spec, source, torch.float32)
    qsource = source if is_prequantized(source) else QuantizedSource(source, spec, qcfg)
    return build_quantized(spec, qsource, qcfg, torch.float32)


def quantization_record(module, spec: ModelSpec) -> QuantizationRecord:
    """The manifest's `quantization`: mode, group size, lm_head, scheme (rtn / awq / gptq), what was replaced,
    and the bytes of weights the engine stores: quantized tensors (codes, scales, zero points) plus the fp32
    tensors left (embedding, norms, routers, an unquantized lm_head; a tied one once), beside the fp32 model's."""
    seen, fp = set(), 0
    for _, t in module.named_parameters():
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            fp += t.numel() * t.element_size()
    rec = QuantizationRecord(**module.quantization)
    rec.update({"weight_bytes": rec["quantized_bytes"] + fp, "fp_weight_bytes": fp,
                "fp32_model_bytes": 4 * spec.param_count()})
    return rec


def emit_engine(backend: str, ep, sampling_ep, spec: ModelSpec, folder: Path, plan: BuildPlan,
                flavour: str | None = None, quantization: QuantizationRecord | None = None) -> dict[str, Any]:
    quantized = quantization is not None
    level = quantization.get("accuracy_level", 0) if quantization is not None else 0  # MatMulNBits' level
    if backend == "onnx":
        entry = onnx_backend.emit_decoder(ep, spec, folder, flavour=flavour, quantized=quantized, accuracy_level=level)
        return write_genai_config(spec, entry, folder, plan.serving["max_seq"])  # ONNX Runtime GenAI's config
    if backend == "tensorrt":
        entry = onnx_backend.emit_decoder(ep, spec, folder, flavour=flavour, quantized=quantized, accuracy_level=level)
        trt_backend.write_settings(folder, trt_backend.settings(spec, plan.target, plan.dtype,
                                                                plan.serving["max_batch"], plan.serving["max_seq"]))
        missing = trt_backend.missing_requirements()
        entry["tensorrt"] = ({"status": "pending", "missing": missing, "settings": trt_backend.SETTINGS_FILE,
                              "finish": "qwen3export finish ARTIFACT (on a machine with TensorRT and the GPU)"}
                             if missing else trt_backend.build_plan(folder))
        return entry
    if backend == "aoti":
        return aoti.emit(ep, sampling_ep, folder)
    if backend == "kernels":
        (folder / "kernels").mkdir(exist_ok=True)
        return emit_kernel_pack(spec, plan.target, plan.dtype, folder, quantization=quantization)
    raise TargetError(f"unknown backend {backend!r}")


class InMemorySteps:
    """load -> capture -> lower, once; then per backend emit -> verify (pipeline.build runs them)."""

    gated = "engine"

    def __init__(self, plan: BuildPlan):
        self.plan = plan
        # aoti compiles the unlowered program; the kernel pack needs no graph
        self.lower = plan.lower and any(b not in ("aoti", "kernels") for b in plan.backends)

    def stage_count(self) -> int:
        return 2 + self.lower + 3 * len(self.plan.outputs)

    def prepare(self, stages: Stages, progress: Progress) -> None:
        plan, spec, source, qcfg = self.plan, self.plan.spec, self.plan.source, self.plan.quant
        # 1. load: weights streamed tensor by tensor into the module (see weights.py); engines are verified in fp32
        what = f"{source.description} as fp32" + (f", {qcfg.mode} weights ({qcfg.scheme})" if qcfg else "")
        self.module = stages.run("load", what, lambda: load_decoder(spec, source, qcfg))
        self.quantization = quantization_record(self.module, spec) if qcfg else None
        # an fp16 engine is captured from an fp16 decoder (fp32 residual stream, graphs/decoder.py) and verified
        # against the fp32 one at the fp16 thresholds; bf16 reaches TensorRT as its builder flag on the fp32 graph
        half = plan.dtype == "fp16"
        self.engine_dtype = "fp16" if half else "fp32"
        captured = build_module(spec, source, torch.float16) if half else self.module
        # 2. capture: one ExportedProgram for prefill and decode
        self.program = stages.run("capture", f"torch.export of the {self.engine_dtype} decoder (dynamic batch, "
                                  "sequence, cache length)", lambda: capture(captured))
        dump_ir(plan.dump_ir, "01-capture.txt", str(self.program.graph_module.code))
        # 3. lower: attention, MoE and norm subgraphs -> qwen3export:: ops; the captured program is kept as it was
        self.lowered, self.lowering = self.program, lowering_record(None)
        if self.lower:
            self.lowered, self.lowering = stages.run("lower", "attention, MoE and norms -> qwen3export:: ops",
                                                     lambda: lower_program(self.program, progress))
            dump_ir(plan.dump_ir, "02-lower.txt", str(self.lowered.graph_module.code))
        # GPU targets: the tuned kernel configs (measured / measured-public / modelled / default)
        self.kernels = tuned_kernels_record(spec, plan.target, plan.dtype, self.quantization)

    def manifest_fields(self, output: Output) -> VariantFields:
        record = (LoweringRecord(**self.lowering) if output.onnx_flavour
                  else unlowered_record(output.backend, self.plan.lower))
        record["onnx_ops"] = output.onnx_flavour
        fields = VariantFields(dtype="fp32" if output.backend == "kernels" else self.engine_dtype, lowering=record)
        if self.kernels is not None:
            fields["kernels"] = self.kernels
        if self.quantization is not None:
            fields["quantization"] = self.quantization
        return fields

    def emit(self, stages: Stages, output: Output, folder: Path, manifest: Manifest, sampling_ep) -> None:
        program = self.lowered if output.onnx_flavour else self.program
        flavour = output.onnx_flavour
        what = f"{output.backend} engine{f' ({flavour} ONNX ops)' if flavour else ''} -> {output.folder}"
        manifest["engine"] = stages.run("emit", what, lambda: emit_engine(
            output.backend, program, sampling_ep, self.plan.spec, folder, self.plan, flavour, self.quantization))

    def verify(self, stages: Stages, output: Output, folder: Path, manifest: Manifest,
               progress: Progress) -> dict[str, Any]:
        plan = self.plan
        if output.backend == "kernels":
            return stages.run("verify", "kernel pack: cubins, loader, interpreter parity",
                              lambda: verify_pack(folder, manifest, progress))
        if plan.quant is not None:
            return stages.run("verify", "parity against eager PyTorch on the dequantized weights, and the "
                              "quantized model against the unquantized one",
                              lambda: verify_quantized(art.staged_artifact(folder, manifest), plan.spec, plan.source,
                                                       plan.quant))
        return stages.run("verify", "parity against eager PyTorch",
                          lambda: verify_engine(art.staged_artifact(folder, manifest), self.module))
