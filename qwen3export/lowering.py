"""The lower stage: the graph passes (graphs/passes) over a captured program, and the manifest's `lowering` record."""

from __future__ import annotations

import warnings

from qwen3export.graphs.passes import DEFAULT_PASSES, PATTERNS, UnloweredSiteWarning, run_passes

from .manifest import LoweringRecord
from .stages import Progress


def lowering_record(results) -> LoweringRecord:
    """The manifest's `lowering` entry: sites replaced per pass (0 for every pass when lowering is off)
    and the passes' notes (sites left in plain ops, with why)."""

    if results is None:
        return {"enabled": False, "passes": {name: 0 for name in PATTERNS}, "notes": []}
    return {"enabled": True, "passes": {r.name: r.sites for r in results},
            "notes": [note for r in results for note in r.notes]}


# AOTInductor calls torch.library.custom_op ops back through Python: a lowered .pt2 loads only where
# qwen3export is imported (torch: "Could not find schema for qwen3export::rms_norm. Custom operators
# created via torch.library.custom_op cannot be run via AOTI without Python environment"), and on CPU the
# ops would run their pure-torch references op by op where Inductor fuses the plain-op graph itself
# (tiny, batch-1 decode over 64 cached tokens, 1 thread: 4.3 ms/step lowered vs 2.8 ms unlowered, measured)
UNLOWERED = {
    "aoti": "aoti compiles the captured (unlowered) program: its Python-registered qwen3export:: ops would tie "
            "the .pt2 to a Python process with qwen3export imported, and Inductor fuses the plain-op graph itself",
    "kernels": "the kernel pack carries no graph: its Triton kernels are what lowered engines call",
}


def unlowered_record(backend: str, requested: bool) -> LoweringRecord:
    """The `lowering` entry of a backend that does not take the lowered program (UNLOWERED says why)."""
    record = lowering_record(None)
    record["notes"] = [UNLOWERED[backend]] if requested else []
    return record


def lower_program(ep, progress: Progress = lambda s: None, passes=None):
    """Run the lowering passes (default graphs/passes DEFAULT_PASSES); -> (lowered program, manifest record).
    A site a pass cannot prove equal to its op stays in plain ATen ops (correct, unfused): its warning goes
    to progress and into the record's notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnloweredSiteWarning)
        lowered, results = run_passes(ep, passes or DEFAULT_PASSES, progress=progress)
    for w in caught:
        if issubclass(w.category, UnloweredSiteWarning):
            progress(f"warning: {w.message}")
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return lowered, lowering_record(results)
