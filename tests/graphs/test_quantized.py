"""graphs/quantized.py: the quantized decoder (wq_linear / wq_moe / fp8_linear modules) against the plain decoder
running the same dequantized weights, its captured ExportedProgram (dynamic dims, lowered) against eager."""

from __future__ import annotations

import functools

import pytest
import torch

from qwen3export.graph_capture import capture, decoder_example_inputs
from qwen3export.errors import InputError
from qwen3export.generation import greedy_generate, left_pad
from qwen3export.graphs.passes import lower
from qwen3export.graphs.quantized import QuantizedLinear, quantized_tensors
from qwen3export.quant import build_quantized
from qwen3export.model import build_module, resolve
from qwen3export.quant_format import QuantConfig
from qwen3export.quant import QuantizedSource, quantized_names

from ort_step import PROMPTS

CONFIGS = {"int4": QuantConfig("int4", 32), "int8": QuantConfig("int8")}  # tiny's hidden 64: groups of 32


pytestmark = pytest.mark.usefixtures("one_thread")


# hidden 72 = 2 x 32 + 8 and experts' 40 = 32 + 8: q/k/v/gate/up and the experts have a partial last group under
# int4 g32; under g128 every weight but o_proj / down (128 = 4 heads x 32, the intermediate size) is one partial group
PARTIAL = {"tiny": dict(hidden_size=72), "tiny-moe": dict(hidden_size=72, moe_intermediate_size=40)}
PARTIAL_CONFIGS = {"int4": QuantConfig("int4", 32), "int4-g128": QuantConfig("int4", 128), "int8": QuantConfig("int8")}


@functools.cache
def models(name: str, mode: str, partial: bool = False):
    """(quantized decoder, plain decoder loaded with the same dequantized weights)."""
    spec, source, _ = resolve(name, seed=2, **(PARTIAL[name] if partial else {}))
    config = (PARTIAL_CONFIGS if partial else CONFIGS)[mode]
    qsource = QuantizedSource(source, spec, config)
    return build_quantized(spec, qsource, config), build_module(spec, qsource, torch.float32)


def _generate(step, model, new_tokens=6):
    ids, mask = left_pad(PROMPTS)
    return greedy_generate(step, model.empty_cache(2), ids, mask, new_tokens, keep_logits=True)


