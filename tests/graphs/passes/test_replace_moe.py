"""replace_moe: each SparseMoeBlock (router softmax, top-k, experts) -> qwen3export::moe; dense MLPs and
other routers stay in plain ops."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from lowering_checks import assert_same_function, assert_unchanged, custom_op_counts, op_counts
from torch.export import Dim

from qwen3export.graphs.decoder import SparseMoeBlock
from qwen3export.graphs.passes import UnloweredSiteWarning, replace_moe
from qwen3export.spec import preset

# family, MoE blocks, dense MLP layers (each keeps its one silu)
CASES = [("tiny-moe", 2, 1), ("mixed", 2, 2), ("tiny", 0, 2)]


@pytest.mark.parametrize("family, blocks, dense", CASES)
def test_each_sparse_block_becomes_one_op(family, blocks, dense, captured):
    model, ep = captured(family)
    before = len(ep.graph.nodes)
    assert op_counts(ep)["aten.topk"] == blocks
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = replace_moe(ep)
    assert result.sites == blocks
    assert custom_op_counts(result.program) == ({"moe": blocks} if blocks else {})
    counts = op_counts(result.program)
    assert counts["aten.topk"] == counts["aten.scatter"] == 0 and counts["aten.silu"] == dense
    node = next((n for n in result.program.graph.nodes if n.target is torch.ops.qwen3export.moe.default), None)
    if node is not None:
        assert node.args[4:] == (model.spec.num_experts_per_tok, True)  # top_k, norm_topk_prob (tiny-moe: true)
        assert node.args[2].name.endswith("experts_gate_up_proj")
    assert_unchanged(ep, before)
    if blocks:
        assert_same_function(ep, result.program, model, steps=6)


def _block(cls=SparseMoeBlock, **overrides):
    torch.manual_seed(0)
    block = cls(preset("tiny-moe", **overrides)).eval()
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ep = torch.export.export(block, (torch.randn(2, 3, 64),),
                             dynamic_shapes=({0: Dim("b", max=64), 1: Dim("s", max=64)},))
    return block, ep


def test_block_without_renormalisation_lowers_with_norm_topk_prob_false():
    block, ep = _block(norm_topk_prob=False)
    result = replace_moe(ep)
    assert result.sites == 1
    node = next(n for n in result.program.graph.nodes if n.target is torch.ops.qwen3export.moe.default)
    assert node.args[4:] == (2, False)
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert (result.program.module()(x) - block(x)).abs().max().item() <= 1e-5


class SigmoidRouterBlock(SparseMoeBlock):
    """Sigmoid scores instead of a softmax (DeepSeek-V3's router): not this op's routing."""

    def forward(self, x):
        b, s, h = x.shape
        t = x.reshape(b * s, h)
        top_w, top_i = torch.topk(torch.sigmoid(F.linear(t, self.gate.weight)), self.top_k, dim=-1)
        dense_w = torch.zeros(t.shape[0], self.num_experts, dtype=t.dtype).scatter(1, top_i, top_w)
        e, i = self.num_experts, self.inter
        gu = F.linear(t, self.experts.gate_up_proj.reshape(e * 2 * i, h)).view(-1, e, 2 * i)
        y = torch.matmul((F.silu(gu[..., :i]) * gu[..., i:]).transpose(0, 1), self.experts.down_proj.transpose(1, 2))
        return (y * dense_w.t()[..., None]).sum(0).view(b, s, h)


def test_other_routers_stay_unlowered_with_a_warning():
    block, ep = _block(SigmoidRouterBlock)
    with pytest.warns(UnloweredSiteWarning, match="1 MoE routing site"):
        result = replace_moe(ep)
    assert result.sites == 0 and op_counts(result.program)["aten.topk"] == 1
    x = torch.randn(3, 5, 64)
    with torch.no_grad():
        assert torch.equal(result.program.module()(x), block(x))
