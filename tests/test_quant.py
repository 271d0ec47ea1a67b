"""qwen3export/quant.py: RTN int8 / int4 / fp8 quantization, the MatMulNBits-compatible layout, dequantize,
which tensors are quantized, and the quantizing weight source."""

from __future__ import annotations

import pytest
import torch

from qwen3export.errors import InputError, WeightsError
from qwen3export.graphs.decoder import Qwen3Decoder
from qwen3export.quant_format import FP8_MAX, QuantConfig, QuantizedWeight, cat_rows, dequantize, is_quantized, quantize_activation_fp8, quantize_weight, stack
from qwen3export.quant import QuantizedSource, check_quantizable, quantized_names
from qwen3export.spec import preset
from qwen3export.weights import RandomSource, check_names, load_into

from quant_cases import PARTIAL, partial_weight


def _w(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("mode,group,shape", [("int8", None, (48, 96)), ("int4", 32, (40, 128)),
                                              ("int4", 128, (3, 17, 256))])
def test_int_rtn_error_is_at_most_half_a_step(mode, group, shape):
    w = _w(*shape)
    qw = quantize_weight(w, mode, group or 128, scale_dtype=torch.float32)
    g = qw.group_size
    assert g == (group or shape[-1]) and qw.shape == shape and qw.scales.shape == (*shape[:-1], shape[-1] // g)
    step = qw.scales.repeat_interleave(g, -1)
    err = (dequantize(qw) - w).abs()
    assert (err <= step / 2 + 1e-7).all()
    # symmetric: the group's absmax is reproduced exactly
    grouped = w.unflatten(-1, (-1, g))
    idx = grouped.abs().argmax(-1, keepdim=True)
    back = dequantize(qw).unflatten(-1, (-1, g))
    torch.testing.assert_close(back.gather(-1, idx), grouped.gather(-1, idx), rtol=1e-6, atol=0)


def test_int4_layout_is_matmulnbits_low_nibble_first():
    w = torch.tensor([[-7.0, 7.0, 0.0, 1.0] * 4])  # [1, 16], absmax 7 -> scale 1
    qw = quantize_weight(w, "int4", group_size=16, scale_dtype=torch.float32)
    assert qw.qweight.dtype == torch.uint8 and qw.qweight.shape == (1, 8)
    # codes = q + 8: k=0 -> 1 (low nibble), k=1 -> 15 (high nibble); k=2 -> 8, k=3 -> 9
    assert qw.qweight[0, :2].tolist() == [1 | (15 << 4), 8 | (9 << 4)]
    assert qw.zero_points is None and qw.zeros().tolist() == [[8]]
    # MatMulNBits' B is (N, k_blocks, blob_size) = qweight viewed per block
    assert qw.qweight.view(1, 1, 8).shape == (1, 16 // 16, 16 * 4 // 8)
    torch.testing.assert_close(dequantize(qw), w)


def test_int8_codes_are_offset_by_128():
    w = torch.tensor([[-127.0, 0.0, 127.0, 63.4]])
    qw = quantize_weight(w, "int8", scale_dtype=torch.float32)
    assert qw.qweight.tolist() == [[1, 128, 255, 191]] and qw.scales.tolist() == [[1.0]]


def test_scales_are_rounded_before_the_codes_so_requantizing_is_idempotent():
    w = _w(64, 256, seed=3)
    for mode in ("int8", "int4"):
        qw = quantize_weight(w, mode, 64, scale_dtype=torch.float16)
        assert qw.scales.dtype == torch.float16
        again = quantize_weight(dequantize(qw), mode, 64, scale_dtype=torch.float16)
        assert torch.equal(again.qweight, qw.qweight) and torch.equal(again.scales, qw.scales)


def test_all_zero_rows_dequantize_to_zero():
    w = _w(4, 64)
    w[1] = 0
    for mode in ("int8", "int4", "fp8"):
        qw = quantize_weight(w, mode, 32)
        assert torch.equal(dequantize(qw)[1], torch.zeros(64))


def test_fp8_per_channel_relative_error():
    w = _w(32, 80, seed=1)
    qw = quantize_weight(w, "fp8")
    assert qw.qweight.dtype == torch.float8_e4m3fn and qw.scales.shape == (32, 1) and qw.scales.dtype == torch.float32
    assert qw.group_size == 80 and qw.zero_points is None
    # e4m3 keeps 3 mantissa bits: relative rounding error <= 2^-4 for normal values; absmax -> 448 exactly
    deq = dequantize(qw)
    normal = w.abs() >= qw.scales * 2.0**-6
    assert ((deq - w).abs()[normal] <= w.abs()[normal] * 2.0**-4 + 1e-9).all()
    assert torch.allclose(qw.qweight.float().abs().amax(-1), torch.full((32,), FP8_MAX))


def test_fp8_activation_per_token():
    x = torch.randn(5, 64) * torch.tensor([1.0, 10.0, 1e-3, 0.0, 100.0])[:, None]
    codes, scale = quantize_activation_fp8(x)
    assert codes.dtype == torch.float8_e4m3fn and scale.shape == (5, 1)
    assert scale[3].item() == 1.0 and torch.equal(codes[3].float(), torch.zeros(64))
    torch.testing.assert_close(codes.float() * scale, x, rtol=2.0**-4, atol=1e-6)


@pytest.mark.parametrize("group,k,match", [(100, 200, "power of two"), (8, 64, "power of two"),
                                           (48, 96, "power of two"), (True, 64, "power of two")])
def test_bad_group_size_is_one_line(group, k, match):
    with pytest.raises(InputError, match=match) as err:
        quantize_weight(_w(8, k), "int4", group)
    assert "\n" not in str(err.value)


def test_unknown_mode_and_bad_inputs():
    with pytest.raises(InputError, match="unknown --quant 'int3'"):
        quantize_weight(_w(8, 64), "int3")
    with pytest.raises(InputError, match="unknown --quant"):
        QuantConfig("nf4")
    with pytest.raises(WeightsError, match="inf or NaN"):
        quantize_weight(torch.tensor([[float("nan")] * 16]), "int8", name="x.q_proj.weight")
    with pytest.raises(WeightsError, match="inconsistent int4"):
        QuantizedWeight("int4", torch.zeros(4, 8, dtype=torch.uint8), torch.ones(4, 2), None, 16)


def test_which_tensors_are_quantized():
    spec = preset("tiny-moe")
    names = quantized_names(spec)
    assert "model.layers.0.mlp.gate_proj.weight" in names  # dense layer (mlp_only_layers)
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in names
    assert all(f"model.layers.2.self_attn.{p}_proj.weight" in names for p in "qkvo")
    for kept in ("model.layers.1.mlp.gate.weight", "model.embed_tokens.weight", "model.norm.weight",
                 "model.layers.0.self_attn.q_norm.weight", "model.layers.0.input_layernorm.weight", "lm_head.weight"):
        assert not is_quantized(kept), kept
    assert is_quantized("lm_head.weight", quantize_lm_head=True)
    assert len(names) == 3 * 4 + 3 + 2 * 8 * 3  # 3 layers' attention, 1 dense MLP, 2 MoE layers x 8 experts x 3


def test_a_group_size_need_not_divide_in_features():
    """tiny's hidden 64 under groups of 128 (one partial group per row) or 32; only the power-of-two rule is
    refused, when the config is made."""
    spec = preset("tiny")  # hidden 64: in_features 64 for q/k/v/gate/up
    for group in (128, 32, 256):
        check_quantizable(spec, QuantConfig("int4", group))
    with pytest.raises(InputError, match="--group-size 96 must be a power of two"):
        QuantConfig("int4", 96)


def _rtn_int4_reference(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group, over the real columns only: scale = absmax / 7 (fp32), codes round(w / scale) + 8 in 0..15;
    codes [..., N, K] and scales [..., N, ceil(K / group)], written column range by column range."""
    k = w.shape[-1]
    codes, scales = torch.empty(w.shape, dtype=torch.uint8), []
    for start in range(0, k, group):
        part = w[..., start:start + group]  # the last one is short when group does not divide K
        scale = part.abs().amax(-1, keepdim=True) / 7
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        codes[..., start:start + group] = (torch.round(part / safe).clamp(-7, 7) + 8).to(torch.uint8)
        scales.append(scale)
    return codes, torch.cat(scales, -1)


def _unpacked(qw) -> torch.Tensor:
    """Every stored code [..., N, G * group] read nibble by nibble: byte k // 2, low nibble for even k."""
    byte = qw.qweight.repeat_interleave(2, -1).int()
    shift = torch.tensor([0, 4]).repeat(qw.qweight.shape[-1])
    return ((byte >> shift) & 0xF).to(torch.uint8)


@pytest.mark.parametrize("lead", [(), (3,)], ids=["linear", "experts"])
@pytest.mark.parametrize("k,group", PARTIAL)
def test_int4_partial_last_group(k, group, lead):
    """The last group covers K % group columns: its scale comes from those alone, its codes are padded to a
    whole group with the zero point 8 (MatMulNBits' padded last block), scales are [..., N, ceil(K / group)] and
    dequantize returns exactly [..., N, K]."""
    w = _w(*lead, 5, k, seed=k)
    w[..., 0, -1] = 0.5  # an outlier in the last (partial) group of row 0: its scale must follow it
    qw = quantize_weight(w, "int4", group, scale_dtype=torch.float32)
    groups = -(-k // group)
    assert qw.in_features == k and qw.shape == (*lead, 5, k) and qw.group_size == group and qw.n_groups == groups
    assert qw.qweight.shape == (*lead, 5, groups * group // 2) and qw.scales.shape == (*lead, 5, groups)
    codes, scales = _rtn_int4_reference(w, group)
    torch.testing.assert_close(qw.scales, scales, rtol=0, atol=0)
    stored = _unpacked(qw)
    assert torch.equal(stored[..., :k], codes) and torch.equal(qw.codes(), codes)
    assert (stored[..., k:] == 8).all() and torch.equal(qw.codes(padded=True), stored)
    want = (codes.float() - 8) * scales.repeat_interleave(group, -1)[..., :k]
    torch.testing.assert_close(dequantize(qw), want, rtol=0, atol=0)
    assert (dequantize(qw) - w).abs().max() <= scales.max() / 2 + 1e-7
    torch.testing.assert_close(dequantize(qw)[..., 0, -1], w[..., 0, -1], rtol=1e-6, atol=0)  # its group's absmax


@pytest.mark.parametrize("mode", ["int4", "int8"])
@pytest.mark.parametrize("k,group", PARTIAL)
def test_dequantize_partial_groups_with_zero_points(k, group, mode):
    """Asymmetric weights (AWQ / GPTQ zero points) with a partial last group, int4 and grouped int8: dequantize
    against W[n, k] = (code - zero[n, k // g]) * scale[n, k // g], element by element."""
    qw = partial_weight((), 4, k, mode, group, zero_points=True, seed=k)
    codes = _unpacked(qw) if mode == "int4" else qw.qweight
    want = torch.empty(4, k)
    for n in range(4):
        for col in range(k):
            want[n, col] = (int(codes[n, col]) - int(qw.zero_points[n, col // group])) * qw.scales[n, col // group]
    torch.testing.assert_close(dequantize(qw), want, rtol=0, atol=0)


def test_partial_group_validation_and_joins():
    """A weight stores whole groups; in_features says where K ends inside the last one, and must end there."""
    qw = quantize_weight(_w(6, 72), "int4", 32)
    assert qw.qweight.shape == (6, 48) and qw.nbytes() == 6 * 48 + 6 * 3 * 2  # padded codes + fp16 scales
    for bad in (64, 97, 40):  # inside the second group, past the stored width, a whole group short
        with pytest.raises(WeightsError, match="inconsistent int4"):
            QuantizedWeight("int4", qw.qweight, qw.scales, None, 32, bad)
    # without in_features a weight is its stored width (every group whole), as AWQ / GPTQ checkpoints are
    assert QuantizedWeight("int4", qw.qweight, qw.scales, None, 32).in_features == 96
    joined = stack([cat_rows([qw, quantize_weight(_w(2, 72, seed=1), "int4", 32)])] * 2)
    assert joined.shape == (2, 8, 72) and joined.in_features == 72
    torch.testing.assert_close(dequantize(joined)[1, :6], dequantize(qw))
    with pytest.raises(WeightsError, match="in_features"):
        cat_rows([qw, quantize_weight(_w(2, 80), "int4", 32)])


def test_cat_rows_and_stack_match_dequantized_concat():
    parts = [quantize_weight(_w(16, 64, seed=s), "int4", 32) for s in range(3)]
    joined = cat_rows(parts[:2])
    torch.testing.assert_close(dequantize(joined), torch.cat([dequantize(p) for p in parts[:2]]))
    stacked = stack([joined, cat_rows([parts[2], parts[0]])])
    assert stacked.shape == (2, 32, 64) and stacked.zero_points is None
    torch.testing.assert_close(dequantize(stacked)[1, :16], dequantize(parts[2]))
    with pytest.raises(WeightsError, match="different modes"):
        stack([parts[0], quantize_weight(_w(16, 64), "int8")])


@pytest.mark.parametrize("mode", ["int4", "int8"])
def test_quantized_source_with_hidden_off_the_group(mode):
    """hidden 72 under int4 groups of 32: q/k/v/gate/up have a partial last group; the eager decoder loads
    exactly dequantize's [N, 72] weights."""
    spec = preset("tiny-moe").replace(hidden_size=72, moe_intermediate_size=40)
    source = QuantizedSource(RandomSource(spec), spec, QuantConfig(mode, group_size=32))
    check_names(spec, source)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.1.mlp.experts.2.down_proj.weight"):
        qw = source.quantized(name)
        assert qw.shape == tuple(RandomSource(spec).shape(name))
        torch.testing.assert_close(source.get(name), dequantize(qw))
    module = Qwen3Decoder.empty(spec, torch.float32)
    load_into(module, spec, source, torch.float32)


@pytest.mark.parametrize("mode", ["int8", "int4", "fp8"])
def test_quantized_source_loads_dequantized_weights(mode):
    spec = preset("tiny-moe")
    source = QuantizedSource(RandomSource(spec), spec, QuantConfig(mode, group_size=32))
    check_names(spec, source)
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    assert source.is_quantized(name) and not source.is_quantized("model.layers.1.mlp.gate.weight")
    torch.testing.assert_close(source.get(name), dequantize(source.quantized(name)))
    assert torch.equal(source.get("model.norm.weight"), RandomSource(spec).get("model.norm.weight"))
    module = Qwen3Decoder.empty(spec, torch.float32)
    load_into(module, spec, source, torch.float32)
    up = module.model.layers[1].mlp.experts.gate_up_proj[3, spec.moe_intermediate_size:]
    torch.testing.assert_close(up, source.get(name))


def _matmul_nbits_session(qw: QuantizedWeight, level: int):
    """One ONNX Runtime MatMulNBits node (backends/onnx_quant.py matmul_nbits) at accuracy `level`, CPU, 1 thread."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from qwen3export.backends.onnx_quant import matmul_nbits

    nodes, inits = matmul_nbits("x", "y", qw, "w", accuracy_level=level)
    n, k = qw.shape
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(
        "com.microsoft", 1)], ir_version=10)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("k,group,m", [(256, 32, 1), (256, 128, 5), (200, 32, 3), (96, 128, 4)])
def test_int8_activation_emulation_is_what_matmul_nbits_level_4_computes(k, group, m):
    """quant_format.quantize_activation_int8_blocks against ONNX Runtime's MatMulNBits at accuracy level 4 (MLAS
    CompInt8) on activations with an outlier channel (Qwen3's massive activations): the emulated product matches
    the op to fp32 summation order, while fp32 activations (what level 0 computes) are two orders further off.
    A partial last block (200 = 6 x 32 + 8; 96 < 128) is quantized over its real columns only."""
    from qwen3export.quant_format import nbits_block, quantize_activation_int8_blocks

    g = torch.Generator().manual_seed(k + m)
    qw = quantize_weight(torch.randn(48, k, generator=g) / k ** 0.5, "int4", group, torch.float32)
    x = torch.randn(m, k, generator=g)
    x[:, 3] *= 40.0  # one massive channel: its block's other codes get coarse
    w = dequantize(qw)
    block = nbits_block(group, k, qw.n_groups)
    got = torch.from_numpy(_matmul_nbits_session(qw, 4).run(None, {"x": x.numpy()})[0])
    emulated = quantize_activation_int8_blocks(x, block) @ w.t()
    fp32 = x @ w.t()
    scale = fp32.abs().max()
    assert (got - emulated).abs().max() / scale < 2e-6
    assert (got - fp32).abs().max() / scale > 100 * (got - emulated).abs().max() / scale
    level0 = torch.from_numpy(_matmul_nbits_session(qw, 0).run(None, {"x": x.numpy()})[0])
    assert (level0 - fp32).abs().max() / scale < 2e-6


def test_int8_activation_codes():
    """Per block: scale amax / 127, codes round half to even of x * 127 / amax, an all-zero block stays zero."""
    from qwen3export.quant_format import quantize_activation_int8_blocks

    x = torch.tensor([[127.0, 0.5, 1.5, -2.5, 0.0, 0.0, 0.0, 0.0] * 2 + [0.0] * 16])  # 3 blocks of 16 (one zero)
    y = quantize_activation_int8_blocks(x, 16)
    assert torch.equal(y[0, :4], torch.tensor([127.0, 0.0, 2.0, -2.0]))  # 0.5 -> 0, 1.5 -> 2, -2.5 -> -2
    assert torch.equal(y[0, 16:], torch.zeros(16))
    q = quantize_activation_int8_blocks(torch.tensor([[1.0, 0.3]]), 16)  # one partial block: amax over 2 columns
    assert torch.allclose(q, torch.tensor([[1.0, round(0.3 * 127) / 127]]))
