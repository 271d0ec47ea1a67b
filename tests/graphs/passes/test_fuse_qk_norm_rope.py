"""fuse_qk_norm_rope: each attention's per-head q/k RMSNorm + RoPE -> one qwen3export::qk_norm_rope."""

from __future__ import annotations

import pytest
import torch
from lowering_checks import assert_same_function, assert_unchanged, custom_op_counts, op_counts
from torch import nn
from torch.export import Dim

from qwen3export.graphs.decoder import RMSNorm, apply_rope
from qwen3export.graphs.passes import UnloweredSiteWarning, fuse_qk_norm_rope, fuse_rms_norm


def test_each_attention_gets_one_qk_norm_rope(captured):
    model, ep = captured("tiny-moe")
    before = len(ep.graph.nodes)
    result = fuse_qk_norm_rope(ep)
    assert result.sites == 3 and not result.notes
    assert custom_op_counts(result.program) == {"qk_norm_rope": 3}
    counts = op_counts(result.program)
    assert counts["aten.rsqrt"] == 7 and counts["aten.neg"] == 0  # hidden norms stay for fuse_rms_norm
    assert_unchanged(ep, before)
    assert_same_function(ep, result.program, model, steps=4)


def test_norms_already_lowered_to_rms_norm_still_fuse(captured):
    _, ep = captured("tiny-moe")
    result = fuse_qk_norm_rope(fuse_rms_norm(ep).program)
    assert result.sites == 3
    assert custom_op_counts(result.program) == {"rms_norm": 7, "qk_norm_rope": 3}


class NormOnQueryOnly(nn.Module):
    """RoPE on q (RMSNorm'd per head) and on k (no norm): no q/k pair for the op."""

    def __init__(self, hidden=32, heads=2, d=16):
        super().__init__()
        self.q_proj, self.k_proj = nn.Linear(hidden, heads * d), nn.Linear(hidden, heads * d)
        self.q_norm, self.heads, self.d = RMSNorm(d, 1e-6), heads, d

    def forward(self, x, cos, sin):
        b, s, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(b, s, self.heads, self.d)).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.heads, self.d).transpose(1, 2)
        return apply_rope(q, cos, sin), apply_rope(k, cos, sin)


def test_rope_without_a_q_and_k_norm_pair_stays_with_a_warning():
    torch.manual_seed(0)
    module = NormOnQueryOnly().eval()
    b, s = Dim("b", max=64), Dim("s", max=64)
    args = (torch.randn(2, 5, 32), torch.randn(2, 5, 16), torch.randn(2, 5, 16))
    ep = torch.export.export(module, args, dynamic_shapes=({0: b, 1: s}, {0: b, 1: s}, {0: b, 1: s}))
    with pytest.warns(UnloweredSiteWarning, match="2 RoPE site"):
        result = fuse_qk_norm_rope(ep)
    assert result.sites == 0
    assert any("do not pair up" in n for n in result.notes)  # the q site matched, alone
    args = (torch.randn(3, 4, 32), torch.randn(3, 4, 16), torch.randn(3, 4, 16))
    for got, want in zip(result.program.module()(*args), module(*args)):
        assert torch.equal(got, want)
