"""qwen3export/backends/onnx_quant.py: a quantized linear as com.microsoft MatMulNBits and as standard
DequantizeLinear (opset 21, blocked) + MatMul, each run in ONNX Runtime's CPU provider against quant.dequantize
and a torch matmul."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qwen3export.backends.onnx_quant import dequantize_matmul, matmul_nbits, matmul_nbits_block, qmoe
from qwen3export.errors import InputError
from qwen3export.kernels.fused_moe_wq import fused_moe_wq_reference
from qwen3export.kernels.moe_routing import moe_routing_reference
from qwen3export.quant import QuantizedWeight, dequantize, quantize_weight

# onnxruntime 1.2x reads IR version <= 10 / 13; onnx.helper would stamp its own (newer) one
IR_VERSION = 10


def _run(nodes, inits, x: np.ndarray, n: int, extra: dict[str, np.ndarray] | None = None) -> np.ndarray:
    elem = TensorProto.FLOAT if x.dtype == np.float32 else TensorProto.FLOAT16
    dims = [f"d{i}" for i in range(x.ndim - 1)]
    feeds = {"x": x, **(extra or {})}
    inputs = [helper.make_tensor_value_info(k, elem, [*dims, v.shape[-1]]) for k, v in feeds.items()]
    graph = helper.make_graph(nodes, "linear", inputs, [helper.make_tensor_value_info("y", elem, [*dims, n])], inits)
    model = helper.make_model(graph, ir_version=IR_VERSION,
                              opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    onnx.checker.check_model(model)
    options = ort.SessionOptions()
    # ONNX Runtime fuses DequantizeLinear(int4/int8, blocked) + MatMul into MatMulNBits with accuracy level 4
    # by default, i.e. it quantizes the activations to int8 (errors ~1e-2 here); 0 keeps them as they are
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def _weight(n, k, mode, group, zero_points, seed=0):
    g = torch.Generator().manual_seed(seed)
    qw = quantize_weight(torch.randn(n, k, generator=g) * 0.05, mode, group, scale_dtype=torch.float32)
    if zero_points:  # an AWQ / GPTQ-style asymmetric weight: the same codes, other zero points
        zeros = (2 ** (qw.bits - 1) + torch.randint(-3, 4, qw.scales.shape, generator=g)).to(torch.uint8)
        qw = QuantizedWeight(qw.mode, qw.qweight, qw.scales, zeros, qw.group_size)
    return qw


# (N, K, mode, group, zero points): int4 at Qwen3's g128 and small groups, an odd number of blocks per row
# (zero points padded to a byte), int8 per channel with K a power of two and not (96: blocks of 32; 768 = 3 x 256)
CASES = [(48, 256, "int4", 128, False), (40, 128, "int4", 32, True), (24, 96, "int4", 32, True),
         (32, 64, "int8", None, False), (16, 96, "int8", None, False), (8, 768, "int8", None, False)]


@pytest.mark.parametrize("translate", [matmul_nbits, dequantize_matmul], ids=["MatMulNBits", "DequantizeLinear"])
@pytest.mark.parametrize("n,k,mode,group,zero_points", CASES)
def test_translation_matches_dequantized_matmul(translate, n, k, mode, group, zero_points):
    qw = _weight(n, k, mode, group or 128, zero_points, seed=n + k)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1))
    nodes, inits = translate("x", "y", qw, "model.layers.0.mlp.down_proj")
    got = _run(nodes, inits, x.numpy(), n)
    np.testing.assert_allclose(got, (x @ dequantize(qw).t()).numpy(), atol=1e-5, rtol=1e-5)


def test_asymmetric_int8_for_the_standard_flavour():
    qw = _weight(32, 128, "int8", None, False)
    zeros = (128 + torch.randint(-5, 6, qw.scales.shape, generator=torch.Generator().manual_seed(2))).to(torch.uint8)
    qw = QuantizedWeight("int8", qw.qweight, qw.scales, zeros, 128)
    x = torch.randn(1, 2, 128)
    for translate in (matmul_nbits, dequantize_matmul):
        got = _run(*translate("x", "y", qw, "q_proj"), x.numpy(), 32)
        np.testing.assert_allclose(got, (x @ dequantize(qw).t()).numpy(), atol=1e-5, rtol=1e-5)


def test_fp16_activations():
    qw = _weight(32, 128, "int4", 32, False)
    x = torch.randn(1, 4, 128)
    for translate in (matmul_nbits, dequantize_matmul):
        got = _run(*translate("x", "y", qw, "q_proj", act_dtype=torch.float16), x.half().numpy(), 32)
        np.testing.assert_allclose(got.astype(np.float32), (x @ dequantize(qw).t()).numpy(), atol=3e-3, rtol=3e-3)


def test_layouts_and_refusals():
    qw = _weight(8, 64, "int4", 16, True)
    nodes, inits = matmul_nbits("x", "y", qw, "p")
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs == {"K": 64, "N": 8, "bits": 4, "block_size": 16, "accuracy_level": 0}
    assert [list(t.dims) for t in inits] == [[8, 4, 8], [32], [16]]  # B, scales [N * blocks], zeros 2 a byte
    assert nodes[0].domain == "com.microsoft"
    assert matmul_nbits_block(_weight(4, 3072, "int8", None, False)) == 256
    with pytest.raises(InputError, match="2-D int4/int8"):
        matmul_nbits("x", "y", quantize_weight(torch.randn(4, 32), "fp8"), "p")
    with pytest.raises(InputError, match="blocks of >= 16"):
        matmul_nbits_block(_weight(4, 24, "int8", None, False))


def _experts(e, n, k, mode, group, zero_points, seed):
    qw = _weight(e * n, k, mode, group, zero_points, seed)  # quantize as one matrix, then view as experts
    view = lambda t: t.reshape(e, n, t.shape[-1])  # noqa: E731
    return QuantizedWeight(qw.mode, view(qw.qweight), view(qw.scales),
                           None if qw.zero_points is None else view(qw.zero_points), qw.group_size)


# (mode, gate_up group, down group, zero points) with H = 64, I = 32: int4 symmetric and asymmetric; int4 per
# channel (GPTQ group_size -1), whose groups H and I differ and are re-blocked to 32; int8 (always per channel,
# QMoE's column-wise scales)
MOE_CASES = [("int4", 32, 32, False), ("int4", 16, 16, True), ("int4", 64, 32, True), ("int4", 64, 32, False),
             ("int8", 64, 32, False), ("int8", 64, 32, True)]


@pytest.mark.parametrize("mode,g_gate_up,g_down,zero_points", MOE_CASES)
def test_qmoe_matches_the_dequantized_moe(mode, g_gate_up, g_down, zero_points):
    t, h, inter, e, k = 7, 64, 32, 8, 2
    per_channel = (g_gate_up, g_down) == (h, inter)
    gate_up = _experts(e, 2 * inter, h, mode, g_gate_up, zero_points, seed=1)
    down = _experts(e, h, inter, mode, g_down, zero_points, seed=2)
    g = torch.Generator().manual_seed(3)
    x, router = torch.randn(t, h, generator=g), torch.randn(e, h, generator=g)
    nodes, inits = qmoe("x", "logits", "y", gate_up, down, k, True, "model.layers.1.mlp")
    got = _run(nodes, inits, x.numpy(), h, {"logits": (x @ router.t()).numpy()})
    weights, ids = moe_routing_reference(x, router, k, True)
    want = fused_moe_wq_reference(x, (gate_up.qweight, gate_up.scales, gate_up.zero_points),
                                  (down.qweight, down.scales, down.zero_points), weights, ids, gate_up.bits)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs.get("block_size") == (None if mode == "int8" and per_channel else 32 if g_down == 32 else 16)
