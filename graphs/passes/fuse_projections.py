"""Lowering pass: the linear projections that read the same input (attention q/k/v, the MLP's gate/up) -> one
linear over their weights concatenated along the output dim, then a split (last in the lowering order)."""

from __future__ import annotations

from collections import defaultdict

import torch
from torch import fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from .match import V, call, dtype, shape
from .rewrite import Pattern, PassResult, Rewrite

aten = torch.ops.aten
qx = torch.ops.qwen3export

# op -> (its weight arguments, concatenated along dim 0 = the output rows; its other arguments after x, equal
# across a group). Quantized weights are per output row (quant_format.QuantizedWeight: codes, scales and zero
# points [N, ...], each row quantized on its own), so the rows of a concatenation are the rows of the parts.
LINEARS = {
    aten.linear.default: (("weight", "bias"), ()),
    qx.wq_linear.default: (("qweight", "scales", "zero_points"), ("bits", "group_size")),
    qx.fp8_linear.default: (("weight", "weight_scales"), ()),
}
WEIGHT_KINDS = (InputKind.PARAMETER, InputKind.BUFFER)


def _linear_tree(op):
    schema = op._schema.arguments
    return call(op, V("x"), *(V(a.name) for a in schema[1:]))


# what the pass looks at (the registry's entries); the grouping by input is done in `_groups`
PATTERNS = tuple(Pattern(op._schema.name.split("::")[1], _linear_tree(op)) for op in LINEARS)


def fused_name(targets: list[str]) -> str | None:
    """The fused weight's state_dict name: `….self_attn.q_proj.weight`, `k_proj`, `v_proj` -> `….self_attn.qkv_proj
    .weight`, `….mlp.gate_proj.weight`, `up_proj` -> `….mlp.gate_up_proj.weight` (ONNX Runtime GenAI's names);
    None when the parts are not sibling modules' tensors of one name."""
    parts = [t.rsplit(".", 2) for t in targets]
    if any(len(p) != 3 or p[0] != parts[0][0] or p[2] != parts[0][2] for p in parts):
        return None
    modules = [p[1] for p in parts]
    if all(m.endswith("_proj") for m in modules):
        stems = [m.removesuffix("_proj") for m in modules]
        module = ("" if all(len(s) == 1 for s in stems) else "_").join(stems) + "_proj"
    else:
        module = "_".join(modules)
    return f"{parts[0][0]}.{module}.{parts[0][2]}"


class _Group:
    """Linears of one op reading the same x with the same non-weight arguments (bits, group size)."""

    def __init__(self, op, nodes: list[fx.Node]):
        self.op, self.nodes = op, nodes
        self.weights, self.rest = LINEARS[op]
        self.args = [self._args(n) for n in nodes]

    def _args(self, node: fx.Node) -> dict:
        names = [a.name for a in self.op._schema.arguments]
        out = dict(zip(names, node.args))
        out.update(node.kwargs)
        return out

    def why_not(self, rw: Rewrite) -> str | None:
        """None when the group can be one linear: every weight a stored 2-D tensor of the program, the same K and
        dtype, none shared with other nodes, each optional weight present in all or none."""
        for role in self.weights:
            present = [a.get(role) is not None for a in self.args]
            if any(present) and not all(present):
                return f"{role} is given to some and not others"
            for a in self.args:
                node = a.get(role)
                if node is None:
                    continue
                spec = rw.input_spec(node)
                if spec is None or spec.kind not in WEIGHT_KINDS or spec.target not in rw.ep.state_dict:
                    return f"{role} {getattr(node, 'name', node)} is not a stored weight of the program"
                if len(node.users) != 1:
                    return f"{role} {node.name} is read by other nodes too"
            first = self.args[0].get(role)
            if first is not None:
                shapes = [tuple(shape(a[role])) for a in self.args]
                if any(len(s) != len(shapes[0]) or s[1:] != shapes[0][1:] for s in shapes):
                    return f"{role} shapes {shapes} do not concatenate along the output rows"
                if len({dtype(a[role]) for a in self.args}) != 1:
                    return f"{role} dtypes differ"
        return None

    def sizes(self) -> list[int]:
        return [int(shape(a[self.weights[0]])[0]) for a in self.args]


