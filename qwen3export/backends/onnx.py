"""ONNX backend: the captured decoder as one ONNX graph (prefill and decode over an explicit KV cache),
run by ONNX Runtime. Inputs and outputs follow the common decoder convention (Optimum / onnxruntime-genai):
input_ids, position_ids, attention_mask, past_key_values.{i}.key|value -> logits, present.{i}.key|value.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch.export import ExportedProgram

from qwen3export.spec import ModelSpec

from .onnx_ops import bake_weight_layouts, custom_translation_table
from .onnx_quant import OPSET as QUANT_OPSET, bake_quantized_weights, quant_translation_table

OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GB: larger models use external data
DECODER_FILE = "decoder.onnx"

# symbolic dimension names of the engine's interface
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"


def io_names(spec: ModelSpec) -> tuple[list[str], list[str]]:
    n = spec.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    return ["input_ids", "position_ids", "attention_mask", *past], ["logits", *present]


def io_shapes(spec: ModelSpec) -> dict[str, list[str | int]]:
    """The interface's shapes with named symbolic dimensions (recorded in the manifest)."""
    hkv, d = spec.num_key_value_heads, spec.head_dim
    shapes: dict[str, list[str | int]] = {
        "input_ids": [BATCH, SEQ], "position_ids": [BATCH, SEQ], "attention_mask": [BATCH, TOTAL],
        "logits": [BATCH, SEQ, spec.vocab_size],
    }
    for i in range(spec.num_hidden_layers):
        for kv in ("key", "value"):
            shapes[f"past_key_values.{i}.{kv}"] = [BATCH, hkv, PAST, d]
            shapes[f"present.{i}.{kv}"] = [BATCH, hkv, TOTAL, d]
    return shapes


def set_io_shapes(model, spec: ModelSpec) -> dict[str, list[str | int]]:
    """Name the symbolic dimensions of an exported decoder's inputs and outputs (io_shapes); returns them."""
    import onnx_ir as ir

    shapes = io_shapes(spec)
    for value in (*model.graph.inputs, *model.graph.outputs):
        value.shape = ir.Shape([ir.SymbolicDim(d) if isinstance(d, str) else d for d in shapes[value.name]])
    return shapes


def export_program(ep: ExportedProgram, spec: ModelSpec, table: dict | None, opset: int = OPSET,
                   optimize: bool = True):
    """torch.onnx.export (dynamo) of a captured decoder with the interface's names and `table`'s translations
    of the qwen3export:: ops; the exporter's warnings and log chatter silenced."""
    inputs, outputs = io_names(spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch.onnx").setLevel(logging.ERROR)
        return torch.onnx.export(ep, (), dynamo=True, opset_version=opset, input_names=inputs, output_names=outputs,
                                 optimize=optimize, verbose=False, custom_translation_table=table)


def weight_bytes(ep: ExportedProgram) -> int:
    return sum(t.numel() * t.element_size() for t in ep.state_dict.values())


def emit_decoder(ep: ExportedProgram, spec: ModelSpec, folder: Path, flavour: str | None = None,
                 quantized: bool = False) -> dict[str, Any]:
    """Write `decoder.onnx` (+ `decoder.onnx.data` over 2 GB) into `folder`; return the engine entry.

    `flavour` ("ort" | "standard", backends/onnx_ops.py) translates the qwen3export:: ops of a lowered
    program; None exports an unlowered one (a custom op left in it fails the export). `quantized`: the
    program holds the quantized ops (graphs/quantized.py), translated by backends/onnx_quant.py at its
    opset 21, their weight layouts baked into stored initializers."""

    if quantized and flavour is None:
        raise ValueError("a quantized decoder needs an ONNX op flavour (ort | standard) for its quantized ops")
    inputs, outputs = io_names(spec)
    table = custom_translation_table(flavour) if flavour is not None else None
    if quantized:
        table = {**table, **quant_translation_table(flavour)}
    opset = QUANT_OPSET if quantized else OPSET
    program = export_program(ep, spec, table, opset)
    # ORT's MoE reads fc1 interleaved: store it so, rather than have every session fold it at load
    baked = bake_weight_layouts(program.model) if flavour == "ort" else 0
    # MatMulNBits / QMoE / DequantizeLinear read their weights in final layout, not through unpack chains
    baked += bake_quantized_weights(program.model) if quantized else 0
    shapes = set_io_shapes(program.model, spec)
    external = weight_bytes(ep) > PROTOBUF_LIMIT - (64 << 20)
    path = folder / DECODER_FILE
    program.save(str(path), external_data=external)
    return {
        "file": DECODER_FILE,
        "external_data": external,
        "opset": opset,
        "onnx_ops": flavour,
        "baked_weights": baked,
        "inputs": inputs,
        "outputs": outputs,
        "shapes": shapes,
    }
