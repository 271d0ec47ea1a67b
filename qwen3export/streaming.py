"""Weight-free capture and streamed emission: no full model ever exists in this process's memory.

The decoder is built on the meta device (shapes and dtypes only), captured and lowered there, and exported to
ONNX without weights; then every initializer is bound to a lazy loader that produces its tensor from the
weight source (safetensors, memory-mapped, or a preset's per-tensor random generator) only when the ONNX
file's external data is written, one tensor at a time (onnx_ir writes initializers in turn and drops each one
after writing). Peak memory of emission is therefore about the largest single parameter (a stacked-experts
tensor of one MoE layer, or the embedding) plus its layout transform, not the model: see `emission_bound`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass

from qwen3export.graphs.decoder import Qwen3Decoder
from qwen3export.graphs.rope import rope_parameters

from . import artifact as art
from .backends.genai_config import write_genai_config
from .backends.kernel_pack import tuned_kernels_record
from .backends.onnx import DECODER_FILE, OPSET, export_program, io_names, kv_cache_kind, set_io_shapes
from .backends.onnx_ops import bake_weight_layouts, custom_translation_table
from .errors import ConfigError
from .graph_capture import META, capture_meta, meta_decoder
from .lowering import lower_program, lowering_record
from .manifest import LoweringRecord, Manifest, StreamingRecord, VariantFields
from .memory_plan import available_memory_bytes
from .model import build_module
from .spec import ModelSpec
from .stages import Progress, Stages, dump_ir
from .verify import verify_engine
from .weights import WeightSource, check_names, module_assignments, parse_dtype


def parameter_loaders(spec: ModelSpec, source: WeightSource, dtype: torch.dtype
                      ) -> dict[str, Callable[[], torch.Tensor]]:
    """Decoder parameter/buffer name -> a function producing its tensor (CPU, `dtype`) from `source`.
    Stacked expert tensors are assembled one expert at a time into one output buffer."""
    check_names(spec, source)
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for pname, rows, stacked in module_assignments(spec):
        if not stacked:
            def read(name: str = rows[0][0]) -> torch.Tensor:
                return source.get(name).to(dtype)

            loaders[pname] = read
            continue

        def stack(rows=rows) -> torch.Tensor:
            first = torch.cat([source.get(n).to(dtype) for n in rows[0]], 0)
            out = torch.empty((len(rows), *first.shape), dtype=dtype)
            out[0] = first
            for e, names in enumerate(rows[1:], 1):
                out[e] = torch.cat([source.get(n).to(dtype) for n in names], 0)
            return out

        loaders[pname] = stack
    if spec.tie_word_embeddings:
        loaders["lm_head.weight"] = loaders["model.embed_tokens.weight"]
    loaders["inv_freq"] = lambda: rope_parameters(spec.head_dim, spec.rope_theta, spec.rope_scaling)[0].to(
        torch.float32)
    return loaders


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: onnx_ir takes the raw bits
        return t.view(torch.uint16).numpy()
    return t.numpy()


def bind_lazy_initializers(model, loaders: dict[str, Callable[[], torch.Tensor]]) -> int:
    """Replace every initializer exported from meta tensors with an onnx_ir LazyTensor calling its loader.

    The torch ONNX exporter names initializers by the parameter/buffer's qualified name (FQN); an initializer
    whose name has no loader and no data is an error (nothing would be written for it)."""
    bound = 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if not (isinstance(raw, torch.Tensor) and raw.device.type == "meta"):
            continue
        loader = loaders.get(name)
        if loader is None:
            raise ConfigError(f"exported initializer {name} has no weight loader; the graph and the weight "
                              "mapping (weights.module_assignments) disagree")
        shape, dtype = tuple(raw.shape), tensor.dtype

        def produce(loader=loader, shape=shape, dtype=dtype, name=name):
            t = loader().contiguous()
            if tuple(t.shape) != shape:
                raise ConfigError(f"weight {name} has shape {tuple(t.shape)}, the graph expects {shape}")
            return ir.tensor(_numpy(t), dtype=dtype, name=name)

        value.const_value = ir.LazyTensor(produce, dtype=dtype, shape=ir.Shape(shape), name=name)
        bound += 1
    return bound


def emission_bound(spec: ModelSpec, dtype: torch.dtype) -> StreamingRecord:
    """The stated bound of emission's resident memory: 3 x the largest single parameter (in the output dtype)
    plus a fixed 2 GiB for the interpreter, torch, the exporter and the graph. Why 3: a tensor produced from an
    fp32 source (a preset's generator, an fp32 checkpoint) holds the fp32 read (2x a bf16 output) beside its
    output; a layout transform (the ort MoE fc1 interleave) holds input and output while serialization may copy
    once more. Stacked experts are assembled one expert at a time, so their fp32 reads are one expert's."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    largest = 0
    with META:
        module = Qwen3Decoder(spec)
    for p in module.parameters():
        largest = max(largest, p.numel() * itemsize)
    overhead = 2 << 30
    return {"largest_parameter_bytes": largest, "bound_bytes": overhead + 3 * largest,
            "rule": "2 GiB + 3 x the largest parameter (independent of the number of layers)"}


# ---------------------------------------------------------------------- streamed ONNX emission
def emit_streamed_decoder(program: torch.export.ExportedProgram, spec: ModelSpec, folder,
                          loaders: dict[str, Callable[[], torch.Tensor]], flavour: str | None) -> dict[str, Any]:
    """backends/onnx.py emit_decoder for a program captured on meta: `decoder.onnx` + `decoder.onnx.data`
    with every weight produced by its loader while the external data is written. Returns the same engine
    entry (OnnxEngine reads it).

    Differs from emit_decoder in two ways, both forced by the weights being absent: the exporter's optimizer
    is off (constant folding would need the values), and the top-level Constant nodes' values are attached to
    their outputs so that bake_weight_layouts can still find the MoE fc1 interleave chain of the ort flavour and bake it
    lazily (one layer's experts at a time) instead of leaving it to every session load."""
    table = custom_translation_table(flavour) if flavour is not None else None
    onnx_program = export_program(program, spec, table, OPSET, optimize=False)
    model = onnx_program.model
    kv_cache = kv_cache_kind(model)  # the ort flavour's shared buffer (backends/onnx.py share_kv_buffer)
    inputs, outputs = io_names(spec, kv_cache)
    bind_lazy_initializers(model, loaders)
    # unoptimized exports reuse value names (val_0, ...) inside If branches; ONNX Runtime wants SSA names
    NameFixPass()(model)
    baked = 0
    if flavour == "ort":
        for node in model.graph:  # top level only: If branches keep their own Constant nodes
            if (node.domain, node.op_type) == ("", "Constant"):
                _attach_constant(node)
        baked = bake_weight_layouts(model)
        RemoveUnusedNodesPass()(model)
    shapes = set_io_shapes(model, spec)
    onnx_program.save(str(folder / DECODER_FILE), external_data=True)
    return {"file": DECODER_FILE, "external_data": True, "opset": OPSET, "onnx_ops": flavour, "baked_weights": baked,
            "kv_cache": kv_cache, "inputs": inputs, "outputs": outputs, "shapes": shapes}


def _attach_constant(node) -> None:
    """A Constant node's value as its output's const_value (what an optimized export's folding leaves)."""
    attrs = node.attributes
    if "value" in attrs:
        node.outputs[0].const_value = attrs["value"].as_tensor()
    elif "value_ints" in attrs:
        node.outputs[0].const_value = ir.tensor(np.asarray(attrs["value_ints"].as_ints(), dtype=np.int64))
    elif "value_int" in attrs:
        node.outputs[0].const_value = ir.tensor(np.asarray(attrs["value_int"].as_int(), dtype=np.int64))


# ---------------------------------------------------------------------- build --stream
def parity_not_run(plan, out) -> dict[str, Any] | None:
    """The manifest's `parity` entry when the streamed build does not run the check (with why and how to run it
    later), or None when it runs: fp32, not --no-verify, and the fp32 eager reference plus an ONNX Runtime
    session holding the same weights fit in this machine's available memory."""
    later = f"qwen3export verify {out}"
    if plan.dtype != "fp32":
        why = (f"--dtype {plan.dtype} engine: ONNX Runtime's CPU provider has no {plan.dtype} kernels and "
               "runner.OnnxEngine feeds fp32/fp16 caches only, so no parity check for it exists on this machine")
        return {"passed": None, "not_run": why, "command": None}
    if not plan.verify:
        return {"passed": None, "not_run": "--no-verify", "command": later}
    need, have = 2 * 4 * plan.spec.param_count() + (2 << 30), available_memory_bytes()
    if need > have:
        return {"passed": None, "command": later + " (on a machine with that much memory)",
                "not_run": f"the fp32 eager reference and an ONNX Runtime session holding the same weights need "
                           f"~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB is available here"}
    return None


class StreamedSteps:
    """`build --stream`: the onnx engine emitted without the model ever in memory (see the module docstring); peak
    resident memory is bounded by emission_bound, whatever the number of layers (benchmarks/build_memory.py).

    Parity against eager runs as for an in-memory build when it can (fp32, the eager model fits in memory);
    otherwise the manifest says it was NOT run, why, and the command that runs it later. options.REFUSALS holds
    what a streamed build refuses (quantization, --tp/--ep, other backends, fp16/bf16 with verification)."""

    gated = "engine"

    def __init__(self, plan):
        self.plan = plan
        (output,) = plan.outputs
        self.dtype = parse_dtype(plan.dtype)
        self.not_run = parity_not_run(plan, output.folder)

    def stage_count(self) -> int:
        return 3 + self.plan.lower + (self.not_run is None)

    def prepare(self, stages: Stages, progress: Progress) -> None:
        plan, spec = self.plan, self.plan.spec
        # 1. capture on the meta device: shapes and dtypes only
        ep = stages.run("capture", f"torch.export of the {plan.dtype} decoder on the meta device (no weights)",
                        lambda: capture_meta(meta_decoder(spec, self.dtype)))
        dump_ir(plan.dump_ir, "01-capture.txt", str(ep.graph_module.code))
        # 2. lower (the passes match shapes and ops, never values)
        self.program, record = ep, lowering_record(None)
        if plan.lower:
            self.program, record = stages.run("lower", "attention, MoE and norms -> qwen3export:: ops",
                                              lambda: lower_program(ep, progress))
            dump_ir(plan.dump_ir, "02-lower.txt", str(self.program.graph_module.code))
        self.record = LoweringRecord(**record, onnx_ops=plan.outputs[0].onnx_flavour)
        self.kernels = tuned_kernels_record(spec, plan.target, plan.dtype)

    def manifest_fields(self, output) -> VariantFields:
        fields = VariantFields(dtype=self.plan.dtype, lowering=self.record)
        if self.kernels is not None:
            fields["kernels"] = self.kernels
        return fields

    def emit(self, stages: Stages, output, folder, manifest: Manifest, sampling_ep) -> None:
        # 3. emit: each initializer produced from the source by its loader while decoder.onnx.data is written
        spec, source = self.plan.spec, self.plan.source
        loaders = parameter_loaders(spec, source, self.dtype)
        manifest["engine"] = stages.run(
            "emit", f"onnx engine ({output.onnx_flavour} ONNX ops), weights streamed tensor by tensor from "
                    f"{source.description} -> {output.folder}",
            lambda: emit_streamed_decoder(self.program, spec, folder, loaders, output.onnx_flavour))
        write_genai_config(spec, manifest["engine"], folder, self.plan.serving["max_seq"])  # GenAI config
        manifest["streaming"] = {"weights": f"streamed one tensor at a time from {source.description}",
                                 "weight_bytes": (folder / (manifest["engine"]["file"] + ".data")).stat().st_size,
                                 **emission_bound(spec, self.dtype)}

    def verify(self, stages: Stages, output, folder, manifest: Manifest, progress: Progress
               ) -> dict[str, Any]:
        # 4. verify, when it can run: the eager model is built only now, after emission
        if self.not_run is not None:
            return self.not_run
        plan = self.plan
        return stages.run("verify", "parity against eager PyTorch (fp32 reference loaded after emission)",
                          lambda: verify_engine(art.staged_artifact(folder, manifest),
                                                build_module(plan.spec, plan.source, torch.float32)))
