"""torch.export capture: one whole graph, dynamic batch/sequence/cache, no data-dependent ops, at real shape."""

from __future__ import annotations

import operator

import pytest
import torch

import qwen3export
from qwen3export.graph_capture import capture

DATA_DEPENDENT = {"nonzero", "_local_scalar_dense", "item", "masked_select", "unique", "where.default_1"}


def _graph_ops(ep):
    return [n.target for n in ep.graph.nodes if n.op == "call_function"]


def _assert_whole_aten_graph(ep):
    for t in _graph_ops(ep):
        if t in (operator.getitem, operator.mul, operator.add, operator.sub):
            continue  # symbolic-size arithmetic and tuple outputs
        assert isinstance(t, torch._ops.OpOverload) and t.namespace == "aten", f"unexpected op {t}"
        assert t._opname not in DATA_DEPENDENT, f"data-dependent op {t}"


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_capture_is_one_aten_graph_with_dynamic_dims(name):
    model = qwen3export.load_model(name)
    ep = capture(model)
    _assert_whole_aten_graph(ep)
    if model.spec.is_moe:
        assert sum(1 for t in _graph_ops(ep) if "topk" in str(t)) == len(model.spec.moe_layers)
    ph = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in ("input_ids", "attention_mask")]
    for node in ph:
        assert all(not isinstance(d, int) for d in node.meta["val"].shape), "batch/sequence must be symbolic"
    prog = ep.module()
    for b, s, p in ((1, 1, 0), (3, 5, 0), (1, 1, 7), (2, 4, 3)):  # prefill, decode, chunked prefill
        g = torch.Generator().manual_seed(b * 100 + s * 10 + p)
        ids = torch.randint(0, model.spec.vocab_size, (b, s), generator=g)
        pos = torch.arange(p, p + s).expand(b, s)
        mask = torch.ones(b, p + s, dtype=torch.int64)
        kv = model.spec.num_key_value_heads, model.spec.head_dim
        past = tuple((torch.randn(b, kv[0], p, kv[1], generator=g), torch.randn(b, kv[0], p, kv[1], generator=g))
                     for _ in range(model.spec.num_hidden_layers))
        with torch.no_grad():
            want, want_cache = model(ids, pos, mask, past)
            got, got_cache = prog(ids, pos, mask, past)
        assert got.shape == (b, s, model.spec.vocab_size)
        assert (got - want).abs().max().item() <= 1e-5
        assert got_cache[-1][1].shape == (b, kv[0], p + s, kv[1])


@pytest.mark.slow
def test_capture_qwen3_0_6b_real_shape():
    """The real Qwen3-0.6B shape (28 layers, head_dim 128 != 1024/16) with random weights: ~1 min, 3 GB."""
    model = qwen3export.load_model("qwen3-0.6b")
    ep = capture(model)
    _assert_whole_aten_graph(ep)
    q_proj = ep.state_dict["model.layers.0.self_attn.q_proj.weight"]
    assert q_proj.shape == (16 * 128, 1024)
    ids = torch.tensor([[151644, 872, 198, 151667]])
    pos = torch.arange(4)[None]
    mask = torch.ones_like(ids)
    with torch.no_grad():
        want = model(ids, pos, mask, model.empty_cache(1))[0]
        got = ep.module()(ids, pos, mask, model.empty_cache(1))[0]
    assert (got - want).abs().max().item() <= 1e-5
