"""lower(): every pass in order over whole captured decoders of each preset family — sites per pass, what
is left in plain ops, and the lowered program against the unlowered one through the KV cache."""

from __future__ import annotations

import warnings

import pytest
from lowering_checks import assert_same_function, custom_op_counts, op_counts, rank5_softmaxes

import qwen3export
from qwen3export.graph_capture import capture
from qwen3export.graphs.passes import DEFAULT_PASSES, PATTERNS, lower, run_passes

# sites per pass: q/k norm+RoPE and attention once per layer; MoE per sparse layer; every hidden norm
# (2 per layer + final) becomes rms_norm, then all but the first layer's input norm take their residual add;
# projections: q/k/v per layer and gate/up per dense layer
EXPECTED = {
    "tiny": {"qk_norm_rope": 2, "attention": 2, "moe": 0, "rms_norm": 5, "add_rms_norm": 4, "projections": 4},
    "tiny-moe": {"qk_norm_rope": 3, "attention": 3, "moe": 2, "rms_norm": 7, "add_rms_norm": 6,
                 "projections": 4},  # layer 0 dense
    "mixed": {"qk_norm_rope": 4, "attention": 4, "moe": 2, "rms_norm": 9, "add_rms_norm": 8,
              "projections": 6},  # layers 1, 3 MoE
}


@pytest.mark.parametrize("family", list(EXPECTED))
def test_lower_replaces_every_site_and_keeps_the_function(family, captured):
    model, ep = captured(family)
    before = len(ep.graph.nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a known graph lowers completely: no UnloweredSiteWarning
        lowered, report = lower(ep)
    want = EXPECTED[family]
    assert report == want
    assert custom_op_counts(lowered) == {k: v for k, v in {
        "qk_norm_rope": want["qk_norm_rope"], "attention": want["attention"], "moe": want["moe"],
        "rms_norm": want["rms_norm"] - want["add_rms_norm"], "add_rms_norm": want["add_rms_norm"]}.items() if v}
    left = op_counts(lowered)
    assert left["aten.rsqrt"] == left["aten.topk"] == left["aten.neg"] == rank5_softmaxes(lowered) == 0
    assert len(ep.graph.nodes) == before and not custom_op_counts(ep)  # the input program is untouched
    assert_same_function(ep, lowered, model, steps=16)


def test_lowering_twice_changes_nothing(captured):
    _, ep = captured("tiny-moe")
    once, _ = lower(ep)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        twice, report = lower(once)
    assert set(report.values()) == {0}
    assert custom_op_counts(twice) == custom_op_counts(once)


def test_run_passes_returns_each_pass_result_in_order(captured):
    _, ep = captured("tiny")
    lines = []
    lowered, results = run_passes(ep, progress=lines.append)
    assert [r.name for r in results] == ["qk_norm_rope", "attention", "moe", "rms_norm", "add_rms_norm", "projections"]
    assert list(PATTERNS) == [r.name for r in results]  # the registry names each pass's patterns
    assert len(results) == len(DEFAULT_PASSES) and results[-1].program is lowered
    assert lines[1] == "lower: attention: 2 site(s)"


@pytest.mark.slow
def test_qwen3_30b_a3b_two_layers_lower_completely():
    """Real 30B-A3B layer shapes (128 experts, top-8, 32/4 heads, head_dim 128), 2 layers, random weights:
    ~7 GB in fp32 and a few minutes on 2 cores."""
    model = qwen3export.load_model("qwen3-30b-a3b", num_hidden_layers=2)
    lowered, report = lower(capture(model))
    assert report == {"qk_norm_rope": 2, "attention": 2, "moe": 2, "rms_norm": 5, "add_rms_norm": 4, "projections": 2}
    assert custom_op_counts(lowered) == {"qk_norm_rope": 2, "attention": 2, "moe": 2, "rms_norm": 1,
                                         "add_rms_norm": 4}
