"""Lowering pass: Qwen3's per-head q/k RMSNorm + RoPE -> `qwen3export::qk_norm_rope` (first pass, so
that `fuse_rms_norm` does not take the q/k norms on their own)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx
from torch.export import ExportedProgram

from .fuse_rms_norm import check_rms_norm, rms_norm_tree
from .match import Bindings, V, call, full_slice_end, is_dim, one_of, same_sizes, shape, swaps
from .rewrite import Pattern, PassResult, Rewrite

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)
# projections: nn.Linear, or a quantized one (graphs/quantized.py QuantizedLinear); input h is args[0] of each
PROJECTIONS = (aten.linear.default, torch.ops.qwen3export.wq_linear.default, torch.ops.qwen3export.fp8_linear.default)


def _rope_tree(normed):
    """graphs/decoder.py apply_rope(normed.transpose(1, 2), cos, sin): x * cos[:, None] +
    cat(-x[..., half:], x[..., :half]) * sin[:, None] (rotate_half convention)."""
    xt = call(aten.transpose.int, normed, V("t0"), V("t1"), name="xt")
    hi = call(aten.slice.Tensor, xt, V("dim_hi"), V("half"), V("end"))
    lo = call(aten.slice.Tensor, xt, V("dim_lo"), 0, V("half"))
    rotated = call(aten.cat.default, [call(aten.neg.default, hi), lo], V("dim_cat"))
    return call(aten.add.Tensor,
                call(aten.mul.Tensor, xt, call(aten.unsqueeze.default, V("cos"), 1), commutative=True),
                call(aten.mul.Tensor, rotated, call(aten.unsqueeze.default, V("sin"), 1), commutative=True),
                commutative=True, name="out")


def check_site(b: Bindings) -> str | None:
    """One q or k site: x [B, S, H, D] normed over D, moved to [B, H, S, D], rotated with cos/sin [B, S, D]."""
    if "w" in b and "dims" in b:
        why = check_rms_norm(b)
        if why is not None:
            return why
    xs, cs, ss = shape(b["x"]), shape(b["cos"]), shape(b["sin"])
    if xs is None or len(xs) != 4 or cs is None or ss is None:
        return "its input is not [B, S, H, D]"
    d = xs[3]
    if not swaps(b["t0"], b["t1"], 4, 1, 2):
        return "the norm output is not moved to [B, H, S, D] by transpose(1, 2)"
    if not all(is_dim(b[k], 4, 3) for k in ("dim_hi", "dim_lo", "dim_cat")):
        return "rotate_half does not act on the last dimension"
    if not (isinstance(d, int) and b["half"] * 2 == d and full_slice_end(b["end"], d)):
        return "rotate_half does not split the head in halves"
    if not (same_sizes(cs, (xs[0], xs[1], d)) and same_sizes(ss, cs)):
        return "cos/sin are not [B, S, D] for this input"
    return None


# a site's norm is the plain-op RMSNorm, or a `qwen3export::rms_norm` an earlier run left
_NORMED = one_of(rms_norm_tree(), call(torch.ops.qwen3export.rms_norm.default, V("x"), V("w"), V("eps")))
PATTERNS = (Pattern("norm_rope", _rope_tree(_NORMED), check_site),)


def _projection_source(x: fx.Node) -> fx.Node | None:
    """h for x = view(linear(h, W_proj)) (or a quantized linear): q and k of one attention read the same normed
    hidden state."""
    if x.op == "call_function" and x.target in VIEWS and isinstance(x.args[0], fx.Node):
        lin = x.args[0]
        if lin.op == "call_function" and lin.target in PROJECTIONS:
            return lin.args[0]
    return None


def fuse_qk_norm_rope(ep: ExportedProgram) -> PassResult:
    """Replace each attention's q and k per-head RMSNorm + RoPE with one `qwen3export::qk_norm_rope`.

    Matches: sites `apply_rope(rms_norm(x).transpose(1, 2), cos, sin)` with x [B, S, H, D] (graphs/decoder.py
    Attention: RMSNorm over head_dim per head before RoPE, Qwen3's change from Qwen2), whether the norm is
    still plain ops or already `qwen3export::rms_norm`, then pairs two sites that share cos, sin, eps and
    the projected hidden state (x = view(linear(h, W_q|W_k))) — an attention's q and k.
    Emits: `qk_norm_rope(x_q, x_k, w_q, w_k, cos, sin, eps)` -> (q [B, Hq, S, D], k [B, Hkv, S, D]).
    Leaves alone: RoPE without a q/k norm (Qwen2, Llama), interleaved RoPE, partial rotary dims, and a site
    with no partner; RoPE (`neg` feeding `cat`) left in the graph is reported and warned.
    """
    rw = Rewrite(ep, "qk_norm_rope")
    op = torch.ops.qwen3export.qk_norm_rope.default
    groups: dict[tuple, list[Bindings]] = defaultdict(list)
    for node in rw.nodes([aten.add.Tensor]):
        found = rw.find(PATTERNS, node)
        if found is not None:
            b = found[1]
            source = _projection_source(b["x"])
            groups[(b["cos"], b["sin"], float(b["eps"]), source)].append(b)
    for (cos, sin, eps, source), sites in groups.items():
        if source is None or len(sites) != 2:
            names = ", ".join(s["out"].name for s in sites)
            rw.note(f"{names}: norm+RoPE sites that do not pair up as one attention's q and k; left unlowered")
            continue
        q, k = sites
        args = (q["x"], k["x"], q["w"], k["w"], cos, sin, eps)
        where = rw.insertion_point(args, [q["out"], k["out"]])
        if where is None:
            rw.note(f"{q['out'].name}, {k['out'].name}: no point in the graph where both inputs exist before "
                    "either result is read; left unlowered")
            continue
        new = rw.emit(op, args, before=where, like=q["out"])
        q_out, k_out = rw.outputs(new, 2)
        rw.replace((q["out"], q_out), (k["out"], k_out))
    return rw.finish(_rope_left, "RoPE")


def _rope_left(graph: fx.Graph) -> list[fx.Node]:
    """rotate_half sites still in plain ops: a `neg` read by a `cat`."""
    return [n for n in graph.nodes if n.target is aten.neg.default
            and any(u.target is aten.cat.default for u in n.users)]
