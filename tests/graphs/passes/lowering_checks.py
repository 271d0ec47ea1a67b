"""Checks shared by the lowering-pass tests: op counts of a program, and "the lowered program is the same
function" (prefill logits and greedy tokens through the KV cache, lowered vs unlowered ExportedProgram)."""

from __future__ import annotations

from collections import Counter

import torch
from torch.export import ExportedProgram

from qwen3export.generation import greedy_generate, left_pad
from qwen3export.parity import logits_errors

# a left-padded batch: row 1 has 3 padding positions, so the mask's padding rule is exercised
PROMPTS = [[151644, 872, 198, 9707, 11, 151667], [5, 6, 7]]


def op_counts(ep: ExportedProgram) -> Counter:
    """Call counts by op name without overload: "qwen3export.attention", "aten.rsqrt", ..."""
    out: Counter = Counter()
    for node in ep.graph.nodes:
        if node.op == "call_function":
            schema = getattr(node.target, "_schema", None)
            name = schema.name if schema is not None else getattr(node.target, "__name__", str(node.target))
            out[name.replace("::", ".")] += 1
    return out


def custom_op_counts(ep: ExportedProgram) -> dict[str, int]:
    return {k.split(".", 1)[1]: v for k, v in op_counts(ep).items() if k.startswith("qwen3export.")}


def rank5_softmaxes(ep: ExportedProgram) -> int:
    return sum(1 for n in ep.graph.nodes if n.op == "call_function" and n.target is torch.ops.aten.softmax.int
               and n.args[0].meta["val"].dim() == 5)


def assert_same_function(before: ExportedProgram, after: ExportedProgram, model, steps: int = 16,
                         atol: float = 1e-5) -> None:
    """Greedy decode through both programs' KV caches: identical tokens, logits within `atol` (fp32) of each
    row's scale (parity.logits_errors "scaled": max|got - want| / max(1, max|want|); the presets' trained
    statistics put logits at ~20, where fp32 op-order differences alone reach ~1e-5 absolute).
    Prefill logits are compared at real positions: the lowered attention gives a query that sees no key
    (left padding) zeros where the plain graph averages masked keys (kernels/ops.py)."""
    ids, mask = left_pad(PROMPTS)
    want, want_prefill, want_steps = greedy_generate(before.module(), model.empty_cache(2), ids, mask, steps, True)
    got, got_prefill, got_steps = greedy_generate(after.module(), model.empty_cache(2), ids, mask, steps, True)
    assert got.tolist() == want.tolist()
    real = mask.bool()
    assert logits_errors(got_prefill[real], want_prefill[real])["scaled"] <= atol
    assert logits_errors(torch.stack(got_steps), torch.stack(want_steps))["scaled"] <= atol


def assert_unchanged(ep: ExportedProgram, nodes_before: int) -> None:
    """The pass left its input program as it was (it rewrites a copy)."""
    assert len(ep.graph.nodes) == nodes_before
    assert not custom_op_counts(ep)
