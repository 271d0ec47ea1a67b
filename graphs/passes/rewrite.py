"""What every lowering pass shares: copy the ExportedProgram's graph, replace matched sites with
`qwen3export::` ops, prune what they orphaned, and rebuild the program around the same weights.

The input program is never modified and no weight is copied: the new program shares its weights, plus
those a pass adds (Rewrite.add_weight: fuse_projections' concatenated projections).
"""

from __future__ import annotations

import copy
import logging
import operator
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch
from torch import fx
from torch._guards import detect_fake_mode
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, InputKind, InputSpec, TensorArgument

import qwen3export.kernels.ops  # noqa: F401  (registers the qwen3export:: ops that passes match and emit)

from .match import Bindings, Call, match, same_sizes

log = logging.getLogger("qwen3export.lower")
META_ASSERT = torch.ops.aten._assert_tensor_metadata.default  # export's dtype checks on `.to()` inputs


class UnloweredSiteWarning(UserWarning):
    """A subgraph looks like something a pass lowers but does not match its patterns: it stays in plain
    ATen ops (correct, not fused)."""


@dataclass
class PassResult:
    """The new program, how many sites the pass replaced, and notes on what it left alone."""

    name: str
    program: ExportedProgram
    sites: int
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Pattern:
    """A registry entry: a tree rooted at the node the site's result replaces, and a check on the
    bindings that returns why a structural match is not the op's semantics (None when it is)."""

    name: str
    tree: Call
    check: Callable[[Bindings], str | None] = lambda b: None

    @property
    def roots(self) -> tuple[Any, ...]:
        return self.tree.targets


class Rewrite:
    """One pass's edits over a copy of `ep`'s graph; `finish` turns them into a PassResult."""

    def __init__(self, ep: ExportedProgram, name: str):
        self.ep, self.name = ep, name
        with warnings.catch_warnings():  # deepcopy of the codegen's pytree specs warns about LeafSpec
            warnings.simplefilter("ignore", FutureWarning)
            self.graph: fx.Graph = copy.deepcopy(ep.graph_module.graph)  # node meta shared, not deep-copied
        self.sites = 0
        self.notes: list[str] = []
        self.weights: dict[str, tuple[InputSpec, torch.Tensor]] = {}  # placeholder name -> new weight (add_weight)
        placeholders = [n.meta.get("val") for n in self.graph.nodes if n.op == "placeholder"]
        self.fake_mode = detect_fake_mode(placeholders)

    def nodes(self, targets: Sequence[Any]) -> Iterator[fx.Node]:
        """call_function nodes with one of `targets`, in graph order, skipping nodes erased meanwhile."""
        for node in list(self.graph.nodes):
            if node.graph is self.graph and node.op == "call_function" and node.target in targets:
                yield node

    def find(self, patterns: Sequence[Pattern], node: fx.Node) -> tuple[Pattern, Bindings] | None:
        """The first pattern of the registry that matches at `node` and passes its check. A structural
        match that fails its check is noted (it is exactly the site a future variant would produce)."""
        for pattern in patterns:
            if node.target not in pattern.roots:
                continue
            b = match(pattern.tree, node)
            if b is None:
                continue
            why = pattern.check(b)
            if why is None:
                return pattern, b
            self.note(f"{node.name}: shaped like {pattern.name} but {why}; left unlowered")
        return None

    def note(self, text: str) -> None:
        self.notes.append(text)
        log.info("%s: %s", self.name, text)

    # ------------------------------------------------------------------ emitting
    def emit(self, target: Any, args: tuple, before: fx.Node, like: fx.Node | None = None) -> fx.Node:
        """A call_function node inserted before `before`, with its fake value and `like`'s provenance."""
        with self.graph.inserting_before(before):
            node = self.graph.call_function(target, args)
        node.meta["val"] = self._fake_value(target, args)
        for key in ("nn_module_stack", "stack_trace", "source_fn_stack", "from_node"):
            if like is not None and key in like.meta:
                node.meta[key] = like.meta[key]
        return node

    def add_weight(self, target: str, tensor: torch.Tensor, like: fx.Node) -> fx.Node:
        """A new weight of the program: a placeholder before `like` (a weight placeholder of the same kind,
        parameter or persistent buffer) holding `tensor`, under the state_dict name `target`."""
        spec = self.input_spec(like)
        prefix = "p_" if spec.kind is InputKind.PARAMETER else "b_"
        with self.graph.inserting_before(like):
            node = self.graph.placeholder(prefix + target.replace(".", "_"))
        node.meta["val"] = self.fake_mode.from_tensor(tensor, static_shapes=True)
        persistent = True if spec.kind is InputKind.BUFFER else None
        self.weights[node.name] = (InputSpec(spec.kind, TensorArgument(node.name), target, persistent), tensor)
        return node

    def input_spec(self, node: fx.Node) -> InputSpec | None:
        """The input spec of placeholder `node` (None for other nodes and for a weight this pass added)."""
        if node.op != "placeholder":
            return None
        return next((s for s in self.ep.graph_signature.input_specs
                     if isinstance(s.arg, TensorArgument) and s.arg.name == node.name), None)

    def insertion_point(self, inputs: Sequence[Any], replaced: Sequence[fx.Node]) -> fx.Node | None:
        """The node before which an op reading `inputs` and replacing `replaced` can go: right after its
        last input, provided every user of the replaced nodes comes later (None when none exists)."""
        order = {n: i for i, n in enumerate(self.graph.nodes)}
        last = max((order[a] for a in inputs if isinstance(a, fx.Node)), default=-1)
        first_use = min((order[u] for r in replaced for u in r.users), default=len(order))
        if last >= first_use:
            return None
        return list(self.graph.nodes)[last + 1]

    def outputs(self, node: fx.Node, count: int) -> list[fx.Node]:
        """getitem nodes for a tuple-returning op, inserted right after it."""
        items = []
        anchor = node.next
        for i in range(count):
            with self.graph.inserting_before(anchor):
                item = self.graph.call_function(operator.getitem, (node, i))
            item.meta["val"] = node.meta["val"][i]
            for key in ("nn_module_stack", "stack_trace"):
                if key in node.meta:
                    item.meta[key] = node.meta[key]
            items.append(item)
        return items

    def _fake_value(self, target: Any, args: tuple) -> Any:
        def fake(a):
            return a.meta["val"] if isinstance(a, fx.Node) else a

        fargs = torch.utils._pytree.tree_map(fake, args)
        with self.fake_mode:
            return target(*fargs)

    def replace(self, *pairs: tuple[fx.Node, fx.Node]) -> bool:
        """One site: route each `old`'s users to its `new`, if every `new` has its `old`'s dtype and
        (provably) shape; otherwise erase the new nodes, note why and leave the site as it was. A
        pattern's check should make this never trigger: it is the last guard against a wrong lowering."""
        for old, new in pairs:
            a, b = old.meta.get("val"), new.meta.get("val")
            if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                    and same_sizes(a.shape, b.shape)):
                self.note(f"{old.name}: the replacement gives {_describe(b)} where the graph has {_describe(a)}; "
                          "left unlowered")
                for _, n in reversed(pairs):
                    self._erase_emitted(n)
                return False
        for old, new in pairs:
            old.replace_all_uses_with(new)
        self.sites += 1
        return True

    def _erase_emitted(self, node: fx.Node) -> None:
        if node.graph is not self.graph or node.users:
            return
        parent = node.args[0] if node.target is operator.getitem else None
        self.graph.erase_node(node)
        if isinstance(parent, fx.Node) and not parent.users:
            self.graph.erase_node(parent)

    # ------------------------------------------------------------------ finishing
    def finish(self, unlowered: Callable[[fx.Graph], list[fx.Node]] | None = None, what: str = "") -> PassResult:
        """Prune the orphaned nodes, warn about sites of `what` still in plain ops, rebuild the program."""
        prune(self.graph)
        self.graph.lint()
        left = unlowered(self.graph) if unlowered is not None else []
        if left:
            names = ", ".join(n.name for n in left[:6]) + (" ..." if len(left) > 6 else "")
            msg = (f"{self.name}: {len(left)} {what} site(s) not lowered ({names}): the graph differs from the "
                   "patterns this pass knows; they stay in plain ATen ops (correct, unfused)")
            self.notes.append(msg)
            warnings.warn(msg, UnloweredSiteWarning, stacklevel=3)
        program = rebuild(self.ep, self.graph, self.weights)
        log.info("%s: %d site(s) replaced", self.name, self.sites)
        return PassResult(self.name, program, self.sites, self.notes)


