"""qwen3export/quant_parity.py: parity two ways on tiny-moe: (a) an engine (the captured quantized decoder)
against eager PyTorch on the dequantized weights, gated; (b) quantized against unquantized, reported: figures
in sensible ranges, int4 worse than int8."""

from __future__ import annotations

import functools

import pytest
import torch

from qwen3export.graph_capture import capture
from qwen3export.graphs.quantized import QuantizedLinear
from qwen3export.quant import build_quantized
from qwen3export.model import build_module, resolve
from qwen3export.quant_format import QuantConfig
from qwen3export.quant import QuantizedSource
from qwen3export.describe import quant_summary_line
from qwen3export.quant_parity import compare_to_unquantized, dequantized_reference, quant_parity

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


# Bounds that a correct RTN quantization of tiny-moe (seed 2, trained statistics) passes, from its measured
# figures with a margin (measured: int8 KL mean 0.022, top-1 0.93, hidden error <= 0.011, router overlap >= 0.97;
# int4 g32 KL mean 1.03, top-1 0.52, hidden error <= 0.17, router overlap >= 0.82). Synthetic logits have small
# top-1/top-2 gaps (the top of 151,936 random draws), so int4 flips top-1 far more often than on a real
# checkpoint; the point of the bounds is that wrong weights fail them (test_negative_control_fails_every_bound:
# KL 13.8, top-1 0.01, hidden error 1.0, router overlap 0.26).
BOUNDS = {
    "int8": {"kl_mean": 0.1, "top1": 0.85, "hidden": 0.05, "router": 0.95},
    "int4": {"kl_mean": 3.0, "top1": 0.35, "hidden": 0.5, "router": 0.6},
}


def violated(r: dict, b: dict) -> list[str]:
    """Which of the bounds `b` the report `r` fails."""
    out = []
    if not r["logits_kl"]["mean"] < b["kl_mean"]:
        out.append("kl_mean")
    if not r["top1_agreement"] > b["top1"]:
        out.append("top1")
    if not all(e < b["hidden"] for e in r["hidden_state_rel_error"]):
        out.append("hidden")
    if not all(a["overlap"] > b["router"] for a in r["router_topk_agreement"].values()):
        out.append("router")
    return out


def test_int8_is_close_to_the_unquantized_model():
    r = quality("int8")
    assert not r["gated"] and r["positions"] == 25 + 2 * 32  # prompts 16 + 9, 32 teacher-forced tokens each
    assert 0 < r["logits_kl"]["mean"] <= r["logits_kl"]["max"]
    assert violated(r, BOUNDS["int8"]) == []
    assert set(r["router_topk_agreement"]) == {"1", "2"}  # the MoE layers of tiny-moe


def test_int4_costs_more_than_int8():
    r4, r8 = quality("int4"), quality("int8")
    assert violated(r4, BOUNDS["int4"]) == []
    assert r8["logits_kl"]["mean"] < r4["logits_kl"]["mean"]
    assert r4["top1_agreement"] < r8["top1_agreement"]
    assert all(e4 > e8 for e4, e8 in zip(r4["hidden_state_rel_error"], r8["hidden_state_rel_error"]))
    assert all(a4["overlap"] <= a8["overlap"] for a4, a8 in zip(r4["router_topk_agreement"].values(),
                                                             r8["router_topk_agreement"].values()))


class _Noise:
    """tiny-moe with every MLP, expert and router weight replaced by fresh noise of the same std: a model
    that is wrong where quantization errs (a bad dequantization, a swapped layout), not quantized at all."""

    def __init__(self, source):
        self.source, self.description = source, "noise"

    def names(self):
        return self.source.names()

    def shape(self, name):
        return self.source.shape(name)

    def get(self, name):
        t = self.source.get(name)
        if ".mlp." not in name:
            return t
        g = torch.Generator().manual_seed(len(name) * 7919 + sum(map(ord, name)))
        return torch.randn(t.shape, generator=g) * t.std()


def test_negative_control_fails_every_bound():
    """Wrong weights must fail each bound that int8 and int4 pass: the metrics can see damage."""
    spec, source, model = unquantized()
    r = compare_to_unquantized(build_module(spec, _Noise(source), torch.float32), model)
    assert violated(r, BOUNDS["int4"]) == ["kl_mean", "top1", "hidden", "router"], r
    assert violated(r, BOUNDS["int8"]) == ["kl_mean", "top1", "hidden", "router"], r


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
    assert quant_summary_line(report).startswith("quantized vs unquantized (not gated): KL mean")


def test_fp8_reference_quantizes_activations_too():
    spec, source, _ = resolve("tiny", seed=2)
    reference = dequantized_reference(spec, QuantizedSource(source, spec, QuantConfig("fp8")))
    assert isinstance(reference.model.layers[0].self_attn.q_proj, QuantizedLinear)
