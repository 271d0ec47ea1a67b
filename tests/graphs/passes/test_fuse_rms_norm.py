"""fuse_rms_norm: every RMSNorm (hidden and per-head q/k) -> qwen3export::rms_norm; other norms stay."""

from __future__ import annotations

import pytest
import torch
from lowering_checks import assert_same_function, assert_unchanged, custom_op_counts, op_counts
from torch import nn
from torch.export import Dim

from qwen3export.graphs.decoder import RMSNorm
from qwen3export.graphs.passes import UnloweredSiteWarning, fuse_rms_norm


def test_every_rms_norm_becomes_one_op(captured):
    model, ep = captured("tiny-moe")
    before = len(ep.graph.nodes)
    assert op_counts(ep)["aten.rsqrt"] == 13  # per layer: input, post-attention, q_norm, k_norm; + final
    result = fuse_rms_norm(ep)
    assert result.sites == 13 and not result.notes
    assert custom_op_counts(result.program) == {"rms_norm": 13}
    assert op_counts(result.program)["aten.rsqrt"] == 0
    assert_unchanged(ep, before)
    assert_same_function(ep, result.program, model, steps=4)


class TwoNorms(nn.Module):
    """Qwen3's RMSNorm, then the same formula over the sequence dim: only the first is this op."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, 1e-6)
        self.other_weight = nn.Parameter(torch.randn(dim))

    def forward(self, x):
        y = self.norm(x)
        return self.other_weight * (y * torch.rsqrt(y.pow(2).mean(1, keepdim=True) + 1e-6))


def test_other_norm_formulas_stay_unlowered_with_a_warning():
    torch.manual_seed(0)
    module = TwoNorms(16).eval()
    with torch.no_grad():
        module.norm.weight.copy_(torch.randn(16))
    ep = torch.export.export(module, (torch.randn(2, 5, 16),),
                             dynamic_shapes=({0: Dim("b", max=64), 1: Dim("s", max=64)},))
    with pytest.warns(UnloweredSiteWarning, match="1 RMSNorm site"):
        result = fuse_rms_norm(ep)
    assert result.sites == 1 and op_counts(result.program)["aten.rsqrt"] == 1
    assert any("reduces over dims [1]" in n for n in result.notes)
    x = torch.randn(3, 7, 16)  # another batch and length: symbolic sizes
    assert (result.program.module()(x) - module(x)).abs().max().item() <= 1e-6