def _describe(v: Any) -> str:
    return f"{v.dtype}{list(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)


def prune(graph: fx.Graph) -> None:
    """Erase nodes nothing uses any more, and export's `.to()` metadata asserts on such nodes (they are
    side-effecting for fx, so plain dead-code elimination would keep whole replaced subgraphs alive)."""
    for node in reversed(list(graph.nodes)):
        if node.op in ("placeholder", "output"):
            continue
        if node.op == "call_function" and node.target is META_ASSERT:
            src = node.args[0]
            if isinstance(src, fx.Node) and all(u.target is META_ASSERT for u in src.users):
                graph.erase_node(node)
        elif not node.users and not node.is_impure():
            graph.erase_node(node)


def rebuild(ep: ExportedProgram, graph: fx.Graph,
            weights: dict[str, tuple[InputSpec, torch.Tensor]] | None = None) -> ExportedProgram:
    """A new ExportedProgram over `graph`, sharing `ep`'s weights, constants and range constraints; `weights`
    (placeholder name -> (spec, tensor), Rewrite.add_weight) are added to its state_dict, and the weights
    whose placeholders the graph no longer has are left out of it."""
    weights = weights or {}
    gm = fx.GraphModule(ep.graph_module, graph)
    gm.meta.update(ep.graph_module.meta)
    output = next(n for n in reversed(graph.nodes) if n.op == "output")
    outs = output.args[0]
    specs = []
    for spec, value in zip(ep.graph_signature.output_specs, outs):
        if isinstance(spec.arg, TensorArgument) and isinstance(value, fx.Node) and value.name != spec.arg.name:
            spec = copy.copy(spec)
            spec.arg = TensorArgument(name=value.name)
        specs.append(spec)
    inputs, state_dict = list(ep.graph_signature.input_specs), None
    if weights or len(inputs) != sum(n.op == "placeholder" for n in graph.nodes):
        old = {s.arg.name: s for s in inputs if isinstance(s.arg, TensorArgument)}
        inputs = [weights[n.name][0] if n.name in weights else old[n.name] for n in graph.nodes
                  if n.op == "placeholder"]
        kept = {s.target for s in inputs if s.kind in (InputKind.PARAMETER, InputKind.BUFFER)}
        state_dict = {k: v for k, v in ep.state_dict.items() if k in kept}
        state_dict.update({spec.target: tensor for spec, tensor in weights.values()})
    signature = ExportGraphSignature(input_specs=inputs, output_specs=specs)
    with warnings.catch_warnings():  # deepcopy of the module call graph's pytree specs warns about LeafSpec
        warnings.simplefilter("ignore", FutureWarning)
        return ep._update(gm, signature, state_dict=state_dict)
