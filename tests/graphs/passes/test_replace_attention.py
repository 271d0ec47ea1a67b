"""replace_attention: GQA over the KV cache with the attention_mask_bias mask -> qwen3export::attention;
any other attention or mask stays in plain ops, with a warning, and the program stays correct."""

from __future__ import annotations

import pytest
import torch
from lowering_checks import assert_same_function, assert_unchanged, custom_op_counts, op_counts, rank5_softmaxes

import qwen3export
from qwen3export.graph_capture import capture
from qwen3export.graphs import decoder
from qwen3export.graphs.passes import UnloweredSiteWarning, lower, replace_attention


def test_each_attention_becomes_one_op(captured):
    model, ep = captured("tiny-moe")
    before = len(ep.graph.nodes)
    assert rank5_softmaxes(ep) == 3
    result = replace_attention(ep)
    assert result.sites == 3 and not result.notes
    assert custom_op_counts(result.program) == {"attention": 3}
    assert rank5_softmaxes(result.program) == 0
    assert op_counts(result.program)["aten.where"] == 0  # the additive mask is gone with its readers
    node = next(n for n in result.program.graph.nodes if n.target is torch.ops.qwen3export.attention.default)
    assert node.args[3].name == "attention_mask" and node.args[4] is None  # the raw [B, L] input
    assert node.args[5] == pytest.approx(model.spec.head_dim ** -0.5)
    assert_unchanged(ep, before)
    assert_same_function(ep, result.program, model, steps=6)


class SoftCappedAttention(decoder.Attention):
    """graphs/decoder.py Attention with Gemma-2's logit soft-capping, tanh(scores / 50) * 50: not this op."""

    def forward(self, x, cos, sin, mask, past_k, past_v, attention_mask=None):
        b, s, _ = x.shape
        d, hkv, g = self.head_dim, self.n_kv, self.n_heads // self.n_kv
        q = self.q_norm(self.q_proj(x).view(b, s, self.n_heads, d)).transpose(1, 2)
        k = self.k_norm(self.k_proj(x).view(b, s, hkv, d)).transpose(1, 2)
        v = self.v_proj(x).view(b, s, hkv, d).transpose(1, 2)
        q, k = decoder.apply_rope(q, cos, sin), decoder.apply_rope(k, cos, sin)
        k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        scores = torch.matmul(q.view(b, hkv, g, s, d), k[:, :, None].transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / 50.0) * 50.0 + mask
        out = torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32), v[:, :, None])
        return self.o_proj(out.reshape(b, self.n_heads, s, d).transpose(1, 2).reshape(b, s, -1)), k, v


def windowed_mask_bias(attention_mask, s, dtype, window=4):
    """attention_mask_bias plus a sliding window (Mistral, Qwen2's use_sliding_window): not this op's rule."""
    total = attention_mask.shape[1]
    kpos = torch.arange(total)
    qpos = torch.arange(s) + total - s
    allowed = ((kpos[None, :] <= qpos[:, None]) & (kpos[None, :] > qpos[:, None] - window))[None] \
        & (attention_mask[:, None, :] != 0)
    zero, neg = torch.zeros((), dtype=dtype), torch.full((), torch.finfo(dtype).min, dtype=dtype)
    return torch.where(allowed, zero, neg)[:, None, None]


@pytest.mark.parametrize("variant", ["soft-capped scores", "sliding-window mask"])
def test_other_attention_stays_unlowered_with_a_warning(variant, monkeypatch):
    model = qwen3export.load_model("tiny", seed=1)
    if variant == "soft-capped scores":
        for layer in model.model.layers:
            layer.self_attn.__class__ = SoftCappedAttention
    else:  # Qwen3Decoder.forward builds the mask through the module-level function
        monkeypatch.setattr(decoder, "attention_mask_bias", windowed_mask_bias)
    ep = capture(model)
    with pytest.warns(UnloweredSiteWarning, match="2 attention site"):
        lowered, report = lower(ep)
    assert report["attention"] == 0 and rank5_softmaxes(lowered) == 2
    assert report["qk_norm_rope"] == 2 and report["rms_norm"] == 5  # the rest of the layer still lowers
    assert_same_function(ep, lowered, model, steps=6)
