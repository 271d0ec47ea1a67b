"""ONNX backend: the captured decoder as one ONNX graph (prefill and decode over an explicit KV cache),
run by ONNX Runtime. Inputs and outputs follow the common decoder convention (Optimum / onnxruntime-genai):
input_ids, position_ids, attention_mask, past_key_values.{i}.key|value -> logits, present.{i}.key|value.

The "ort" flavour's interface differs in its cache (share_kv_buffer): past and present are one buffer
[B, Hkv, max_seq, D] that GroupQueryAttention updates in place, rows right-padded, each row's length the sum of
its attention_mask row (GQA's seqlens_k / total_sequence_length are computed from the mask in the graph, as
ONNX Runtime GenAI's model builder does), and logits at logits_index, an optional input (unfed: every
position of the step) so that GenAI, which does not feed it, runs the decoder too.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
from onnx_ir.passes.common import RemoveUnusedNodesPass
from torch.export import ExportedProgram

from qwen3export.cache_engine import LOGITS_INDEX, SEQLENS, TOTAL_LENGTH  # the shared-buffer interface's inputs
from qwen3export.spec import ModelSpec

from .onnx_ops import bake_weight_layouts, custom_translation_table
from .onnx_plumbing import remove_shape_plumbing
from .onnx_quant import OPSET as QUANT_OPSET, bake_quantized_weights, quant_translation_table, set_accuracy_level

OPSET = 18
PROTOBUF_LIMIT = 2 * 1024**3  # a single ONNX protobuf cannot exceed 2 GB: larger models use external data
DECODER_FILE = "decoder.onnx"

# symbolic dimension names of the engine's interface
BATCH, SEQ, PAST, TOTAL = "batch_size", "sequence_length", "past_sequence_length", "total_sequence_length"
MAX_SEQ, KEPT = "max_sequence_length", "kept_positions"
SHARED_BUFFER, CONCAT = "shared_buffer", "concat"  # the engine entry's kv_cache


def io_names(spec: ModelSpec, kv_cache: str = CONCAT) -> tuple[list[str], list[str]]:
    n = spec.num_hidden_layers
    past = [f"past_key_values.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(n) for kv in ("key", "value")]
    lengths = ["attention_mask", LOGITS_INDEX] if kv_cache == SHARED_BUFFER else ["attention_mask"]
    return ["input_ids", "position_ids", *lengths, *past], ["logits", *present]


def io_shapes(spec: ModelSpec, kv_cache: str = CONCAT) -> dict[str, list[str | int]]:
    """The interface's shapes with named symbolic dimensions (recorded in the manifest)."""
    hkv, d = spec.num_key_value_heads, spec.head_dim
    shapes: dict[str, list[str | int]] = {"input_ids": [BATCH, SEQ], "position_ids": [BATCH, SEQ]}
    if kv_cache == SHARED_BUFFER:
        shapes.update({"attention_mask": [BATCH, TOTAL], LOGITS_INDEX: [BATCH, KEPT],
                       "logits": [BATCH, KEPT, spec.vocab_size]})
        past = present = [BATCH, hkv, MAX_SEQ, d]
    else:
        shapes.update({"attention_mask": [BATCH, TOTAL], "logits": [BATCH, SEQ, spec.vocab_size]})
        past, present = [BATCH, hkv, PAST, d], [BATCH, hkv, TOTAL, d]
    for i in range(spec.num_hidden_layers):
        for kv in ("key", "value"):
            shapes[f"past_key_values.{i}.{kv}"] = past
            shapes[f"present.{i}.{kv}"] = present
    return shapes


def kv_cache_kind(model) -> str:
    """SHARED_BUFFER when the graph takes a logits_index (share_kv_buffer ran), else CONCAT."""
    return SHARED_BUFFER if any(v.name == LOGITS_INDEX for v in model.graph.inputs) else CONCAT


def set_io_shapes(model, spec: ModelSpec) -> dict[str, list[str | int]]:
    """Name the symbolic dimensions of an exported decoder's inputs and outputs (io_shapes); returns them."""
    shapes = io_shapes(spec, kv_cache_kind(model))
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
        program = torch.onnx.export(ep, (), dynamo=True, opset_version=opset, input_names=inputs,
                                    output_names=outputs, optimize=optimize, verbose=False,
                                    custom_translation_table=table)
    share_kv_buffer(program.model)
    remove_shape_plumbing(program.model)  # the Reshape / Transpose chains ONNX Runtime's optimizer keeps
    return program


