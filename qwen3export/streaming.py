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
import torch

from qwen3export.graphs.decoder import Qwen3Decoder
from qwen3export.graphs.rope import rope_parameters

from .errors import ConfigError
from .spec import ModelSpec
from .weights import WeightSource, check_names, module_assignments

META = torch.device("meta")


def meta_decoder(spec: ModelSpec, dtype: torch.dtype) -> Qwen3Decoder:
    """The decoder with every parameter and buffer on the meta device (nothing allocated). The RoPE
    frequencies stay fp32 as in the eager module (reset_derived after the dtype move), so a bf16 graph
    computes cos/sin from fp32 frequencies as eager does and as the loader supplies them."""
    with META:
        module = Qwen3Decoder(spec)
    module = module.to(dtype)
    module.reset_derived()
    return module.eval()


def capture_meta(module: Qwen3Decoder) -> torch.export.ExportedProgram:
    """qwen3export/capture.py's torch.export of a meta decoder: the same example inputs and dynamic shapes,
    on the meta device, so the program holds no weight."""
    from .graph_capture import _widen_derived_ranges, dynamic_shapes, example_inputs

    ids, pos, mask, cache = example_inputs(module)
    inputs = (ids.to(META), pos.to(META), mask.to(META), tuple((k.to(META), v.to(META)) for k, v in cache))
    with torch.no_grad():
        ep = torch.export.export(module.eval(), inputs, dynamic_shapes=dynamic_shapes(module), strict=False)
    _widen_derived_ranges(ep)
    return ep


def parameter_loaders(spec: ModelSpec, source: WeightSource, dtype: torch.dtype
                      ) -> dict[str, Callable[[], torch.Tensor]]:
    """Decoder parameter/buffer name -> a function producing its tensor (CPU, `dtype`) from `source`.
    Stacked expert tensors are assembled one expert at a time into one output buffer."""
    check_names(spec, source)
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for pname, rows, stacked in module_assignments(spec):
        if not stacked:
            loaders[pname] = (lambda name=rows[0][0]: source.get(name).to(dtype))
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
    import onnx_ir as ir

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


def emission_bound(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
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
    from onnx_ir.passes.common import NameFixPass, RemoveUnusedNodesPass

    from .backends.onnx import DECODER_FILE, OPSET, export_program, io_names, set_io_shapes
    from .backends.onnx_ops import bake_weight_layouts, custom_translation_table

    inputs, outputs = io_names(spec)
    table = custom_translation_table(flavour) if flavour is not None else None
    onnx_program = export_program(program, spec, table, OPSET, optimize=False)
    model = onnx_program.model
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
            "inputs": inputs, "outputs": outputs, "shapes": shapes}


def _attach_constant(node) -> None:
    """A Constant node's value as its output's const_value (what an optimized export's folding leaves)."""
    import onnx_ir as ir

    attrs = node.attributes
    if "value" in attrs:
        node.outputs[0].const_value = attrs["value"].as_tensor()
    elif "value_ints" in attrs:
        node.outputs[0].const_value = ir.tensor(np.asarray(attrs["value_ints"].as_ints(), dtype=np.int64))
    elif "value_int" in attrs:
        node.outputs[0].const_value = ir.tensor(np.asarray(attrs["value_int"].as_int(), dtype=np.int64))


# ---------------------------------------------------------------------- build --stream
def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the machine's physical memory."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    from .plan import host_memory_bytes

    return host_memory_bytes()


def parity_not_run(opts, spec: ModelSpec, out) -> dict[str, Any] | None:
    """The manifest's `parity` entry when the streamed build does not run the check (with why and how to run it
    later), or None when it runs: fp32, not --no-verify, and the fp32 eager reference plus an ONNX Runtime
    session holding the same weights fit in this machine's available memory."""
    later = f"qwen3export verify {out}"
    if opts.dtype != "fp32":
        why = (f"--dtype {opts.dtype} engine: ONNX Runtime's CPU provider has no {opts.dtype} kernels and "
               "runner.OnnxEngine feeds fp32/fp16 caches only, so no parity check for it exists on this machine")
        return {"passed": None, "not_run": why, "command": None}
    if not opts.verify:
        return {"passed": None, "not_run": "--no-verify", "command": later}
    need, have = 2 * 4 * spec.param_count() + (2 << 30), available_memory_bytes()
    if need > have:
        return {"passed": None, "command": later + " (on a machine with that much memory)",
                "not_run": f"the fp32 eager reference and an ONNX Runtime session holding the same weights need "
                           f"~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB is available here"}
    return None


