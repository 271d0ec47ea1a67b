"""fuse_projections: q/k/v and gate/up -> one linear over concatenated weights + a split, in fp and quantized
programs; the fused program against eager, the fused quantized weight against quantizing the concatenation."""

from __future__ import annotations

import pytest
import torch
from lowering_checks import PROMPTS, assert_same_function, op_counts

import qwen3export
from qwen3export.generation import greedy_generate, left_pad
from qwen3export.graph_capture import capture
from qwen3export.graphs.passes import DEFAULT_PASSES, fuse_projections, run_passes
from qwen3export.graphs.passes.fuse_projections import fused_name
from qwen3export.model import resolve
from qwen3export.parity import logits_errors
from qwen3export.quant import QuantizedSource, build_quantized
from qwen3export.quant_format import QuantConfig, quantize_weight

UNFUSED = DEFAULT_PASSES[:-1]
# 1 KV head, head_dim 24 != hidden 40 / 3 heads, no size a multiple of 32, untied lm_head
ODD = dict(hidden_size=40, num_attention_heads=3, num_key_value_heads=1, head_dim=24, intermediate_size=72,
           tie_word_embeddings=False)


def _lowered_unfused(ep):
    lowered, results = run_passes(ep, UNFUSED)
    return lowered


def _eager(model, steps=6):
    ids, mask = left_pad(PROMPTS)
    return greedy_generate(model, model.empty_cache(2), ids, mask, steps, True), mask


def assert_matches_eager(program, model, atol=1e-5):
    """Greedy tokens identical to the eager module's and logits within `atol` of each row's scale."""
    (want, want_prefill, want_steps), mask = _eager(model)
    ids, _ = left_pad(PROMPTS)
    got, got_prefill, got_steps = greedy_generate(program.module(), model.empty_cache(2), ids, mask, 6, True)
    assert got.tolist() == want.tolist()
    real = mask.bool()
    assert logits_errors(got_prefill[real], want_prefill[real])["scaled"] <= atol
    assert logits_errors(torch.stack(got_steps), torch.stack(want_steps))["scaled"] <= atol