def share_kv_buffer(model) -> bool:
    """The ort flavour's interface (backends/onnx_ops.py ort_attention): rewire a decoder whose attention is
    GroupQueryAttention so that each node's present outputs are the graph's present.{i}.key|value (the
    Concat(past, new) the traced graph returns is dropped), all of them read one seqlens_k / total_sequence_length
    computed from attention_mask [B, total] (_lengths_from_mask), and the lm_head runs only at `logits_index`
    [B, N] (positions within the step: generation asks for each row's last, parity for all; unfed: all).
    Returns False, and changes nothing, for a graph without GroupQueryAttention."""
    graph = model.graph
    nodes = [n for n in graph if (n.domain, n.op_type) == ("com.microsoft", "GroupQueryAttention")]
    if not nodes:
        return False
    mask = next(v for v in graph.inputs if v.name == "attention_mask")
    seqlens, total, computed = _lengths_from_mask(mask)
    graph.insert_before(nodes[0], computed)
    slot = {v.name: i for i, v in enumerate(graph.outputs)}
    for node in nodes:
        node.replace_input_with(5, seqlens)
        node.replace_input_with(6, total)
        for past, present in ((node.inputs[3], node.outputs[1]), (node.inputs[4], node.outputs[2])):
            name = past.name.replace("past_key_values.", "present.", 1)
            if past not in graph.inputs or name not in slot:
                raise ValueError(f"GroupQueryAttention reads {past.name}, not a cache input of the decoder")
            graph.outputs[slot[name]].name = f"{name}.concat"
            present.name, present.type = name, past.type
            graph.outputs[slot[name]] = present
    index = _logits_at(graph)
    RemoveUnusedNodesPass()(model)
    # a Shape of the mask reads only its sizes (a one-layer trace takes the batch size from it); any other reader
    # means attention outside GroupQueryAttention still masks by value, which the shared buffer does not serve
    if {use.node for use in mask.uses() if use.node.op_type != "Shape"} - set(computed):
        raise ValueError("attention_mask is still read outside GroupQueryAttention; export with --onnx-ops standard")
    at = list(graph.inputs).index(mask)
    graph.inputs.insert(at + 1, index)
    return True


def _lengths_from_mask(mask) -> tuple:
    """(seqlens_k [B] int32 = ReduceSum(mask, 1) - 1, total_sequence_length int32 = Shape(mask)[1], the nodes):
    GroupQueryAttention's per-row lengths, once for every layer, as onnxruntime_genai's model builder computes them
    (builders/base.py make_attention_mask_reformatting_for_gqa). Row b of a right-padded batch has ones at its
    first len_b positions; GQA writes a step's new K/V at seqlens_k + 1 - S (at 0 when S = total: a first prompt)."""
    int32 = ir.TensorType(ir.DataType.INT32)
    tape = ir.tape.Tape()
    one = tape.op("Constant", [], attributes={"value": ir.tensor(np.array([1], dtype=np.int64))})
    summed = tape.op("ReduceSum", [mask, one], attributes={"keepdims": 0})  # [B]
    seqlens = tape.op("Cast", [tape.op("Sub", [summed, one])], attributes={"to": ir.DataType.INT32})
    width = tape.op("Shape", [mask], attributes={"start": 1, "end": 2})  # [1]
    total = tape.op("Cast", [tape.op("Squeeze", [width])], attributes={"to": ir.DataType.INT32})
    seqlens.name, seqlens.shape, seqlens.type = SEQLENS, ir.Shape([BATCH]), int32
    total.name, total.shape, total.type = TOTAL_LENGTH, ir.Shape([]), int32
    return seqlens, total, list(tape.nodes)


