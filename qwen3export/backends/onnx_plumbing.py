"""Emit stage, after torch.onnx.export: remove the shape plumbing that ONNX Runtime's own optimizer keeps
(ORT_ENABLE_ALL leaves Reshape chains and the Transposes around RotaryEmbedding in place; measured on the
2-layer Qwen3-0.6B-shaped ort decoder: 19 Reshape and 8 of 13 Transpose survive it)."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import RemoveUnusedNodesPass

SWAP_1_2 = (0, 2, 1, 3)  # [B, S, N, D] <-> [B, N, S, D]


def remove_shape_plumbing(model: ir.Model) -> dict[str, int]:
    """Rewrite `model` in place; -> how many sites each rewrite changed.

    rope_3d: Transpose(0,2,1,3) -> RotaryEmbedding -> Transpose(0,2,1,3) becomes Reshape([B, S, N*D]) ->
      RotaryEmbedding (its 3-D form, which rotates each head_size = 2 x cos_cache width slice the same way)
      -> Reshape([B, S, N, D]): the same values, and the Reshapes cancel against the ones around them below.
    inverse_transposes: Transpose(Transpose(x, p), q) whose permutations compose to the identity reads x.
    identity_reshapes: a chain of Reshapes whose end has the chain's input shape (same static sizes and same
      named dims: Reshape keeps the row-major order, so the chain is the identity) reads that input instead;
      GroupQueryAttention's output is given its query's shape [B, S, N*D] first, so the Reshapes after it count.
    Leaves alone: everything whose shapes are not known (dims without names), and graph outputs.
    """
    graph = model.graph
    sites = {"rope_3d": _rope_3d(graph)}
    for node in graph:  # ORT's contrib schema: output [B, S, num_heads * head_size], the query's shape
        if (node.domain, node.op_type) == ("com.microsoft", "GroupQueryAttention") and node.outputs[0].shape is None \
                and len(node.inputs) > 1 and node.inputs[1] is not None and node.inputs[0].shape is not None:
            node.outputs[0].shape, node.outputs[0].type = ir.Shape(node.inputs[0].shape), node.inputs[0].type
    sites["inverse_transposes"] = _inverse_transposes(graph)
    sites["identity_reshapes"] = _identity_reshapes(graph)
    RemoveUnusedNodesPass()(model)
    return sites


def _known(shape) -> bool:
    return shape is not None and all(isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value)
                                     for d in shape)


def _same(a, b) -> bool:
    if not (_known(a) and _known(b)) or len(a) != len(b):
        return False
    return all((x == y) if isinstance(x, int) or isinstance(y, int) else x.value == y.value for x, y in zip(a, b))


def _identity_reshapes(graph) -> int:
    outputs, count = set(graph.outputs), 0
    for node in list(graph):
        if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or node.outputs[0] in outputs:
            continue
        out, source = node.outputs[0], node.inputs[0]
        while not _same(source.shape, out.shape) and source.producer() is not None \
                and source.producer().op_type == "Reshape":
            source = source.producer().inputs[0]
        if _same(source.shape, out.shape) and source.dtype == out.dtype:
            out.replace_all_uses_with(source)
            count += 1
    return count


def _inverse_transposes(graph) -> int:
    outputs, count = set(graph.outputs), 0
    for node in list(graph):
        first = node.inputs[0].producer() if node.op_type == "Transpose" and node.inputs else None
        if first is None or first.op_type != "Transpose" or node.outputs[0] in outputs:
            continue
        p, q = first.attributes.get_ints("perm", None), node.attributes.get_ints("perm", None)
        if p is None or q is None or len(p) != len(q) or [p[i] for i in q] != list(range(len(q))):
            continue
        node.outputs[0].replace_all_uses_with(first.inputs[0])
        count += 1
    return count


def _single_user(value):
    uses = list(value.uses())
    return uses[0].node if len(uses) == 1 and value not in value.graph.outputs else None


def _rope_3d(graph) -> int:
    count = 0
    for rope in list(graph):
        if (rope.domain, rope.op_type) != ("com.microsoft", "RotaryEmbedding") or "rotary_embedding_dim" in \
                rope.attributes or "num_heads" in rope.attributes:
            continue
        before, after = rope.inputs[0].producer(), _single_user(rope.outputs[0])
        if before is None or after is None or any(
                n.op_type != "Transpose" or tuple(n.attributes.get_ints("perm", ())) != SWAP_1_2
                for n in (before, after)):
            continue
        if _single_user(before.outputs[0]) is not rope:
            continue
        out = after.outputs[0]  # [B, S, N, D]
        if out.shape is None or len(out.shape) != 4 or not all(isinstance(d, int) for d in out.shape[2:]):
            continue
        n_heads, head = out.shape[2], out.shape[3]
        tape = ir.tape.Tape()
        flat = tape.op("Reshape", [before.inputs[0], _shape_initializer(graph, [0, 0, n_heads * head])])
        flat.shape, flat.type = ir.Shape([out.shape[0], out.shape[1], n_heads * head]), out.type
        rotated = tape.op("RotaryEmbedding", [flat, *rope.inputs[1:]], attributes=dict(rope.attributes),
                          domain="com.microsoft")
        rotated.shape, rotated.type = flat.shape, out.type
        heads = tape.op("Reshape", [rotated, _shape_initializer(graph, [0, 0, n_heads, head])])
        heads.shape, heads.type = out.shape, out.type
        graph.insert_before(after, tape.nodes)
        out.replace_all_uses_with(heads)
        count += 1
    return count


def _shape_initializer(graph, values: list[int]) -> ir.Value:
    """One int64 initializer per target shape, shared by the Reshapes that use it."""
    name = "reshape_to_" + "_".join(str(v).replace("-", "m") for v in values)
    if name not in graph.initializers:
        array = np.array(values, dtype=np.int64)
        graph.register_initializer(ir.Value(name=name, shape=ir.Shape(array.shape), type=ir.TensorType(ir.DataType.INT64),
                                            const_value=ir.tensor(array, name=name)))
    return graph.initializers[name]