def build_streamed(opts, progress: Callable[[str], None] = lambda s: None) -> list:
    """`build --stream`: the onnx engine emitted without the model ever in memory (see the module docstring);
    peak resident memory is bounded by emission_bound, whatever the number of layers (benchmarks/build_memory.py).

    Parity against eager runs as in pipeline.build when it can (fp32, the eager model fits in memory); otherwise
    the manifest says it was NOT run, why, and the command that runs it later. Non-fp32 dtypes need --no-verify."""
    from dataclasses import replace

    from qwen3export.graphs.sampling import capture_sampling

    from . import artifact as art
    from .errors import InputError, TargetError
    from .model import build_module, resolve
    from .parity import summary_line
    from .pipeline import (BuildResult, _dump, _Stages, check_options, emit_sampling, gate, kernel_configs,
                           lower_program, lowering_record, onnx_flavour, output_folder, sampling_graph_for,
                           verify_engine)
    from .plan import serving_plan
    from .weights import parse_dtype

    # every refusal before any work
    if opts.quant != "none":
        raise InputError(f"--stream cannot go with --quant {opts.quant}: the quantized decoder has no weight-free "
                         "streamed emission yet; drop --stream (quantized builds load the model in memory)")
    if opts.tp * opts.ep > 1:
        raise InputError("--stream cannot go with --tp/--ep: a parallel build already writes one rank's shard at a "
                         "time; drop --stream")
    if tuple(opts.backends) != ("onnx",):
        raise TargetError(f"--stream emits the onnx backend only (its external data is what streams), not "
                          f"{','.join(opts.backends)}; pass --backend onnx or drop --stream")
    target = check_options(replace(opts, dtype="fp32"))  # target, backend, ONNX op flavour
    dtype = parse_dtype(opts.dtype)
    target.check_dtype(opts.dtype)
    if opts.dtype != "fp32" and opts.verify:
        raise TargetError(f"--stream --dtype {opts.dtype}: a {opts.dtype} engine cannot be checked against eager "
                          "here (ONNX Runtime's CPU provider runs fp32); pass --no-verify to write it with parity "
                          "recorded as not run, or build fp32")
    spec, source, ref = resolve(opts.model, opts.seed, weight_stats=opts.weight_stats, **opts.overrides)
    serving = serving_plan(spec, target, opts.dtype, max_batch=opts.max_batch, max_seq=opts.max_seq)
    out = output_folder(opts, spec, target.name, "onnx")
    art.check_replaceable(out, opts.force)
    art.hold_build_lock(out)
    flavour = onnx_flavour("onnx", target, opts.onnx_ops)
    not_run = parity_not_run(opts, spec, out)
    stages = _Stages(3 + opts.lower + (not_run is None), progress)

    # 1. capture on the meta device: shapes and dtypes only
    ep = stages.run("capture", f"torch.export of the {opts.dtype} decoder on the meta device (no weights)",
                    lambda: capture_meta(meta_decoder(spec, dtype)))
    _dump(opts.dump_ir, "01-capture.txt", str(ep.graph_module.code))
    sampling_ep = capture_sampling(sampling_graph_for(spec, ref))
    # 2. lower (the passes match shapes and ops, never values)
    program, record = ep, lowering_record(None)
    if opts.lower:
        program, record = stages.run("lower", "attention, MoE and norms -> qwen3export:: ops",
                                     lambda: lower_program(ep, progress))
        _dump(opts.dump_ir, "02-lower.txt", str(program.graph_module.code))
    record = dict(record, onnx_ops=flavour)
    kernels = kernel_configs(spec, target, opts.dtype)
    bound = emission_bound(spec, dtype)
    with art.staging(out, opts.force, opts.sign) as tmp:
        manifest = art.default_manifest(
            model={"ref": ref.to_dict(), "spec": spec.to_dict(), "param_count": spec.param_count()},
            target=target.to_dict(), backend="onnx", dtype=opts.dtype, lowering=record)
        manifest["serving"] = serving
        if kernels is not None:
            manifest["kernels"] = kernels
        manifest["sampling"] = emit_sampling(spec, ref, tmp, sampling_ep)
        # 3. emit: each initializer produced from the source by its loader while decoder.onnx.data is written
        loaders = parameter_loaders(spec, source, dtype)
        manifest["engine"] = stages.run(
            "emit", f"onnx engine ({flavour} ONNX ops), weights streamed tensor by tensor from "
                    f"{source.description} -> {out}",
            lambda: emit_streamed_decoder(program, spec, tmp, loaders, flavour))
        manifest["streaming"] = {"weights": f"streamed one tensor at a time from {source.description}",
                                 "weight_bytes": (tmp / (manifest["engine"]["file"] + ".data")).stat().st_size,
                                 **bound}
        # 4. verify, when it can run: the eager model is built only now, after emission
        if not_run is None:
            report = stages.run("verify", "parity against eager PyTorch (fp32 reference loaded after emission)",
                                lambda: verify_engine(art.staged_artifact(tmp, manifest),
                                                      build_module(spec, source, torch.float32)))
            gate(report)
        else:
            report = not_run
        progress(summary_line(report))
        manifest["parity"] = report
        stages.run("seal", "checksums + manifest", lambda: art.seal(tmp, manifest))
    return [BuildResult(out, manifest)]
