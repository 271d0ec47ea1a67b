"""Emit stage: ONNX translations of the `qwen3export::` custom ops that lowering puts into the decoder, for
`torch.onnx.export(ep, dynamo=True, custom_translation_table=custom_translation_table(flavour))`.

"ort": ONNX Runtime `com.microsoft` contrib ops (and ORT's SimplifiedLayerNormalization), for ORT engines.
"standard": plain opset-18 ONNX ops, the same math the un-lowered graph exports to (what TensorRT's parser takes).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

FLAVOURS = ("ort", "standard")
NO_KV_LENS = "qwen3export::attention with kv_lens has no ONNX translation (lowering never emits it)"
FLOAT = ir.DataType.FLOAT


def custom_translation_table(flavour: str) -> dict[Any, Callable]:
    """{torch.ops.qwen3export.<op>.default: onnxscript translation} for `flavour` ("ort" | "standard")."""
    import qwen3export.kernels.ops  # noqa: F401  # lazy: registers the ops named below (loads triton)

    if flavour not in FLAVOURS:
        raise ValueError(f"unknown ONNX op flavour {flavour!r}; choose one of {', '.join(FLAVOURS)}")
    ops = torch.ops.qwen3export
    table = {"ort": (ort_rms_norm, ort_add_rms_norm, ort_qk_norm_rope, ort_attention, ort_moe),
             "standard": (rms_norm, add_rms_norm, qk_norm_rope, attention, moe)}[flavour]
    targets = (ops.rms_norm.default, ops.add_rms_norm.default, ops.qk_norm_rope.default, ops.attention.default,
               ops.moe.default)
    return dict(zip(targets, table))


# ---------------------------------------------------------------------- ORT contrib op handles
@functools.cache
def ort_op(name: str, domain: str = "com.microsoft", outputs: int | None = None) -> Op:
    """An onnxscript Op for an ONNX Runtime contrib op, with the schema ONNX Runtime itself registers
    (onnx.defs does not know them); `outputs` keeps only the first n outputs on the node."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_c  # lazy: onnxruntime, ort flavour only

    found = [s for s in ort_c.get_all_operator_schema() if s.name == name and s.domain == domain]
    if not found:
        raise RuntimeError(f"this ONNX Runtime has no {domain or 'ai.onnx'}::{name}; export with --onnx-ops standard")
    s = max(found, key=lambda s: s.since_version)
    defs = onnx.defs.OpSchema

    def param(p):  # ORT's pybind enums carry the same member names as onnx.defs'
        option = defs.FormalParameterOption.__members__[str(p.option).rsplit(".", 1)[-1]]
        return defs.FormalParameter(p.name, p.typeStr, param_option=option, is_homogeneous=p.isHomogeneous)

    schema = defs(name, domain, s.since_version, inputs=[param(p) for p in s.inputs],
                  outputs=[param(p) for p in s.outputs[:outputs]],
                  type_constraints=[(t.type_param_str, list(t.allowed_type_strs), "") for t in s.type_constraints],
                  attributes=[defs.Attribute(a.name, defs.AttrType.__members__[str(a.type).rsplit(".", 1)[-1]],
                                             required=False) for a in s.attributes.values()])
    return Op(Opset(domain, 1) if domain else op, name, schema)


def int64s(*values: int):
    """An int64 constant [values...]: explicit, since a Python list beside a computed shape leaves the
    exporter no dtype to bind."""
    return op.Constant(value_ints=list(values))


def _int(value: int):
    return op.Constant(value_int=value)


def float_const(value: float):
    return op.Constant(value_float=value)


def static_dim(value: ir.Value, dim: int) -> int:
    d = value.shape[dim]
    if not isinstance(d, int):
        raise ValueError(f"dimension {dim} of {value.name} must be static for ONNX export, got {d}")
    return d


# ---------------------------------------------------------------------- RMSNorm
def _rms(x, weight, eps: float):
    """graphs/decoder.py rms_norm_reference: fp32 compute, cast to the weight's dtype before the weight."""
    xf = op.Cast(x, to=FLOAT)
    var = op.ReduceMean(op.Mul(xf, xf), int64s(-1), keepdims=1)
    return op.Mul(weight, op.CastLike(op.Mul(xf, op.Reciprocal(op.Sqrt(op.Add(var, float_const(eps))))), weight))


def rms_norm(x, weight, eps: float):
    return _rms(x, weight, eps)