def _logits_at(graph):
    """logits = lm_head(hidden[b, index[b, n]]): a GatherElements over the sequence axis before the lm_head's
    MatMul (or MatMulNBits), so the head runs over N positions per row, not S. -> `index`, the logits_index
    input, which is an initializer too (ONNX IR's overridable initializer): unfed, it is empty ([1, 0]) and
    means every position of the step, [B, S, V] -- what ONNX Runtime GenAI 0.18 binds its preallocated logits
    to at a prompt ("has shape {1,7,V} but the computed output shape ... is {1,1,V}" otherwise)."""
    logits = next(v for v in graph.outputs if v.name == "logits")
    head = logits.producer()
    hidden = head.inputs[0]
    if head.op_type not in ("MatMul", "MatMulNBits") or hidden.shape is None or len(hidden.shape) != 3 \
            or not isinstance(hidden.shape[2], int):
        raise ValueError(f"logits come from {head.op_type} over {hidden.shape}, not the lm_head over [B, S, H]")
    index = ir.Value(name=LOGITS_INDEX, shape=ir.Shape([BATCH, KEPT]), type=ir.TensorType(ir.DataType.INT64),
                     const_value=ir.tensor(np.zeros((1, 0), np.int64), name=LOGITS_INDEX))
    graph.register_initializer(index)
    tape = ir.tape.Tape()

    def const(*values, scalar=False):
        array = np.array(values[0] if scalar else values, dtype=np.int64)
        return tape.op("Constant", [], attributes={"value": ir.tensor(array)})

    # without a branch: positions = [index | range(S) if index is empty], each part broadcast to [B, *]
    batch = tape.op("Shape", [hidden], attributes={"start": 0, "end": 1})  # [1]: B
    steps = tape.op("Shape", [hidden], attributes={"start": 1, "end": 2})  # [1]: S
    named = tape.op("Shape", [index], attributes={"start": 1, "end": 2})  # [1]: N
    unfed = tape.op("Cast", [tape.op("Equal", [named, const(0)])], attributes={"to": ir.DataType.INT64})
    every = tape.op("Range", [const(0, scalar=True), tape.op("Squeeze", [tape.op("Mul", [steps, unfed])]),
                              const(1, scalar=True)])  # [S] or [0]
    rows = tape.op("Concat", [batch, const(1)], attributes={"axis": 0})  # [B, 1]
    positions = tape.op("Concat", [tape.op("Expand", [index, rows]),
                                   tape.op("Expand", [tape.op("Unsqueeze", [every, const(0)]), rows])],
                        attributes={"axis": 1})  # [B, N] or [B, S]
    width = tape.op("Concat", [batch, const(1, hidden.shape[2])], attributes={"axis": 0})  # [B, 1, H]
    gather = tape.op("Expand", [tape.op("Unsqueeze", [positions, const(2)]), width])  # [B, N, H]
    kept = tape.op("GatherElements", [hidden, gather], attributes={"axis": 1})  # [B, N, H]
    graph.insert_before(head, tape.nodes)
    head.replace_input_with(0, kept)
    return index


def weight_bytes(ep: ExportedProgram) -> int:
    return sum(t.numel() * t.element_size() for t in ep.state_dict.values())


def emit_decoder(ep: ExportedProgram, spec: ModelSpec, folder: Path, flavour: str | None = None,
                 quantized: bool = False, accuracy_level: int = 0) -> dict[str, Any]:
    """Write `decoder.onnx` (+ `decoder.onnx.data` over 2 GB) into `folder`; return the engine entry.

    `flavour` ("ort" | "standard", backends/onnx_ops.py) translates the qwen3export:: ops of a lowered
    program; None exports an unlowered one (a custom op left in it fails the export). `quantized`: the
    program holds the quantized ops (graphs/quantized.py), translated by backends/onnx_quant.py at its
    opset 21, their weight layouts baked into stored initializers, their MatMulNBits at `accuracy_level`
    (the build's QuantConfig.accuracy_level)."""

    if quantized and flavour is None:
        raise ValueError("a quantized decoder needs an ONNX op flavour (ort | standard) for its quantized ops")
    table = custom_translation_table(flavour) if flavour is not None else None
    if quantized:
        table = {**table, **quant_translation_table(flavour)}
    opset = QUANT_OPSET if quantized else OPSET
    program = export_program(ep, spec, table, opset)
    # ORT's MoE reads fc1 interleaved: store it so, rather than have every session fold it at load
    baked = bake_weight_layouts(program.model) if flavour == "ort" else 0
    # MatMulNBits / QMoE / DequantizeLinear read their weights in final layout, not through unpack chains
    baked += bake_quantized_weights(program.model) if quantized else 0
    if quantized:
        set_accuracy_level(program.model, accuracy_level)
    shapes = set_io_shapes(program.model, spec)
    kv_cache = kv_cache_kind(program.model)
    inputs, outputs = io_names(spec, kv_cache)
    external = weight_bytes(ep) > PROTOBUF_LIMIT - (64 << 20)
    path = folder / DECODER_FILE
    program.save(str(path), external_data=external)
    return {
        "file": DECODER_FILE,
        "external_data": external,
        "opset": opset,
        "onnx_ops": flavour,
        "baked_weights": baked,
        "kv_cache": kv_cache,
        "inputs": inputs,
        "outputs": outputs,
        "shapes": shapes,
    }