@pytest.mark.parametrize("mode,partial", [("int4", False), ("int8", False), ("int4", True), ("int4-g128", True),
                                          ("int8", True)])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_quantized_decoder_is_the_dequantized_decoder(name, mode, partial):
    """Also with hidden sizes off the group (PARTIAL): the buffers hold whole groups, the ops read K from their
    input, and the result is still the plain decoder on dequantize's weights."""
    qmodel, ref = models(name, mode, partial)
    if partial and mode != "int8":
        assert any(qw.padded for qw in quantized_tensors(qmodel).values())
    got_tokens, got_prefill, got_steps = _generate(qmodel, qmodel)
    ref_tokens, ref_prefill, ref_steps = _generate(ref, ref)
    torch.testing.assert_close(got_prefill, ref_prefill, atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.stack(got_steps), torch.stack(ref_steps), atol=1e-5, rtol=0)
    assert torch.equal(got_tokens, ref_tokens)


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_quantized_modules_replace_every_quantized_weight(name):
    qmodel, _ = models(name, "int4")
    spec = qmodel.spec
    tensors = quantized_tensors(qmodel)
    dense = {n.removesuffix(".weight") for n in quantized_names(spec) if ".experts." not in n}
    experts = {f"model.layers.{li}.mlp.experts.{w}" for li in spec.moe_layers for w in ("gate_up_proj", "down_proj")}
    assert set(tensors) == dense | experts
    assert all(qw.mode == "int4" and qw.group_size == 32 for qw in tensors.values())
    names = {n for n, _ in qmodel.named_parameters()}
    assert not any(n.endswith(("_proj.weight", "gate_up_proj", "down_proj")) for n in names)  # no fp copy left
    buffers = dict(qmodel.named_buffers())
    assert buffers["model.layers.0.self_attn.q_proj.qweight"].shape == (spec.num_attention_heads * spec.head_dim,
                                                                       spec.hidden_size // 2)
    assert buffers["model.layers.0.self_attn.q_proj.scales"].dtype == torch.float32  # the model's dtype
    assert qmodel.quantization["quantized_bytes"] == sum(qw.nbytes() for qw in tensors.values())
    assert isinstance(qmodel.lm_head, torch.nn.Linear)  # not quantized unless asked (and tiny ties it)


def test_partial_group_buffers():
    """A partial last group: qweight holds whole groups (72 -> 96 codes, 48 bytes a row), scales ceil(72/32) = 3
    groups, and the module gives back the QuantizedWeight with K = 72."""
    qmodel, _ = models("tiny-moe", "int4", True)
    q_proj = qmodel.model.layers[0].self_attn.q_proj
    assert q_proj.qweight.shape == (128, 48) and q_proj.scales.shape == (128, 3)
    assert q_proj.quantized_weight().shape == (128, 72) and "shape=[128, 72]" in repr(q_proj)
    experts = qmodel.model.layers[1].mlp.experts
    assert experts.down_proj.quantized_weight().shape == (8, 72, 40) and experts.down_proj.qweight.shape == (8, 72, 32)


def test_lm_head_is_quantized_when_asked():
    spec, source, _ = resolve("tiny", seed=2, tie_word_embeddings=False)
    config = QuantConfig("int8", quantize_lm_head=True)
    qsource = QuantizedSource(source, spec, config)
    qmodel, ref = build_quantized(spec, qsource, config), build_module(spec, qsource, torch.float32)
    assert isinstance(qmodel.lm_head, QuantizedLinear)
    inputs = decoder_example_inputs(ref)
    with torch.no_grad():
        torch.testing.assert_close(qmodel(*inputs)[0], ref(*inputs)[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("partial", [False, True], ids=["whole-groups", "partial-groups"])
@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_captured_quantized_decoder_matches_eager(name, partial):
    """One program for prefill and decode (dynamic batch, sequence and cache); lowering still finds the
    q/k norm + RoPE behind quantized projections, and the MoE stays one wq_moe per layer."""
    qmodel, _ = models(name, "int4", partial)
    ep = capture(qmodel)
    ops = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    spec = qmodel.spec
    assert ops.count("qwen3export.wq_linear.default") == 7 * spec.num_hidden_layers - 3 * len(spec.moe_layers)
    assert ops.count("qwen3export.wq_moe.default") == len(spec.moe_layers)
    lowered, report = lower(ep)
    assert report["qk_norm_rope"] == report["attention"] == spec.num_hidden_layers
    real = left_pad(PROMPTS)[1].bool()  # qwen3export::attention zeroes left-padding rows (kernels/ops.py)
    for program in (ep, lowered):
        got = _generate(program.module(), qmodel)
        want = _generate(qmodel, qmodel)
        torch.testing.assert_close(got[1][real], want[1][real], atol=1e-5, rtol=0)
        torch.testing.assert_close(torch.stack(got[2]), torch.stack(want[2]), atol=1e-5, rtol=0)
        assert torch.equal(got[0], want[0])


def test_fp8_quantizes_weights_and_activations():
    """fp8 runs fp8_linear (activations quantized per token too): close to, not equal to, the dequantized model."""
    spec, source, _ = resolve("tiny", seed=2)
    config = QuantConfig("fp8")
    qsource = QuantizedSource(source, spec, config)
    qmodel, ref = build_quantized(spec, qsource, config), build_module(spec, qsource, torch.float32)
    assert qmodel.model.layers[0].self_attn.q_proj.qweight.dtype == torch.float8_e4m3fn
    inputs = decoder_example_inputs(ref)
    with torch.no_grad():
        got, want = qmodel(*inputs)[0], ref(*inputs)[0]
    # e4m3 keeps 3 mantissa bits (6% steps) per activation: rows land within 10% of their scale (measured 6% on
    # tiny's trained statistics), the top token unchanged
    scaled = (got - want).abs().amax(-1) / want.abs().amax(-1).clamp(min=1)
    assert 0 < scaled.max() < 0.1
    assert torch.equal(got.argmax(-1), want.argmax(-1))


def test_fp8_refuses_moe_models():
    spec, source, _ = resolve("tiny-moe", seed=2)
    with pytest.raises(InputError, match="fp8 covers dense layers only"):
        build_quantized(spec, source, QuantConfig("fp8"))
