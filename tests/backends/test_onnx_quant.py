"""qwen3export/backends/onnx_quant.py: a quantized linear as com.microsoft MatMulNBits and as standard
DequantizeLinear (opset 21, blocked) + MatMul, each run in ONNX Runtime's CPU provider against quant.dequantize
and a torch matmul; the translations of the quantized ops in the exported quantized decoder (both flavours,
int4 / int8 / fp8, baked and unbaked) against the eager quantized model."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper

from qwen3export.backends.onnx_ops import bake_weight_layouts, custom_translation_table
from qwen3export.backends.onnx_quant import OPSET as QUANT_OPSET
from qwen3export.backends.onnx_quant import (bake_quantized_weights, dequantize_matmul, matmul_nbits,
                                             matmul_nbits_block, qmoe, quant_translation_table)
from qwen3export.graph_capture import capture
from qwen3export.errors import InputError
from qwen3export.generation import greedy_generate, left_pad
from qwen3export.graphs.passes import lower
from qwen3export.graphs.quantized import QuantizedTensor, quantized_tensors
from qwen3export.quant import build_quantized
from qwen3export.kernels.fused_moe_wq import fused_moe_wq_reference
from qwen3export.kernels.moe_routing import moe_routing_reference
from qwen3export.model import resolve
from qwen3export.parity import check_parity
from qwen3export.quant_format import QuantConfig, QuantizedWeight, dequantize, quantize_weight

from ort_step import OrtStep as SharedOrtStep
from ort_step import export
from quant_cases import PARTIAL, partial_weight

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
        qw = QuantizedWeight(qw.mode, qw.qweight, qw.scales, zeros, qw.group_size, qw.in_features)
    return qw


# (N, K, mode, group, zero points): int4 at Qwen3's g128 and small groups, an odd number of blocks per row
# (zero points padded to a byte), int8 per channel with K a power of two and not (96: blocks of 32; 768 = 3 x 256;
# 72 and an odd 71: no power-of-two block divides them, blocks of 64, the last one partial)
CASES = [(48, 256, "int4", 128, False), (40, 128, "int4", 32, True), (24, 96, "int4", 32, True),
         (32, 64, "int8", None, False), (16, 96, "int8", None, False), (8, 768, "int8", None, False),
         (16, 72, "int8", None, False), (8, 71, "int8", None, True)]


@pytest.mark.parametrize("translate", [matmul_nbits, dequantize_matmul], ids=["MatMulNBits", "DequantizeLinear"])
@pytest.mark.parametrize("n,k,mode,group,zero_points", CASES)
def test_translation_matches_dequantized_matmul(translate, n, k, mode, group, zero_points):
    qw = _weight(n, k, mode, group or 128, zero_points, seed=n + k)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1))
    nodes, inits = translate("x", "y", qw, "model.layers.0.mlp.down_proj")
    got = _run(nodes, inits, x.numpy(), n)
    np.testing.assert_allclose(got, (x @ dequantize(qw).t()).numpy(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("translate", [matmul_nbits, dequantize_matmul], ids=["MatMulNBits", "DequantizeLinear"])
@pytest.mark.parametrize("zero_points", [False, True], ids=["symmetric", "zero_points"])
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("k,group", PARTIAL + [(600, 512)])
def test_partial_last_group_matches_dequantized_matmul(translate, k, group, mode, zero_points):
    """A group size that does not divide K: MatMulNBits gets B [N, ceil(K/block), blob] with the last block padded,
    DequantizeLinear-21 codes [K, N] with scales [ceil(K/g), N]; both exact against dequantize + matmul, for
    int4 and grouped int8 (GPTQ 8-bit). Groups of 512 run as MatMulNBits blocks of 256: 600 = 2 + 1/3 blocks."""
    qw = partial_weight((), 24, k, mode, group, zero_points, seed=k)
    x = torch.randn(2, 3, k, generator=torch.Generator().manual_seed(1))
    got = _run(*translate("x", "y", qw, "model.layers.0.mlp.down_proj"), x.numpy(), 24)
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
    # one group over K takes any block: the largest power of two in 16..256 not above K, the last block partial
    assert [matmul_nbits_block(_weight(4, k, "int8", None, False)) for k in (24, 72, 8)] == [16, 64, 16]
    # K 72 in groups of 32: 3 blocks, the last one 8 columns and padded; zero points 3 nibbles -> 2 bytes a row
    nodes, inits = matmul_nbits("x", "y", _weight(8, 72, "int4", 32, True), "p")
    assert {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}["K"] == 72
    assert [list(t.dims) for t in inits] == [[8, 3, 16], [24], [16]]
    with pytest.raises(InputError, match="2-D int4/int8"):
        matmul_nbits("x", "y", quantize_weight(torch.randn(4, 32), "fp8"), "p")
    with pytest.raises(InputError, match="blocks of >= 16"):  # several groups of 24 (a checkpoint's): no block fits
        matmul_nbits_block(QuantizedWeight("int8", torch.zeros(4, 48, dtype=torch.uint8), torch.ones(4, 2), None, 24))


def _experts(e, n, k, mode, group, zero_points, seed):
    qw = _weight(e * n, k, mode, group, zero_points, seed)  # quantize as one matrix, then view as experts
    view = lambda t: t.reshape(e, n, t.shape[-1])  # noqa: E731
    return QuantizedWeight(qw.mode, view(qw.qweight), view(qw.scales),
                           None if qw.zero_points is None else view(qw.zero_points), qw.group_size, qw.in_features)


# (mode, gate_up group, down group, zero points) with H = 64, I = 32: int4 symmetric and asymmetric; int4 per
# channel (GPTQ group_size -1), whose groups H and I differ and are re-blocked to 32; int8 (always per channel,
# QMoE's column-wise scales)
MOE_CASES = [("int4", 32, 32, False), ("int4", 16, 16, True), ("int4", 64, 32, True), ("int4", 64, 32, False),
             ("int8", 64, 32, False), ("int8", 64, 32, True)]


def _assert_qmoe_matches_reference(gate_up, down, t: int, h: int, e: int, k: int) -> list:
    """One com.microsoft QMoE node in ONNX Runtime against moe_routing + fused_moe_wq references on the same
    quantized experts (T tokens, hidden H, E experts, top-k); returns the emitted nodes."""
    g = torch.Generator().manual_seed(3)
    x, router = torch.randn(t, h, generator=g), torch.randn(e, h, generator=g)
    nodes, inits = qmoe("x", "logits", "y", gate_up, down, k, True, "model.layers.1.mlp")
    got = _run(nodes, inits, x.numpy(), h, {"logits": (x @ router.t()).numpy()})
    weights, ids = moe_routing_reference(x, router, k, True)
    want = fused_moe_wq_reference(x, (gate_up.qweight, gate_up.scales, gate_up.zero_points),
                                  (down.qweight, down.scales, down.zero_points), weights, ids, gate_up.bits)
    np.testing.assert_allclose(got, want.numpy(), atol=1e-5, rtol=1e-5)
    return nodes


@pytest.mark.parametrize("mode,g_gate_up,g_down,zero_points", MOE_CASES)
def test_qmoe_matches_the_dequantized_moe(mode, g_gate_up, g_down, zero_points):
    t, h, inter, e, k = 7, 64, 32, 8, 2
    per_channel = (g_gate_up, g_down) == (h, inter)
    gate_up = _experts(e, 2 * inter, h, mode, g_gate_up, zero_points, seed=1)
    down = _experts(e, h, inter, mode, g_down, zero_points, seed=2)
    nodes = _assert_qmoe_matches_reference(gate_up, down, t, h, e, k)
    attrs = {a.name: helper.get_attribute_value(a) for a in nodes[0].attribute}
    assert attrs.get("block_size") == (None if mode == "int8" and per_channel else 32 if g_down == 32 else 16)


# (H, I, mode, gate_up group, down group, zero points): partial last groups in both weights and one block size
# for both (72 = 2 x 32 + 8, 40 = 32 + 8; 16 = the common block of 32 and 16); gate_up partial, down whole
# (96 over 64); one partial group per row (128 over 72 and 24: blocks of 128 wider than K); int8 per channel with
# H and I off every block (column-wise scales) and an odd H
MOE_PARTIAL = [(72, 40, "int4", 32, 32, False), (72, 40, "int4", 32, 16, True), (96, 48, "int4", 64, 16, True),
               (72, 24, "int4", 128, 128, False), (72, 40, "int8", None, None, True),
               (71, 33, "int8", None, None, False)]


@pytest.mark.parametrize("h,inter,mode,g_gate_up,g_down,zero_points", MOE_PARTIAL)
def test_qmoe_partial_groups_match_the_dequantized_moe(h, inter, mode, g_gate_up, g_down, zero_points):
    """QMoE takes the codes unpadded ([E, N, K*bits/8]) with scales per block, ceil(K / block) of them."""
    t, e, k = 7, 8, 2
    gate_up = _experts(e, 2 * inter, h, mode, g_gate_up or 128, zero_points, seed=1)
    down = _experts(e, h, inter, mode, g_down or 128, zero_points, seed=2)
    assert gate_up.padded or mode == "int8"
    _assert_qmoe_matches_reference(gate_up, down, t, h, e, k)


def test_qmoe_refuses_odd_int4_in_features():
    """ONNX Runtime's QMoE packs int4 two a byte with no padding and refuses an odd hidden size; the standard
    flavour (DequantizeLinear) and the Triton kernels take it."""
    gate_up, down = _experts(4, 66, 71, "int4", 16, False, seed=1), _experts(4, 71, 33, "int4", 16, False, seed=2)
    with pytest.raises(InputError, match="odd in_features 71.*--onnx-ops standard"):
        qmoe("x", "logits", "y", gate_up, down, 2, True, "moe")


# ====================================================================== the quantized decoder through ONNX
# graphs/quantized.py's decoder, captured and lowered as the pipeline does, exported with the merged
# translation tables at opset 21, weight layouts baked, run in ONNX Runtime CPU against the eager quantized model

CONFIGS = {"int4": QuantConfig("int4", 32), "int8": QuantConfig("int8"), "fp8": QuantConfig("fp8")}
# hidden 256 / intermediate 512 (64 per expert): weights above the exporter optimizer's fold limit (8192 elements),
# so the layout chains reach bake_quantized_weights; a small vocabulary keeps it quick
WIDE = dict(vocab_size=512, bos_token_id=None, eos_token_ids=(1,), think_token_id=None, end_think_token_id=None,
            hidden_size=256, intermediate_size=512)


pytestmark = pytest.mark.usefixtures("one_thread")


# WIDE with hidden 264 = 8 x 32 + 8, intermediate 520 = 16 x 32 + 8, experts' 72 = 2 x 32 + 8: every quantized
# weight but o_proj (K = 4 heads x 32) has a partial last group under int4 g32
PARTIAL_WIDE = dict(WIDE, hidden_size=264, intermediate_size=520, moe_intermediate_size=72)


@functools.cache
def quantized_program(name: str, mode: str, wide: bool = False, zero_points: bool = False, partial: bool = False):
    overrides = dict(WIDE, moe_intermediate_size=64) if wide and name == "tiny-moe" else WIDE if wide else {}
    spec, source, _ = resolve(name, seed=2, **(PARTIAL_WIDE if partial else overrides))
    model = build_quantized(spec, source, CONFIGS[mode])
    if zero_points:  # AWQ / GPTQ-style asymmetric weights: other zero points on the same codes
        g = torch.Generator().manual_seed(4)
        for module in model.modules():
            if isinstance(module, QuantizedTensor):
                mid = 2 ** (module.bits - 1)
                module.zero_points = (mid + torch.randint(-2, 3, module.scales.shape, generator=g)).to(torch.uint8)
    return model, lower(capture(model))[0]


def export_quantized(ep, spec, flavour: str):
    return export(ep, spec, {**custom_translation_table(flavour), **quant_translation_table(flavour)}, QUANT_OPSET)


def OrtStep(path, spec):  # noqa: N802  (the shared step; MatMulNBits at accuracy level 0, see _run)
    return SharedOrtStep(path, spec, {"session.qdq_matmulnbits_accuracy_level": "0"})


def _parity(model, path, dtype: str = "fp32") -> dict:
    return check_parity(OrtStep(path, model.spec), model.empty_cache(2), model, model.empty_cache(2),
                        model.spec.vocab_size, dtype, new_tokens=8)


def _linears(spec) -> int:
    """Quantized linears after graphs/passes/fuse_projections: per layer qkv and o, and for a dense layer gate_up
    and down (a MoE layer's experts are one QMoE, or a stacked DequantizeLinear pair)."""
    return 4 * spec.num_hidden_layers - 2 * len(spec.moe_layers)


def _consumers(program) -> list:
    return [n for n in program.model.graph if n.op_type in ("MatMulNBits", "QMoE", "DequantizeLinear")]


@pytest.mark.parametrize("flavour", ["ort", "standard"])
@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_quantized_decoder_in_onnx_runtime_matches_eager(name, mode, flavour, tmp_path):
    model, ep = quantized_program(name, mode)
    program = export_quantized(ep, model.spec, flavour)
    if flavour == "ort":
        bake_weight_layouts(program.model)
    bake_quantized_weights(program.model)
    ops = Counter(f"{n.domain}::{n.op_type}" for n in program.model.graph.all_nodes())
    spec = model.spec
    linears, moe_layers = _linears(spec), len(spec.moe_layers)
    if flavour == "ort":
        assert (ops["com.microsoft::MatMulNBits"], ops["com.microsoft::QMoE"]) == (linears, moe_layers)
        assert ops["::DequantizeLinear"] == 0
    else:
        assert ops["::DequantizeLinear"] == linears + 2 * moe_layers
        assert not any(k.startswith("com.microsoft") for k in ops)
    for node in _consumers(program):  # every weight input is a stored initializer, in its final type
        weights = node.inputs[2:] if node.op_type == "QMoE" else node.inputs[1:]  # QMoE's 2nd: router logits
        assert all(v is None or v.const_value is not None for v in weights), node.name
        if node.op_type == "DequantizeLinear":
            assert node.inputs[0].dtype == (ir.DataType.INT4 if mode == "int4" else ir.DataType.INT8)
    program.save(str(tmp_path / "decoder.onnx"))
    report = _parity(model, tmp_path / "decoder.onnx")
    assert report["passed"], report["failures"]
    assert report["logits_max_abs"] < 1e-4 and report["greedy_match"]


@pytest.mark.parametrize("flavour", ["ort", "standard"])
def test_fp8_decoder_in_onnx_runtime_matches_eager(flavour, tmp_path):
    """fp8 weights as DequantizeLinear(FLOAT8E4M3FN), activations cast to fp8 per token: ONNX Runtime's CPU
    provider runs both (1.31), so fp8 engines are verified here too, in either flavour."""
    model, ep = quantized_program("tiny", "fp8")
    program = export_quantized(ep, model.spec, flavour)
    bake_quantized_weights(program.model)
    dq = [n for n in _consumers(program) if n.op_type == "DequantizeLinear"]
    assert len(dq) == _linears(model.spec)
    assert all(n.inputs[0].dtype == ir.DataType.FLOAT8E4M3FN for n in dq)
    program.save(str(tmp_path / "decoder.onnx"))
    report = _parity(model, tmp_path / "decoder.onnx", "fp8")  # activation rounding flips: THRESHOLDS["fp8"]
    assert report["passed"], report["failures"]


@pytest.mark.parametrize("flavour,mode,zero_points", [("ort", "int4", True), ("standard", "int4", True),
                                                      ("ort", "int8", True), ("standard", "int4", False)])
def test_baked_layouts_match_the_unbaked_graph(flavour, mode, zero_points, tmp_path):
    """Weights large enough that the exporter leaves the layout chains (nibble unpacking, fc1 interleave, repeated
    scales, packed zero points) in the graph: ONNX Runtime runs the chains as exported and the baked
    initializers alike, and both reproduce the eager model, symmetric and asymmetric."""
    model, ep = quantized_program("tiny-moe", mode, wide=True, zero_points=zero_points)
    program = export_quantized(ep, model.spec, flavour)
    program.save(str(tmp_path / "chains.onnx"))
    assert bake_quantized_weights(program.model) > 0
    left = Counter(n.op_type for n in program.model.graph if n.op_type in ("BitShift", "BitwiseAnd", "BitwiseOr"))
    assert not left
    for node in _consumers(program):
        weights = node.inputs[2:] if node.op_type == "QMoE" else node.inputs[1:]
        assert all(v is None or v.const_value is not None for v in weights), node.name
    if flavour == "standard" and mode == "int4":
        dq = [n for n in _consumers(program) if n.op_type == "DequantizeLinear"]
        want = ir.DataType.UINT4 if zero_points else ir.DataType.INT4
        assert all(n.inputs[0].dtype == want for n in dq)
    program.save(str(tmp_path / "baked.onnx"))
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11]])
    results = [greedy_generate(step, model.empty_cache(2), ids, mask, 4, keep_logits=True)
               for step in (OrtStep(tmp_path / "chains.onnx", model.spec), OrtStep(tmp_path / "baked.onnx", model.spec),
                            model)]
    real = mask.bool()
    for tokens, prefill, steps in results[:2]:
        torch.testing.assert_close(prefill[real], results[2][1][real], atol=1e-4, rtol=0)
        torch.testing.assert_close(torch.stack(steps), torch.stack(results[2][2]), atol=1e-4, rtol=0)
        assert torch.equal(tokens, results[2][0])


