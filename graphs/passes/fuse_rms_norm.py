"""Lowering pass: RMSNorm subgraphs -> `qwen3export::rms_norm` (after q/k-norm fusion, before add+norm)."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .match import ANY, Bindings, V, call, dtype, is_dim, one_of, shape, same_size
from .rewrite import Pattern, PassResult, Rewrite

aten = torch.ops.aten


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def cast(inner, to, name: str | None = None):
    """`inner.to(to)` in either export form (pre-dispatch aten.to or decomposed _to_copy)."""
    return one_of(call(aten.to.dtype, inner, to, name=name),
                  call(aten._to_copy.default, inner, dtype=to, layout=ANY, device=ANY, name=name))


def maybe_cast(inner, to, name: str | None = None):
    """`inner.to(to)` or `inner` alone (fp32 graphs may have no cast at all once decomposed)."""
    return one_of(cast(inner, to, name), inner)


def rms_norm_tree(name: str | None = None):
    """graphs/decoder.py rms_norm_reference: w * (xf * rsqrt(mean(xf^2, -1, keepdim) + eps)).to(x.dtype),
    xf = x.to(float32). Binds x, w, eps, dims, and xf / out_dtype where those casts are present."""
    xf = maybe_cast(V("x"), torch.float32, name="xf")
    var = call(aten.mean.dim, call(aten.pow.Tensor_Scalar, xf, 2), V("dims"), True)
    normed = call(aten.mul.Tensor, xf, call(aten.rsqrt.default, call(aten.add.Tensor, var, V("eps", _is_number))),
                  commutative=True)
    return call(aten.mul.Tensor, V("w"), maybe_cast(normed, V("out_dtype")), commutative=True, name=name)


def check_rms_norm(b: Bindings) -> str | None:
    """None when the bound subgraph computes exactly what qwen3export::rms_norm computes."""
    x, w = b["x"], b["w"]
    xs, ws = shape(x), shape(w)
    if xs is None or ws is None or len(ws) != 1 or not same_size(ws[0], xs[-1]):
        return "the weight is not one value per element of the last dimension"
    dims = b["dims"]
    if not (isinstance(dims, (list, tuple)) and len(dims) == 1 and is_dim(dims[0], len(xs), len(xs) - 1)):
        return f"it reduces over dims {dims}, not the last one"
    if "xf" not in b and dtype(x) != torch.float32:
        return f"it computes in {dtype(x)}, not fp32"
    if b.get("out_dtype", dtype(x)) != dtype(x):
        return f"it casts the result to {b['out_dtype']}, not back to the input's {dtype(x)}"
    return None


PATTERNS = (Pattern("rms_norm", rms_norm_tree(), check_rms_norm),)


def fuse_rms_norm(ep: ExportedProgram) -> PassResult:
    """Replace RMSNorm subgraphs with `qwen3export::rms_norm(x, weight, eps)`.

    Matches: graphs/decoder.py `rms_norm_reference` as torch.export records it, with or without the fp32
    upcast (absent when the graph is already fp32 and decomposed) and with either operand order of the
    two products, over the last dimension of any rank (hidden norms and per-head q/k norms alike).
    Emits: one `rms_norm` per site; an identity `.to(float32)` of x that other nodes also read (the
    residual stream in fp32 graphs) is bypassed so `fuse_add_rms_norm` sees the add's real users.
    Leaves alone: norms over other dims, without the fp32 compute, with a different output cast, or any
    other formula (LayerNorm, Gemma's 1 + w): `aten.rsqrt` left in the graph is reported and warned.
    """
    rw = Rewrite(ep, "rms_norm")
    op = torch.ops.qwen3export.rms_norm.default
    for node in rw.nodes([aten.mul.Tensor]):
        found = rw.find(PATTERNS, node)
        if found is None:
            continue
        b = found[1]
        new = rw.emit(op, (b["x"], b["w"], float(b["eps"])), before=node, like=node)
        if rw.replace((node, new)):
            xf = b.get("xf")
            if xf is not None and dtype(b["x"]) == torch.float32:  # x.to(float32) on fp32 is x itself
                xf.replace_all_uses_with(b["x"])
    return rw.finish(lambda g: [n for n in g.nodes if n.target is aten.rsqrt.default], "RMSNorm")