@pytest.mark.parametrize("family,sites", [("tiny", 4), ("tiny-moe", 4), ("mixed", 6)])
def test_qkv_and_gate_up_become_one_linear_each(family, sites, captured):
    """Per layer q/k/v -> 1 linear; per dense layer gate/up -> 1 (tiny-moe: layer 0 dense; mixed: layers 0, 2)."""
    model, ep = captured(family)
    before = _lowered_unfused(ep)
    result = fuse_projections(before)
    layers, dense = model.spec.num_hidden_layers, sites - model.spec.num_hidden_layers
    assert result.sites == sites and not result.notes
    counts_before, counts_after = op_counts(before), op_counts(result.program)
    assert counts_before["aten.linear"] - counts_after["aten.linear"] == 2 * layers + dense
    assert counts_after["aten.split_with_sizes"] == sites
    names = set(result.program.state_dict)
    for i in range(layers):
        assert f"model.layers.{i}.self_attn.qkv_proj.weight" in names
        assert not {f"model.layers.{i}.self_attn.{p}_proj.weight" for p in "qkv"} & names
    assert sum(n.endswith("mlp.gate_up_proj.weight") for n in names) == dense
    # the fused weight is the parts' rows, in order, and the input program keeps its own weights
    w = result.program.state_dict["model.layers.0.self_attn.qkv_proj.weight"]
    parts = [before.state_dict[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv"]
    assert torch.equal(w, torch.cat(parts)) and "model.layers.0.self_attn.q_proj.weight" in before.state_dict
    assert_same_function(before, result.program, model, steps=4)


def test_odd_shapes_match_eager():
    """1 KV head (k/v rows 24 each beside q's 72), sizes off 32, untied lm_head: the whole lowering, fused, is
    the eager model; the lm_head (its own weight) and o_proj / down_proj stay single linears."""
    torch.manual_seed(0)
    model = qwen3export.load_model("tiny", seed=5, **ODD)
    lowered, results = run_passes(capture(model))
    assert results[-1].name == "projections" and results[-1].sites == 4
    split = [n for n in lowered.graph.nodes if n.target is torch.ops.aten.split_with_sizes.default]
    assert sorted(tuple(n.args[1]) for n in split) == [(72, 24, 24)] * 2 + [(72, 72)] * 2
    assert op_counts(lowered)["aten.linear"] == 2 * 4 + 1  # per layer qkv, o_proj, gate_up, down_proj; lm_head
    assert "lm_head.weight" in lowered.state_dict and "model.embed_tokens.weight" in lowered.state_dict
    assert_matches_eager(lowered, model)


class Mixed(torch.nn.Module):
    """Linears over one input that are not one projection group: a bias on one of two, or a weight read by
    something else too."""

    def __init__(self, shared: bool):
        super().__init__()
        self.shared = shared
        self.a, self.b = torch.nn.Linear(8, 5, bias=False), torch.nn.Linear(8, 3, bias=not shared)

    def forward(self, x):
        y = self.a(x)[..., :3] + self.b(x)
        return y * self.b.weight.sum() if self.shared else y


@pytest.mark.parametrize("shared,why", [(False, "bias is given to some and not others"),
                                        (True, "is read by other nodes too")])
def test_leaves_alone_what_it_cannot_fuse(shared, why):
    module = Mixed(shared).eval()
    x = torch.randn(2, 8)
    result = fuse_projections(torch.export.export(module, (x,)))
    assert result.sites == 0 and op_counts(result.program)["aten.linear"] == 2
    assert any(why in n for n in result.notes), result.notes
    torch.testing.assert_close(result.program.module()(x), module(x), atol=0, rtol=0)


def test_fused_name():
    assert fused_name(["m.l.0.self_attn.q_proj.weight", "m.l.0.self_attn.k_proj.weight",
                       "m.l.0.self_attn.v_proj.weight"]) == "m.l.0.self_attn.qkv_proj.weight"
    assert fused_name(["m.mlp.gate_proj.qweight", "m.mlp.up_proj.qweight"]) == "m.mlp.gate_up_proj.qweight"
    assert fused_name(["m.a.weight", "n.b.weight"]) is None


@pytest.mark.parametrize("mode,group", [("int4", 32), ("int4", 16), ("int8", 0)])
def test_quantized_projections_fuse_with_the_codes_of_the_concatenation(mode, group):
    """wq_linear q/k/v and gate/up fuse; the fused codes and scales are exactly quantize_weight of the
    concatenated fp matrix (RTN groups are per output row x input group), so the engine's parity is unchanged.
    Odd shapes: K = 40 leaves int4's last group partial (g32: 32 + 8)."""
    spec, source, _ = resolve("tiny", seed=2, **ODD)
    config = QuantConfig(mode, group) if mode == "int4" else QuantConfig(mode)
    qsource = QuantizedSource(source, spec, config)
    qmodel = build_quantized(spec, qsource, config)
    ep = _lowered_unfused(capture(qmodel))
    result = fuse_projections(ep)
    assert result.sites == 4 and not result.notes
    assert op_counts(ep)["qwen3export.wq_linear"] - op_counts(result.program)["qwen3export.wq_linear"] == 6
    sd = result.program.state_dict
    for prefix, parts in (("model.layers.1.self_attn.", "qkv"), ("model.layers.1.mlp.", ("gate", "up"))):
        fused = "qkv" if parts == "qkv" else "gate_up"
        fp = torch.cat([source.get(f"{prefix}{p}_proj.weight").float() for p in parts])
        want = quantize_weight(fp, mode, group if mode == "int4" else 128, config.scale_dtype)
        assert torch.equal(sd[f"{prefix}{fused}_proj.qweight"], want.qweight)
        assert torch.equal(sd[f"{prefix}{fused}_proj.scales"], want.scales.to(sd[f"{prefix}{fused}_proj.scales"].dtype))
        assert sd.get(f"{prefix}{fused}_proj.zero_points") is None
    # the fused program is the quantized eager decoder
    assert_same_function(ep, result.program, qmodel, steps=4)


def test_weights_on_the_meta_device_stay_unfused_with_one_note():
    """A streamed build captures on the meta device and loads each weight by its own name while writing the
    engine: a concatenation would have no loader, so the pass leaves the program as it is and says so."""
    with torch.device("meta"):
        module = Mixed(shared=False)
        module.b = torch.nn.Linear(8, 3, bias=False)
    result = fuse_projections(torch.export.export(module, (torch.empty(2, 8, device="meta"),)))
    assert result.sites == 0 and op_counts(result.program)["aten.linear"] == 2
    assert len(result.notes) == 1 and "meta device" in result.notes[0]
