"""backends/onnx_plumbing.py: the Reshape / Transpose chains removed after export compute the same values
(ONNX Runtime on the graph before and after), and chains that are not the identity are kept."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest

from qwen3export.backends.onnx_plumbing import remove_shape_plumbing

B, S = ir.SymbolicDim("batch"), ir.SymbolicDim("seq")
N, D = 3, 8  # heads, head size (cos/sin caches D / 2 wide)
FLOAT = ir.TensorType(ir.DataType.FLOAT)


def _value(name, shape, type_=FLOAT):
    return ir.Value(name=name, shape=ir.Shape(shape), type=type_)


def _const(tape, values):
    return tape.op("Constant", [], attributes={"value": ir.tensor(np.array(values, dtype=np.int64))})


def _model(last_perm=(0, 2, 1, 3)) -> ir.Model:
    """x [B, S, N*D] -> view [B, S, N, D] -> Transpose -> RotaryEmbedding -> Transpose(last_perm) -> Reshape
    [B, S, N*D] = rotated; and x -> view -> Transpose(0,2,1,3) -> Transpose(0,2,1,3) -> Reshape = plain."""
    x = _value("x", [B, S, N * D])
    pos = _value("position_ids", [B, S], ir.TensorType(ir.DataType.INT64))
    cos, sin = _value("cos", [64, D // 2]), _value("sin", [64, D // 2])
    tape = ir.tape.Tape()
    heads = tape.op("Reshape", [x, _const(tape, [0, 0, N, D])])
    heads.shape, heads.type = ir.Shape([B, S, N, D]), FLOAT
    bnsd = tape.op("Transpose", [heads], attributes={"perm": [0, 2, 1, 3]})
    rope = tape.op("RotaryEmbedding", [bnsd, pos, cos, sin], attributes={"interleaved": 0}, domain="com.microsoft")
    rope.shape, rope.type = ir.Shape([B, N, S, D]), FLOAT
    back = tape.op("Transpose", [rope], attributes={"perm": list(last_perm)})
    back.shape, back.type = ir.Shape([B, S, N, D] if last_perm == (0, 2, 1, 3) else [B, N, D, S]), FLOAT
    rotated = tape.op("Reshape", [back, _const(tape, [0, 0, N * D] if last_perm == (0, 2, 1, 3) else [0, N * D, -1])])
    rotated.type = FLOAT
    rotated.shape = ir.Shape([B, S, N * D] if last_perm == (0, 2, 1, 3) else [B, N * D, S])
    t1 = tape.op("Transpose", [heads], attributes={"perm": [0, 2, 1, 3]})
    t1.shape, t1.type = ir.Shape([B, N, S, D]), FLOAT
    t2 = tape.op("Transpose", [t1], attributes={"perm": [0, 2, 1, 3]})
    t2.shape, t2.type = ir.Shape([B, S, N, D]), FLOAT
    plain = tape.op("Reshape", [t2, _const(tape, [0, 0, N * D])])
    plain.shape, plain.type = ir.Shape([B, S, N * D]), FLOAT
    outs = [tape.op("Identity", [v]) for v in (rotated, plain)]  # the graph's outputs are kept as they are
    for out, v in zip(outs, (rotated, plain)):
        out.shape, out.type = v.shape, FLOAT
    graph = ir.Graph([x, pos, cos, sin], outs, nodes=tape.nodes,
                     opset_imports={"": 18, "com.microsoft": 1})
    return ir.Model(graph, ir_version=10)


def _run(model: ir.Model, feeds):
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(rng, batch=2, seq=5):
    angles = rng.uniform(0, 3, (64, D // 2)).astype(np.float32)
    return {"x": rng.standard_normal((batch, seq, N * D)).astype(np.float32),
            "position_ids": rng.integers(0, 64, (batch, seq)).astype(np.int64),
            "cos": np.cos(angles), "sin": np.sin(angles)}


def _ops(model):
    return [n.op_type for n in model.graph]


def test_rope_transposes_and_identity_chains_go_and_values_stay():
    rng = np.random.default_rng(0)
    feeds = _feeds(rng)
    model = _model()
    want = _run(model, feeds)
    sites = remove_shape_plumbing(model)
    # the 3-D rotary reads x itself (view then flatten), its result is `rotated` (flatten after a view), `plain` is x
    assert sites == {"rope_3d": 1, "inverse_transposes": 1, "identity_reshapes": 3}
    assert sorted(_ops(model)) == ["Identity", "Identity", "RotaryEmbedding"]
    got = _run(model, feeds)
    np.testing.assert_allclose(got[0], want[0], rtol=0, atol=1e-6)
    np.testing.assert_array_equal(got[1], feeds["x"])
    other = _feeds(rng, batch=1, seq=3)  # the dims stay symbolic
    np.testing.assert_allclose(_run(model, other)[0], _run(_model(), other)[0], rtol=0, atol=1e-6)


@pytest.mark.parametrize("perm", [(0, 1, 3, 2)])
def test_chains_that_are_not_the_identity_stay(perm):
    rng = np.random.default_rng(1)
    feeds = _feeds(rng)
    model = _model(last_perm=perm)
    want = _run(model, feeds)
    sites = remove_shape_plumbing(model)
    assert sites["rope_3d"] == 0 and _ops(model).count("RotaryEmbedding") == 1
    assert _ops(model).count("Transpose") == 2  # around the rotary embedding (the other pair cancels)
    np.testing.assert_allclose(_run(model, feeds)[0], want[0], rtol=0, atol=0)
