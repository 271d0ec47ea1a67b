"""Lowering pass: GQA attention over the explicit KV cache, with the causal + padding mask that
`attention_mask_bias` builds, -> `qwen3export::attention` (prefill and decode alike)."""

from __future__ import annotations

import torch
from torch import fx
from torch.export import ExportedProgram

from .fuse_rms_norm import maybe_cast
from .match import (ANY, Bindings, V, call, dtype, full_slice_end, is_dim, maybe, same_size, same_sizes, shape, swaps,
                    val)
from .rewrite import Pattern, PassResult, Rewrite

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
_FACTORY = dict(layout=ANY, device=ANY, pin_memory=ANY)


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def mask_tree():
    """graphs/decoder.py attention_mask_bias(attention_mask, S, dtype) -> [B, 1, 1, S, L]:
    where((arange(L)[None, :] <= (arange(S) + P)[:, None])[None] & (attention_mask[:, None, :] != 0), 0, min)."""
    keys_at = call(aten.arange.default, V("L"), dtype=None, **_FACTORY)
    kpos = maybe(aten.slice.Tensor, call(aten.unsqueeze.default, keys_at, 0), 1, 0, V("kpos_end"))
    qpos = call(aten.unsqueeze.default,
                call(aten.add.Tensor, call(aten.arange.default, V("S"), dtype=None, **_FACTORY), V("P")), 1)
    causal = call(aten.unsqueeze.default, call(aten.le.Tensor, kpos, qpos), 0)
    keys = call(aten.ne.Scalar, maybe(aten.slice.Tensor, call(aten.unsqueeze.default, V("attention_mask"), 1), 2, 0,
                                      V("pad_end")), 0)
    allowed = call(aten.__and__.Tensor, causal, keys, commutative=True)
    zero = call(aten.zeros.default, [], dtype=V("mask_dtype"), **_FACTORY)
    neg = call(aten.full.default, [], V("neg"), dtype=V("mask_dtype"), **_FACTORY)
    return call(aten.unsqueeze.default, call(aten.unsqueeze.default, call(aten.where.self, allowed, zero, neg), 1), 2)


def attention_tree(mask):
    """graphs/decoder.py Attention after RoPE and the cache concat (GQA with no repeated K/V):
    softmax(q.view(B, Hkv, G, S, D) @ k[:, :, None]^T * scale + mask, fp32) @ v[:, :, None] -> [B, Hq, S, D]."""
    qg = call(VIEWS, V("q"), ANY, name="qg")
    kt = call(aten.transpose.int, call(aten.unsqueeze.default, V("k"), 2), V("kt0"), V("kt1"))
    scores = call(aten.mul.Tensor, call(aten.matmul.default, qg, kt, name="qk"), V("scale", _is_number),
                  commutative=True)
    probs = call(aten.softmax.int, call(aten.add.Tensor, scores, mask, commutative=True), V("softmax_dim"),
                 V("softmax_dtype"), name="probs")
    out = call(aten.matmul.default, maybe_cast(probs, V("probs_dtype")), call(aten.unsqueeze.default, V("v"), 2))
    return call(VIEWS, out, ANY, name="out")


def check_mask(b: Bindings) -> str | None:
    """The mask is the causal + key-padding rule of qwen3export::attention for queries [B, Hq, S, D]."""
    am, q = b["attention_mask"], b["q"]
    ams, qs = shape(am), shape(q)
    if ams is None or len(ams) != 2 or not same_size(ams[0], qs[0]):
        return "the key padding mask is not [B, L]"
    length, s, past = val(b["L"]), val(b["S"]), val(b["P"])
    ends = (b["kpos_end"], b["pad_end"])
    if not (same_size(length, ams[1]) and all(full_slice_end(e, length) for e in ends)):
        return "the causal rule is not over the attention_mask's key positions"
    if not (same_size(s, qs[2]) and same_size(past + s, length)):
        return "query positions are not the last S of the mask's L (causal offset P = L - S)"
    mdt = b["mask_dtype"]
    if not (isinstance(mdt, torch.dtype) and mdt.is_floating_point and b["neg"] <= torch.finfo(mdt).min):
        return f"masked scores get {b['neg']}, not the dtype minimum"
    return None


