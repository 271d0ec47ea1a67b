"""Structural matching over the ATen nodes of a captured graph: small pattern trees with named captures.

A pattern is a tree of `call(op, *args)` rooted at the node a pass replaces; leaves are captures
(`V("x")`, bound to whatever node or literal sits there, the same name always to the same thing) or
literals. Arguments are compared by the op's schema: an argument the pattern leaves out must hold its
schema default, so `topk(x, k, largest=False)` never matches a pattern written for `topk(x, k)`.
Shapes are not in the trees; each pass checks them on the captured nodes' `meta["val"]` (symbolic).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import fx
from torch.fx.experimental.symbolic_shapes import statically_known_true

Bindings = dict[str, Any]
aten = torch.ops.aten


@dataclass(frozen=True)
class V:
    """A capture: binds `name` to the node (or literal) at this position; `when` filters it."""

    name: str
    when: Callable[[Any], bool] | None = None


class _Any:
    def __repr__(self) -> str:
        return "ANY"


ANY = _Any()  # matches any argument and binds nothing (devices, pin_memory, layout of factory ops)


@dataclass(frozen=True)
class Call:
    """A call_function node whose target is one of `targets`, with its arguments matched in schema order."""

    targets: tuple[Any, ...]
    args: tuple[Any, ...]
    kwargs: tuple[tuple[str, Any], ...]
    name: str | None  # bind the node itself under this name
    commutative: bool  # also try the first two arguments swapped (add, mul)


@dataclass(frozen=True)
class OneOf:
    """The first alternative that matches (used for optional casts and op variants)."""

    alternatives: tuple[Any, ...]


def call(targets, *args, name: str | None = None, commutative: bool = False, **kwargs) -> Call:
    targets = targets if isinstance(targets, tuple) else (targets,)
    return Call(targets, args, tuple(kwargs.items()), name, commutative)


def one_of(*alternatives) -> OneOf:
    return OneOf(alternatives)


def maybe(targets, inner, *args, **kwargs) -> OneOf:
    """`targets(inner, *args)` or just `inner`: an optional wrapper such as an identity cast."""
    return OneOf((call(targets, inner, *args, **kwargs), inner))


_MISSING = object()


def bind_arguments(node: fx.Node) -> dict[str, Any] | None:
    """The node's arguments by schema name, defaults filled in (None when the target has no schema)."""
    schema = getattr(node.target, "_schema", None)
    if schema is None:
        return None
    out: dict[str, Any] = {}
    positional = list(node.args)
    for i, arg in enumerate(schema.arguments):
        if i < len(positional) and not arg.kwarg_only:
            out[arg.name] = positional[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = _MISSING
    return out


def _literal_equal(pattern: Any, value: Any) -> bool:
    if isinstance(pattern, (list, tuple)):
        return isinstance(value, (list, tuple)) and len(pattern) == len(value) and all(
            _literal_equal(p, v) for p, v in zip(pattern, value))
    if isinstance(value, fx.Node) or isinstance(pattern, fx.Node):
        return pattern is value
    if isinstance(pattern, bool) or isinstance(value, bool):
        return type(pattern) is type(value) and pattern == value
    if isinstance(pattern, (int, float)) and isinstance(value, (int, float)):
        return float(pattern) == float(value)
    return pattern == value


def _bind(name: str, value: Any, b: Bindings) -> Bindings | None:
    if name in b:
        old = b[name]
        same = old is value if isinstance(old, fx.Node) or isinstance(value, fx.Node) else _literal_equal(old, value)
        return b if same else None
    return {**b, name: value}


def match(pattern: Any, value: Any, b: Bindings | None = None) -> Bindings | None:
    """Bindings extending `b` under which `value` (a node or literal) has the shape of `pattern`, else None."""
    b = {} if b is None else b
    if pattern is ANY:
        return b
    if isinstance(pattern, V):
        if pattern.when is not None and not pattern.when(value):
            return None
        return _bind(pattern.name, value, b)
    if isinstance(pattern, OneOf):
        for alt in pattern.alternatives:
            got = match(alt, value, b)
            if got is not None:
                return got
        return None
    if isinstance(pattern, Call):
        return _match_call(pattern, value, b)
    if isinstance(pattern, (list, tuple)):
        if not isinstance(value, (list, tuple)) or len(pattern) != len(value):
            return None
        for p, v in zip(pattern, value):
            b = match(p, v, b)
            if b is None:
                return None
        return b
    return b if _literal_equal(pattern, value) else None


def _match_call(pattern: Call, node: Any, b: Bindings) -> Bindings | None:
    if not isinstance(node, fx.Node) or node.op != "call_function" or node.target not in pattern.targets:
        return None
    if pattern.name is not None:
        b = _bind(pattern.name, node, b)
        if b is None:
            return None
    bound = bind_arguments(node)
    if bound is None:  # operator.getitem and other schemaless callables: positional only
        if pattern.kwargs or len(pattern.args) != len(node.args) or node.kwargs:
            return None
        return match(tuple(pattern.args), tuple(node.args), b)
    names = list(bound)
    wanted: dict[str, Any] = dict(zip(names, pattern.args))
    wanted.update(dict(pattern.kwargs))
    orders = [wanted]
    if pattern.commutative and len(names) >= 2:
        orders.append({**wanted, names[0]: wanted.get(names[1]), names[1]: wanted.get(names[0])})
    schema_args = {a.name: a for a in node.target._schema.arguments}
    for want in orders:
        got: Bindings | None = b
        for name, value in bound.items():
            if name in want:
                got = match(want[name], value, got)
            elif schema_args[name].has_default_value():  # left out of the pattern: must be the default
                got = got if _literal_equal(schema_args[name].default_value, value) else None
            else:
                got = None
            if got is None:
                break
        if got is not None:
            return got
    return None


# ---------------------------------------------------------------------- facts about captured values
def val(node: Any) -> Any:
    """The fake value export recorded for a node (a FakeTensor, SymInt or literal)."""
    return node.meta.get("val") if isinstance(node, fx.Node) else node


def shape(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def dtype(node: Any) -> torch.dtype | None:
    v = val(node)
    return v.dtype if isinstance(v, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    """True when two sizes (ints, SymInts or size nodes) are provably equal for every input."""
    a, b = val(a), val(b)
    if a is None or b is None:
        return False
    return bool(statically_known_true(a == b))


def same_sizes(a: Iterable[Any], b: Iterable[Any]) -> bool:
    a, b = list(a), list(b)
    return len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b))


def is_dim(value: Any, rank: int, dim: int) -> bool:
    """`value` names dimension `dim` (>= 0) of a rank-`rank` tensor, counting from either end."""
    if not isinstance(value, int) or isinstance(value, bool) or not -rank <= value < rank:
        return False
    return value % rank == dim


def swaps(d0: Any, d1: Any, rank: int, i: int, j: int) -> bool:
    """`transpose(d0, d1)` on a rank-`rank` tensor exchanges dims i and j."""
    return (is_dim(d0, rank, i) and is_dim(d1, rank, j)) or (is_dim(d0, rank, j) and is_dim(d1, rank, i))


def full_slice_end(value: Any, size: Any) -> bool:
    """`value` is a slice end that reaches the end of a dimension of `size` (INT64_MAX or the size)."""
    return (isinstance(value, int) and value >= 2**62) or same_size(value, size)


GETITEM = operator.getitem
