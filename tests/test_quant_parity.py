"""qwen3export/quant_parity.py: parity two ways on tiny-moe: (a) an engine (the captured quantized decoder)
against eager PyTorch on the dequantized weights, gated; (b) quantized against unquantized, reported: figures
in sensible ranges, int4 worse than int8."""

from __future__ import annotations

import functools

import pytest
import torch

from qwen3export.capture import capture
from qwen3export.graphs.quantized import QuantizedLinear, build_quantized
from qwen3export.model import build_module, resolve
from qwen3export.quant import QuantConfig, QuantizedSource
from qwen3export.quant_parity import compare_to_unquantized, dequantized_reference, quant_parity, summary_line

CONFIGS = {"int4": QuantConfig("int4", 32), "int8": QuantConfig("int8")}


pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def unquantized():
    spec, source, _ = resolve("tiny-moe", seed=2)
    return spec, source, build_module(spec, source, torch.float32)


@functools.cache
def quality(mode: str) -> dict:
    spec, source, model = unquantized()
    reference = dequantized_reference(spec, QuantizedSource(source, spec, CONFIGS[mode]))
    return compare_to_unquantized(reference, model)


def test_a_model_against_itself_is_perfect():
    _, _, model = unquantized()
    r = compare_to_unquantized(model, model, new_tokens=4)
    assert r["logits_kl"]["max"] == 0 and r["top1_agreement"] == 1
    assert r["greedy_match_length"]["per_prompt"] == [4, 4]
    assert r["hidden_state_rel_error"] == [0.0] * 3
    assert r["router_topk_agreement"] == {"1": {"overlap": 1.0, "same_set": 1.0}, "2": {"overlap": 1.0, "same_set": 1.0}}


def test_int8_is_close_to_the_unquantized_model():
    r = quality("int8")
    assert not r["gated"] and r["positions"] == 25 + 2 * 32  # prompts 16 + 9, 32 teacher-forced tokens each
    assert 0 <= r["logits_kl"]["mean"] <= r["logits_kl"]["max"] < 1e-4
    assert r["top1_agreement"] >= 0.9
    assert all(e < 0.05 for e in r["hidden_state_rel_error"])
    assert all(a["overlap"] >= 0.95 for a in r["router_topk_agreement"].values())
    assert set(r["router_topk_agreement"]) == {"1", "2"}  # the MoE layers of tiny-moe


def test_int4_costs_more_than_int8():
    r4, r8 = quality("int4"), quality("int8")
    assert r8["logits_kl"]["mean"] < r4["logits_kl"]["mean"] < 1e-2
    assert r4["top1_agreement"] <= r8["top1_agreement"]
    assert r4["greedy_match_length"]["mean"] <= r8["greedy_match_length"]["mean"]
    assert all(e4 > e8 for e4, e8 in zip(r4["hidden_state_rel_error"], r8["hidden_state_rel_error"]))
    assert all(e < 0.5 for e in r4["hidden_state_rel_error"])
    assert min(a["overlap"] for a in r4["router_topk_agreement"].values()) >= 0.6
    # per-layer error grows with depth: each layer adds its own weights' error to what it reads
    assert r4["hidden_state_rel_error"] == sorted(r4["hidden_state_rel_error"])


def test_quant_parity_gates_the_engine_and_reports_the_quantization():
    spec, source, _ = unquantized()
    config = CONFIGS["int4"]
    engine_model = build_quantized(spec, source, config)
    engine = capture(engine_model).module()
    report = quant_parity(engine, engine_model.empty_cache(2), spec, source, config, new_tokens=8)
    assert report["engine"]["passed"], report["engine"]["failures"]
    assert report["engine"]["logits_scaled_err"] <= 1e-4 and report["engine"]["greedy_match"]
    assert "dequantized" in report["engine"]["reference"]
    assert report["quantization"]["quantization"] == {"mode": "int4", "group_size": 32, "quantize_lm_head": False}
    assert not report["quantization"]["gated"]
    assert summary_line(report).startswith("quantized vs unquantized (not gated): KL mean")


def test_fp8_reference_quantizes_activations_too():
    spec, source, _ = resolve("tiny", seed=2)
    reference = dequantized_reference(spec, QuantizedSource(source, spec, QuantConfig("fp8")))
    assert isinstance(reference.model.layers[0].self_attn.q_proj, QuantizedLinear)