def check_attention(b: Bindings) -> str | None:
    q, k, v = b["q"], b["k"], b["v"]
    qs, ks, vs = shape(q), shape(k), shape(v)
    if qs is None or ks is None or vs is None or not (len(qs) == len(ks) == len(vs) == 4):
        return "q, k, v are not [B, H, S|L, D]"
    bsz, hq, s, d = qs
    hkv = ks[1]
    if not (isinstance(hq, int) and isinstance(hkv, int) and hq % hkv == 0):
        return "query heads are not a multiple of kv heads"
    if not same_sizes(shape(b["qg"]), (bsz, hkv, hq // hkv, s, d)):
        return "q is not split into [B, Hkv, G, S, D] groups (query head h -> kv head h // G)"
    if not (same_sizes((ks[0], ks[3]), (bsz, d)) and same_sizes((vs[0], vs[1], vs[3]), (bsz, hkv, d))):
        return "k/v do not have q's batch, head dim and the kv head count"
    if not swaps(b["kt0"], b["kt1"], 5, 3, 4):
        return "the key is not transposed over its last two dims"
    if not same_sizes(shape(b["out"]), qs):
        return "the output is not merged back to [B, Hq, S, D]"
    if not is_dim(b["softmax_dim"], 5, 4):
        return "softmax is not over the keys"
    if (b["softmax_dtype"] or dtype(b["qk"])) != torch.float32:
        return "softmax is not computed in fp32"
    if b.get("probs_dtype", dtype(q)) != dtype(q) or not (dtype(q) == dtype(k) == dtype(v)):
        return "q, k, v and the probabilities do not share one dtype"
    return check_mask(b)


PATTERNS = (Pattern("attention", attention_tree(mask_tree()), check_attention),)


def replace_attention(ep: ExportedProgram) -> PassResult:
    """Replace each attention with `qwen3export::attention(q, k, v, attention_mask, None, scale)`.

    Matches: graphs/decoder.py Attention from RoPE'd q [B, Hq, S, D] and the concatenated cache k, v
    [B, Hkv, L, D] to the output merged back to [B, Hq, S, D]: grouped q (no repeated K/V), scaled
    scores, plus the additive mask `attention_mask_bias` builds from the attention_mask input (causal
    with offset P = L - S, key padding, masked = dtype minimum), softmax in fp32. The mask is matched
    op by op and its sizes checked symbolically, so prefill (P = 0) and decode (S = 1) are one site.
    Emits: one `attention` per site, reading the raw [B, L] attention_mask; the present k/v concat stays
    in the graph (it is an output). Rows that see no key (left padding) get zeros instead of the plain
    graph's average over masked keys; such rows feed only padding positions (kernels/ops.py).
    Leaves alone: any other mask (sliding window, a mask given as a tensor input), soft-capping, scale
    applied elsewhere, softmax in low precision, MHA written with repeat_kv; `softmax` over rank >= 4
    scores left in the graph is reported and warned. The cache length L of k/v and of the mask are
    equal for any input the plain graph accepts (its broadcasting add requires it).
    """
    rw = Rewrite(ep, "attention")
    op = torch.ops.qwen3export.attention.default
    for node in rw.nodes(VIEWS):
        found = rw.find(PATTERNS, node)
        if found is None:
            continue
        b = found[1]
        new = rw.emit(op, (b["q"], b["k"], b["v"], b["attention_mask"], None, float(b["scale"])), before=node,
                      like=node)
        rw.replace((node, new))
    return rw.finish(_attention_left, "attention")


def _attention_left(graph: fx.Graph) -> list[fx.Node]:
    softmaxes = (aten.softmax.int, aten._softmax.default)
    return [n for n in graph.nodes if n.target in softmaxes and len(shape(n.args[0]) or ()) >= 4]