def add_rms_norm(x, residual, weight, eps: float):
    total = op.Add(x, residual)
    return _rms(total, weight, eps), total


def ort_rms_norm(x, weight, eps: float):
    # stash_type 1: ORT normalises in fp32 whatever the input type, as the graph does
    return ort_op("SimplifiedLayerNormalization", "", 1)(x, weight, axis=-1, epsilon=eps, stash_type=1)


def ort_add_rms_norm(x, residual, weight, eps: float):
    if len(x.shape) not in (2, 3):  # the contrib op takes [B, S, H] or [T, H] only
        return add_rms_norm(x, residual, weight, eps)
    out, _, _, total = ort_op("SkipSimplifiedLayerNormalization")(x, residual, weight, epsilon=eps)
    return out, total


# ---------------------------------------------------------------------- q/k norm + RoPE
def _norm_rope(x, weight, cos, sin, eps: float):
    """x [B, S, H, D] -> RMSNorm over D -> [B, H, S, D] -> rotate_half RoPE with cos/sin [B, S, D]."""
    t = op.Transpose(_rms(x, weight, eps), perm=[0, 2, 1, 3])
    d = static_dim(x, 3)
    half = d // 2
    hi, lo = op.Slice(t, int64s(half), int64s(d), int64s(3)), op.Slice(t, int64s(0), int64s(half), int64s(3))
    rotated = op.Concat(op.Neg(hi), lo, axis=-1)
    return op.Add(op.Mul(t, op.Unsqueeze(cos, int64s(1))), op.Mul(rotated, op.Unsqueeze(sin, int64s(1))))


def qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float):
    return _norm_rope(q, q_weight, cos, sin, eps), _norm_rope(k, k_weight, cos, sin, eps)


def _ort_norm_rope(x, weight, cos_half, sin_half, positions, eps: float):
    normed = ort_rms_norm(x, weight, eps)
    return ort_op("RotaryEmbedding")(op.Transpose(normed, perm=[0, 2, 1, 3]), positions, cos_half, sin_half,
                                      interleaved=0)


def ort_qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps: float):
    """SimplifiedLayerNormalization + com.microsoft RotaryEmbedding. RotaryEmbedding reads half-width
    [positions, D/2] caches: each (b, s) row of cos/sin becomes one "position", and its first half is
    the cache row, which holds because rope_cos_sin (graphs/decoder.py) repeats its frequencies
    (cat((freqs, freqs))) — the standard flavour reads the full tables."""
    half = static_dim(q, 3) // 2
    rows = op.Shape(cos, start=0, end=2)  # [B, S]
    positions = op.Reshape(op.Range(_int(0), op.ReduceProd(rows, keepdims=0), _int(1)), rows)  # [B, S] = b * S + s
    cos_half = op.Reshape(op.Slice(cos, int64s(0), int64s(half), int64s(2)), int64s(-1, half))  # [B*S, D/2]
    sin_half = op.Reshape(op.Slice(sin, int64s(0), int64s(half), int64s(2)), int64s(-1, half))
    return (_ort_norm_rope(q, q_weight, cos_half, sin_half, positions, eps),
            _ort_norm_rope(k, k_weight, cos_half, sin_half, positions, eps))


# ---------------------------------------------------------------------- attention
def _key_bias(attention_mask, like, q, k):
    """Additive [B, 1, S, L] bias: 0 where the key is visible, the dtype minimum where it is padding or
    (causal) in the query's future; query i sits at position L - S + i (graphs/decoder.py attention_mask_bias)."""
    s, length = op.Shape(q, start=2, end=3), op.Shape(k, start=2, end=3)
    kpos = op.Range(_int(0), op.Squeeze(length), _int(1))  # [L]
    qpos = op.Range(op.Squeeze(op.Sub(length, s)), op.Squeeze(length), _int(1))  # [S]
    allowed = op.LessOrEqual(op.Unsqueeze(kpos, int64s(0)), op.Unsqueeze(qpos, int64s(1)))  # [S, L]
    if attention_mask is not None:
        keep = op.Not(op.Equal(attention_mask, op.CastLike(_int(0), attention_mask)))  # [B, L]
        allowed = op.And(op.Unsqueeze(allowed, int64s(0)), op.Unsqueeze(keep, int64s(1)))  # [B, S, L]
    else:
        allowed = op.Unsqueeze(allowed, int64s(0))
    minimum = float(np.finfo(np.float32).min)  # finfo(dtype).min as the graph; fp32 is the verified type
    bias = op.Where(allowed, op.CastLike(float_const(0.0), like), op.CastLike(float_const(minimum), like))  # [B, S, L]
    return op.Unsqueeze(bias, int64s(1))  # [B, 1, S, L]