def _groups(rw: Rewrite) -> list[_Group]:
    by_input: dict[tuple, list[fx.Node]] = defaultdict(list)
    for node in rw.nodes(tuple(LINEARS)):
        x = node.args[0]
        rest = tuple(node.args[len(LINEARS[node.target][0]) + 1:])
        by_input[(x, node.target, rest)].append(node)
    return [_Group(op, nodes) for (_, op, _), nodes in by_input.items() if len(nodes) > 1]


def fuse_projections(ep: ExportedProgram) -> PassResult:
    """Fuse the linear projections that read one input into one linear over concatenated weights.

    Matches: two or more `aten.linear` (bias all or none), `qwen3export::wq_linear` (same bits and group size;
    zero points all or none) or `qwen3export::fp8_linear` nodes with the same input, whose weights are stored
    2-D tensors of the program read by nothing else: per layer q/k/v (after the norm) and the dense MLP's
    gate/up (after the post-attention norm), in fp and quantized programs alike.
    Emits: one linear of that op over new weights, the parts concatenated along the output rows (state_dict
    `….qkv_proj.weight`, `….gate_up_proj.weight`, …, which replace the parts), then one `aten.split_with_sizes`
    over the last dim; the parts' users read its outputs. Quantized codes, scales and zero points are per row,
    so the fused weight is exactly what quantizing the concatenated matrix gives (tests/graphs/passes).
    Leaves alone: single linears (o_proj, down_proj, lm_head); MoE experts (already one stacked gate_up weight,
    inside qwen3export::moe / wq_moe; Qwen3-MoE has no shared expert); weights on the meta device (streamed
    builds load every weight by its own name), weights read elsewhere, or mixed bias / zero points (noted).
    """
    rw = Rewrite(ep, "projections")
    if any(t.device.type == "meta" for t in ep.state_dict.values()):
        rw.note("the weights are on the meta device (a streamed build, which loads every weight by its own name "
                "while writing the engine): projections left unfused")
        return rw.finish()
    for group in _groups(rw):
        why = group.why_not(rw)
        if why is None:
            why = _fuse(rw, group)
        if why is not None:
            rw.note(f"{', '.join(n.name for n in group.nodes)}: {why}; left unfused")
    return rw.finish()


def _fuse(rw: Rewrite, group: _Group) -> str | None:
    old_weights: list[fx.Node] = []
    fused_args: dict = {}
    for role in group.weights:
        parts = [a.get(role) for a in group.args]
        if parts[0] is None:
            fused_args[role] = None
            continue
        targets = [rw.input_spec(p).target for p in parts]
        name = fused_name(targets)
        if name is None or name in rw.ep.state_dict:
            return f"no fused name for {targets}"
        tensor = torch.cat([rw.ep.state_dict[t] for t in targets], 0)
        if isinstance(rw.ep.state_dict[targets[0]], torch.nn.Parameter):
            tensor = torch.nn.Parameter(tensor, requires_grad=False)
        fused_args[role] = rw.add_weight(name, tensor, like=parts[0])
        old_weights += parts
    schema = [a.name for a in group.op._schema.arguments]
    first = group.nodes[0]
    args = (first.args[0], *(fused_args.get(n, group.args[0].get(n)) for n in schema[1:len(first.args)]))
    fused = rw.emit(group.op, args, before=first, like=first)
    split = rw.emit(aten.split_with_sizes.default, (fused, group.sizes(), -1), before=first, like=first)
    items = rw.outputs(split, len(group.nodes))
    if not rw.replace(*zip(group.nodes, items)):  # (one site per group when it succeeds)
        for node in (*items, split, fused, *(n for n in fused_args.values() if n is not None)):
            if not getattr(node, "_erased", False) and not node.users:
                rw.graph.erase_node(node)
            rw.weights.pop(node.name, None)
        return "the fused linear's result does not split back into the parts"
    for node in group.nodes:
        rw.graph.erase_node(node)
    for node in old_weights:  # their state_dict entries go with them (rewrite.rebuild)
        if not node.users:
            rw.graph.erase_node(node)
    return None

