"""Lowering pass: the sparse MoE block (router softmax -> top-k -> experts) -> `qwen3export::moe`."""

from __future__ import annotations

import operator

import torch
from torch.export import ExportedProgram

from .fuse_rms_norm import maybe_cast
from .match import ANY, Bindings, V, call, dtype, full_slice_end, is_dim, one_of, same_size, same_sizes, shape
from .rewrite import Pattern, PassResult, Rewrite

aten = torch.ops.aten
VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def moe_tree():
    """graphs/decoder.py SparseMoeBlock on tokens t [T, H]: routing (decoder.router_topk), a dense
    [T, E] weight matrix zero off the top-k, every expert on every token, weighted sum over experts."""
    t = V("t")
    probs = call(aten.softmax.int, call(aten.linear.default, t, V("router")), V("router_dim"), V("router_dtype"))
    topk = call(aten.topk.default, probs, V("top_k"), name="topk")
    top_w = call(operator.getitem, topk, 0)
    weights = one_of(call(aten.div.Tensor, top_w, call(aten.sum.dim_IntList, top_w, V("norm_dims"), True)), top_w)
    dense = call(aten.scatter.src, call(aten.zeros.default, ANY, dtype=ANY, layout=ANY, device=ANY, pin_memory=ANY,
                                        name="zeros"),
                 1, call(operator.getitem, topk, 1), maybe_cast(weights, V("weights_dtype")))
    gu = call(VIEWS, call(aten.linear.default, t, call(VIEWS, V("gate_up"), ANY, name="gate_up_flat")), ANY, name="gu")
    act = call(aten.mul.Tensor, call(aten.silu.default, call(aten.slice.Tensor, gu, V("gate_dim"), 0, V("inter"))),
               call(aten.slice.Tensor, gu, V("up_dim"), V("inter"), V("up_end")))
    y = call(aten.matmul.default, call(aten.transpose.int, act, 0, 1), call(aten.transpose.int, V("down"), 1, 2))
    combine = call(aten.unsqueeze.default, call(aten.t.default, dense), 2)
    return call(aten.sum.dim_IntList, call(aten.mul.Tensor, y, combine, commutative=True), [0], name="out")


def check_moe(b: Bindings) -> str | None:
    ts, rs, gus, ds = shape(b["t"]), shape(b["router"]), shape(b["gate_up"]), shape(b["down"])
    if ts is None or len(ts) != 2 or rs is None or len(rs) != 2 or gus is None or len(gus) != 3 or ds is None \
            or len(ds) != 3:
        return "tokens, router or expert weights do not have the block's ranks"
    tokens, hidden = ts
    e, two_i, h = gus
    inter = b["inter"]
    if not (isinstance(two_i, int) and two_i == 2 * inter and same_sizes(ds, (e, hidden, inter))
            and same_sizes(rs, (e, hidden)) and same_size(h, hidden)):
        return "expert weights are not gate_up [E, 2I, H] (gate rows first) and down [E, H, I]"
    flat, per_expert = shape(b["gate_up_flat"]), shape(b["gu"])
    if not (same_sizes(flat, (e * two_i, hidden)) and same_sizes(per_expert, (tokens, e, two_i))):
        return "gate_up is not applied to every token for every expert"
    if not (is_dim(b["gate_dim"], 3, 2) and is_dim(b["up_dim"], 3, 2) and full_slice_end(b["up_end"], two_i)):
        return "the SwiGLU halves are not [:I] gate, [I:] up"
    if not (is_dim(b["router_dim"], 2, 1) and (b["router_dtype"] == torch.float32
                                              or (b["router_dtype"] is None and dtype(b["t"]) == torch.float32))):
        return "the router softmax is not over experts in fp32"
    k = b["top_k"]
    if not (isinstance(k, int) and 1 <= k <= e):
        return f"top_k {k} is not a constant in 1..E"
    if "norm_dims" in b and not (isinstance(b["norm_dims"], (list, tuple)) and len(b["norm_dims"]) == 1
                                 and is_dim(b["norm_dims"][0], 2, 1)):
        return "top-k weights are not renormalised over the k experts"
    if b.get("weights_dtype", dtype(b["t"])) != dtype(b["t"]) or not same_sizes(shape(b["zeros"]), (tokens, e)):
        return "the dense routing matrix is not [T, E] in the tokens' dtype"
    if not (dtype(b["t"]) == dtype(b["gate_up"]) == dtype(b["down"]) == dtype(b["router"])):
        return "tokens and weights do not share one dtype"
    return None


PATTERNS = (Pattern("moe", moe_tree(), check_moe),)


def replace_moe(ep: ExportedProgram) -> PassResult:
    """Replace each sparse MoE block with `qwen3export::moe(t, router, gate_up, down, top_k, norm_topk_prob)`.

    Matches: graphs/decoder.py SparseMoeBlock from its tokens t [T, H] to the combined output [T, H]:
    router logits, softmax in fp32, top-k, optional renormalisation (sets norm_topk_prob), a dense [T, E]
    matrix scattered from the top-k, SwiGLU experts from stacked gate_up [E, 2I, H] (gate rows first)
    and down [E, H, I], and the weighted sum over experts.
    Emits: one `moe` per block; the [B, S, H] <-> [T, H] reshapes around it stay. Routing ties go to the
    lowest expert id (kernels/ops.py), where the plain graph's topk leaves the order unspecified.
    Leaves alone: dense MLP layers (nothing to route), shared experts, sigmoid or grouped routers,
    experts kept as separate Linear modules; `topk` left in the graph is reported and warned.
    """
    rw = Rewrite(ep, "moe")
    op = torch.ops.qwen3export.moe.default
    for node in rw.nodes([aten.sum.dim_IntList]):
        found = rw.find(PATTERNS, node)
        if found is None:
            continue
        b = found[1]
        args = (b["t"], b["router"], b["gate_up"], b["down"], int(b["top_k"]), "norm_dims" in b)
        rw.replace((node, rw.emit(op, args, before=node, like=node)))
    return rw.finish(lambda g: [n for n in g.nodes if n.target is aten.topk.default], "MoE routing")