def attention(q, k, v, attention_mask=None, kv_lens=None, scale: float = 1.0):
    """Grouped attention as the graph writes it: q [B, Hq, S, D] viewed as [B, Hkv, G, S, D], no K/V repeat."""
    if kv_lens is not None:
        raise NotImplementedError(NO_KV_LENS)
    hq, hkv, d = static_dim(q, 1), static_dim(k, 1), static_dim(q, 3)
    qg = op.Reshape(q, int64s(0, hkv, hq // hkv, -1, d))
    kt = op.Transpose(op.Unsqueeze(k, int64s(2)), perm=[0, 1, 2, 4, 3])  # [B, Hkv, 1, D, L]
    scores = op.Cast(op.Mul(op.MatMul(qg, kt), op.CastLike(float_const(scale), q)), to=FLOAT)
    # the bias is added in fp32: fp32's minimum cast to fp16 is -inf, and a fully padded row of -inf is NaN
    scores = op.Add(scores, op.Unsqueeze(_key_bias(attention_mask, scores, q, k), int64s(1)))  # [B, Hkv, G, S, L]
    probs = op.CastLike(op.Softmax(scores, axis=-1), q)
    return op.Reshape(op.MatMul(probs, op.Unsqueeze(v, int64s(2))), int64s(0, hq, -1, d))


def ort_attention(q, k, v, attention_mask=None, kv_lens=None, scale: float = 1.0):
    """com.microsoft GroupQueryAttention over a KV cache buffer shared by past and present.

    The graph hands the op k, v [B, Hkv, P + S, D] = Concat(past, new); GQA takes the two apart, so this
    reads them from the Concat: the new keys as [B, S, Hkv*D], the cache input itself as past. The node's
    present outputs are the cache (backends/onnx.py share_kv_buffer makes them the graph's present.* outputs
    and feeds every layer one seqlens_k / total_sequence_length computed from attention_mask; an engine binds
    past and present to one [B, Hkv, max_seq, D] buffer, which GQA then updates in place: no copy of the cache
    per step). Rows are right-padded, per-row lengths in seqlens_k (mask row sum - 1; DESIGN §2, the runner's
    slots). Until share_kv_buffer rewires them, each layer computes seqlens_k / total from the mask itself.
    """
    if kv_lens is not None:
        raise NotImplementedError(NO_KV_LENS)
    hq, hkv, d = static_dim(q, 1), static_dim(k, 1), static_dim(q, 3)
    past_k, new_k = _cache_and_new(k)
    past_v, new_v = _cache_and_new(v)
    query = op.Reshape(op.Transpose(q, perm=[0, 2, 1, 3]), int64s(0, 0, hq * d))  # [B, S, Hq*D]

    def bsh(x):  # new positions [B, Hkv, S, D] -> [B, S, Hkv*D]
        return op.Reshape(op.Transpose(x, perm=[0, 2, 1, 3]), int64s(0, 0, hkv * d))

    length = op.Shape(attention_mask, start=1, end=2)  # [1]: P + S
    seqlens = op.Cast(op.Sub(op.ReduceSum(attention_mask, int64s(1), keepdims=0), int64s(1)), to=ir.DataType.INT32)
    total = op.Cast(op.Squeeze(length), to=ir.DataType.INT32)
    out, _, _ = ort_op("GroupQueryAttention", outputs=3)(query, bsh(new_k), bsh(new_v), past_k, past_v, seqlens,
                                                          total, num_heads=hq, kv_num_heads=hkv, scale=float(scale))
    return op.Transpose(op.Reshape(out, int64s(0, 0, hq, d)), perm=[0, 2, 1, 3])  # [B, Hq, S, D]


def _cache_and_new(x):
    """(past cache, new keys) of the decoder's k/v = Concat(past, new) along the sequence axis."""
    node = x.producer()
    if node is None or node.op_type != "Concat" or len(node.inputs) != 2:
        raise ValueError(f"the ort flavour's attention reads the KV cache from Concat(past, new); {x.name} is "
                         f"made by {node.op_type if node else 'no node'}: export with --onnx-ops standard")
    return node.inputs[0], node.inputs[1]


def _branch(build, inputs, *args) -> ir.Graph:
    """An If branch: nodes built on a tape, reading values of the enclosing graph (outer scope)."""
    tape = ir.tape.Tape()
    out = build(tape, *inputs, *args)
    return ir.Graph(inputs=[], outputs=[out], nodes=tape.nodes, name=build.__name__.strip("_"))


# ---------------------------------------------------------------------- MoE
def moe(x, router_weight, gate_up, down, top_k: int, norm_topk_prob: bool):
    """graphs/decoder.py SparseMoeBlock, routed as the custom op routes (ONNX TopK breaks ties toward the
    lower index, as the custom op does), the experts run one of two ways under an If:
    - a step of T tokens with T * k <= E (decode): the chosen experts' weights are gathered and only they run,
      reading k/E of the expert bytes per token (TensorRT and CUDA providers would otherwise stream every
      expert of a 128-expert layer for each decoded token);
    - larger steps (prefill): every expert on every token, combined by a dense [T, E] matrix that is zero off
      the top-k: one Gemm per layer rather than T * k gathered weight copies.
    Weights are read in their stored layout (Gemm transB, MatMul with down first): no transposed copies."""
    e, two_i, h = static_dim(gate_up, 0), static_dim(gate_up, 1), static_dim(gate_up, 2)
    inter = two_i // 2
    t = op.Reshape(x, int64s(-1, h))  # [T, H]
    probs = op.Softmax(op.Cast(op.Gemm(t, router_weight, transB=1), to=FLOAT), axis=-1)  # [T, E]
    top_w, top_i = op.TopK(probs, int64s(top_k), axis=-1)
    if norm_topk_prob:
        top_w = op.Div(top_w, op.ReduceSum(top_w, int64s(-1), keepdims=1))
    top_w = op.CastLike(top_w, t)
    pairs = op.Mul(op.Shape(t, start=0, end=1), int64s(top_k))
    few = op.Squeeze(op.LessOrEqual(pairs, int64s(e)))
    gathered = (t, top_i, top_w, gate_up, down, int64s(1), int64s(-1), int64s(1, top_k, 1), int64s(-1, h, 1),
                int64s(0), int64s(inter), int64s(two_i), int64s(-1, 1, 1), int64s(-1, top_k, h))
    dense = (t, probs, top_i, top_w, router_weight, gate_up, down, int64s(e * two_i, h), int64s(-1, e, two_i),
             int64s(0), int64s(inter), int64s(two_i), int64s(2), int64s(1), int64s(0))
    out = op.If(few, then_branch=_branch(_gathered_experts, gathered),
                else_branch=_branch(_dense_experts, dense))  # [T, H]
    return op.Reshape(out, op.Shape(x))


def _tape_silu_mul(tape, gate, up):
    return tape.op("Mul", [tape.op("Mul", [gate, tape.op("Sigmoid", [gate])]), up])


def _gathered_experts(tape, t, top_i, top_w, gate_up, down, one, flat, per_slot, column, zero, inter, two_i,
                      weight_shape, token_shape):
    """T * k (token, expert) pairs, each with its expert's weights gathered: [P, 2I, H] @ [P, H, 1]."""
    experts = tape.op("Reshape", [top_i, flat])  # [P]
    xs = tape.op("Reshape", [tape.op("Expand", [tape.op("Unsqueeze", [t, one]), per_slot]), column])  # [P, H, 1]
    gu = tape.op("MatMul", [tape.op("Gather", [gate_up, experts], attributes={"axis": 0}), xs])  # [P, 2I, 1]
    act = _tape_silu_mul(tape, tape.op("Slice", [gu, zero, inter, one]), tape.op("Slice", [gu, inter, two_i, one]))
    y = tape.op("MatMul", [tape.op("Gather", [down, experts], attributes={"axis": 0}), act])  # [P, H, 1]
    y = tape.op("Mul", [y, tape.op("Reshape", [top_w, weight_shape])])
    return tape.op("ReduceSum", [tape.op("Reshape", [y, token_shape]), one], attributes={"keepdims": 0})  # [T, H]


def _dense_experts(tape, t, probs, top_i, top_w, router_weight, gate_up, down, stacked, per_expert, zero, inter,
                   two_i, axis2, one, axis0):
    """Every expert on every token: [T, E*2I] in one Gemm, combined by the [T, E] top-k matrix."""
    del router_weight  # routed outside the If
    combine = tape.op("ScatterElements", [tape.op("CastLike", [tape.op("ConstantOfShape", [tape.op("Shape", [probs])]), t]),
                                          top_i, top_w], attributes={"axis": 1})  # [T, E]
    gu = tape.op("Reshape", [tape.op("Gemm", [t, tape.op("Reshape", [gate_up, stacked])], attributes={"transB": 1}),
                             per_expert])  # [T, E, 2I]
    act = _tape_silu_mul(tape, tape.op("Slice", [gu, zero, inter, axis2]), tape.op("Slice", [gu, inter, two_i, axis2]))
    y = tape.op("MatMul", [down, tape.op("Transpose", [act], attributes={"perm": [1, 2, 0]})])  # [E, H, T]
    weights = tape.op("Unsqueeze", [tape.op("Transpose", [combine], attributes={"perm": [1, 0]}), one])  # [E, 1, T]
    out = tape.op("ReduceSum", [tape.op("Mul", [y, weights]), axis0], attributes={"keepdims": 0})  # [H, T]
    return tape.op("Transpose", [out], attributes={"perm": [1, 0]})


def ort_moe(x, router_weight, gate_up, down, top_k: int, norm_topk_prob: bool):
    """com.microsoft MoE (DESIGN §5): CPU MoE takes fused SwiGLU weights interleaved (gate row j at 2j,
    up row j at 2j + 1), router logits (it applies the softmax) and silu(g) * u as alpha 1, beta 0. The
    interleave is a Reshape/Transpose of the stored weight here; `bake_weight_layouts` turns it into an
    initializer after export (else ONNX Runtime folds it when the session loads, holding both copies)."""
    e, two_i, h = static_dim(gate_up, 0), static_dim(gate_up, 1), static_dim(gate_up, 2)
    halves = op.Reshape(gate_up, int64s(e, 2, two_i // 2, h))  # [E, gate|up, I, H]
    fc1 = op.Reshape(op.Transpose(halves, perm=[0, 2, 1, 3]), int64s(e, two_i, h))  # rows g0 u0 g1 u1 ...
    t = op.Reshape(x, int64s(-1, h))
    logits = op.Gemm(t, router_weight, transB=1)  # [T, E]
    out = ort_op("MoE")(t, logits, fc1, None, down, k=top_k, activation_type="swiglu", swiglu_fusion=1,
                         activation_alpha=1.0, activation_beta=0.0, normalize_routing_weights=int(norm_topk_prob))
    return op.Reshape(out, op.Shape(x))


# ---------------------------------------------------------------------- after export
def bake_weight_layouts(model: ir.Model) -> int:
    """Replace each MoE fc1 computed from an initializer by Reshape -> Transpose -> Reshape (the SwiGLU
    interleave of `ort_moe`) with an initializer holding the result, computed lazily when the model is
    saved (one layer's experts at a time). Returns how many weights were baked; the standard flavour has none."""
    baked = 0
    for node in list(model.graph):
        if (node.domain, node.op_type) != ("com.microsoft", "MoE"):
            continue
        chain, value = [], node.inputs[2]
        for op_type in ("Reshape", "Transpose", "Reshape"):
            producer = value.producer() if value is not None else None
            if producer is None or producer.op_type != op_type or producer.domain != "":
                break
            chain.append(producer)
            value = producer.inputs[0]
        else:
            shapes = [n.inputs[1] for n in chain if n.op_type == "Reshape"]
            if value.const_value is None or any(s.const_value is None for s in shapes):
                continue
            source = value
            first, transpose, last = chain[2], chain[1], chain[0]
            perm = list(transpose.attributes["perm"].as_ints())
            mid = tuple(first.inputs[1].const_value.numpy().tolist())
            shape = tuple(last.inputs[1].const_value.numpy().tolist())

            def interleaved(source=source, mid=mid, perm=perm, shape=shape):
                data = source.const_value.numpy().reshape(mid).transpose(perm).reshape(shape)
                return ir.tensor(np.ascontiguousarray(data))

            tensor = ir.LazyTensor(interleaved, dtype=source.dtype, shape=ir.Shape(shape))
            baked_value = ir.Value(name=f"{source.name}.interleaved", shape=ir.Shape(shape), type=source.type,
                                   const_value=tensor)
            model.graph.register_initializer(baked_value)
            node.replace_input_with(2, baked_value)
            for n in chain:
                if all(not out.uses() for out in n.outputs):
                    model.graph.remove(n, safe=True)
            if not source.uses() and source.name in model.graph.initializers:
                del model.graph.initializers[source.name]
            baked += 1
    return baked
