"""Lowering pass: residual add + `qwen3export::rms_norm` -> `qwen3export::add_rms_norm` (runs after
`fuse_rms_norm`; mlc-llm's fuse_add_norm: one read of the residual stream instead of two)."""

from __future__ import annotations

import torch
from torch.export import ExportedProgram

from .match import Bindings, V, call, dtype, same_sizes, shape
from .rewrite import Pattern, PassResult, Rewrite

aten = torch.ops.aten


def check_residual_add(b: Bindings) -> str | None:
    """x + residual with no broadcasting and no type promotion: the op adds them elementwise."""
    x, r, s = b["x"], b["residual"], b["sum"]
    if not (same_sizes(shape(x), shape(s)) and same_sizes(shape(r), shape(s)) and dtype(x) == dtype(r) == dtype(s)):
        return "the add broadcasts or promotes"
    return None


PATTERNS = (Pattern("add_rms_norm", call(torch.ops.qwen3export.rms_norm.default,
                                         call(aten.add.Tensor, V("x"), V("residual"), name="sum"), V("w"), V("eps")),
                    check_residual_add),)


def fuse_add_rms_norm(ep: ExportedProgram) -> PassResult:
    """Replace `rms_norm(x + residual)` with `add_rms_norm(x, residual, w, eps)` -> (normed, x + residual).

    Matches: a `qwen3export::rms_norm` whose input is an elementwise `aten.add` of two same-shape,
    same-dtype tensors (every decoder layer's norms after the first, and the final norm).
    Emits: `add_rms_norm`; the norm's users read output 0 and the add's other users (the residual
    stream) read output 1, the same sum.
    Leaves alone: norms of anything else (the first layer's norm of the embedding), broadcasting adds;
    nothing is warned, since an unfused norm here is still a fused `rms_norm`.
    """
    rw = Rewrite(ep, "add_rms_norm")
    op = torch.ops.qwen3export.add_rms_norm.default
    for node in rw.nodes([torch.ops.qwen3export.rms_norm.default]):
        found = rw.find(PATTERNS, node)
        if found is None:
            continue
        b = found[1]
        add = b["sum"]
        # right after the add: every reader of the sum, norm or residual, comes later
        new = rw.emit(op, (b["x"], b["residual"], b["w"], b["eps"]), before=add.next, like=node)
        normed, total = rw.outputs(new, 2)
        rw.replace((node, normed), (add, total))
    return rw.finish()