@pytest.mark.parametrize("name,mode,flavour,zero_points", [
    ("tiny", "int4", "ort", False), ("tiny", "int4", "standard", True), ("tiny-moe", "int4", "ort", True),
    ("tiny-moe", "int4", "standard", False), ("tiny-moe", "int8", "ort", False)])
def test_partial_groups_decoder_in_onnx_runtime_matches_eager(name, mode, flavour, zero_points, tmp_path):
    """int4 g32 with hidden 264, intermediate 520 and experts' 72: partial last groups in q/k/v/gate/up/down and
    the experts. The translations cut and pad the stored whole-group rows to each op's layout (MatMulNBits'
    ceil(K/block) blocks, QMoE's unpadded codes, DequantizeLinear's [K, N]); the exported chains and the baked
    initializers both run in ONNX Runtime, and the baked engine passes the fp32 parity gate. int8 per channel over
    K = 264 (no power-of-two block divides it): MatMulNBits blocks of 256, B padded past the stored row."""
    model, ep = quantized_program(name, mode, zero_points=zero_points, partial=True)
    tensors = quantized_tensors(model)
    if mode == "int4":  # all but o_proj (K = 4 heads x 32)
        assert sum(qw.padded for qw in tensors.values()) == len(tensors) - model.spec.num_hidden_layers
    program = export_quantized(ep, model.spec, flavour)
    program.save(str(tmp_path / "chains.onnx"))
    if flavour == "ort":
        bake_weight_layouts(program.model)
    assert bake_quantized_weights(program.model) > 0
    for node in _consumers(program):
        weights = node.inputs[2:] if node.op_type == "QMoE" else node.inputs[1:]
        assert all(v is None or v.const_value is not None for v in weights), node.name
    ops = Counter(n.op_type for n in program.model.graph)
    spec = model.spec
    if flavour == "ort":
        assert (ops["MatMulNBits"], ops["QMoE"]) == (_linears(spec), len(spec.moe_layers))
    program.save(str(tmp_path / "baked.onnx"))
    report = _parity(model, tmp_path / "baked.onnx")
    assert report["passed"], report["failures"]
    assert report["greedy_match"]
    ids, mask = left_pad([[5, 6, 7, 8, 9], [10, 11]])
    want = greedy_generate(model, model.empty_cache(2), ids, mask, 4)[0]
    chains = OrtStep(tmp_path / "chains.onnx", model.spec)
    assert torch.equal(greedy_generate(chains, model.empty_cache(2), ids, mask, 4)[0], want)


def test_quant_translation_table_covers_the_quantized_ops():
    for flavour in ("ort", "standard"):
        table = quant_translation_table(flavour)
        assert set(table) == {torch.ops.qwen3export.wq_linear.default, torch.ops.qwen3export.wq_moe.default,
                              torch.ops.qwen3export.fp8_linear.default}
        assert not set(table) & set(custom_translation_table(flavour))
    with pytest.raises(ValueError, match="unknown ONNX op flavour"):
        quant_translation_table("tensorrt")
