"""Lower stage: the captured decoder's plain-op subgraphs -> `qwen3export::` custom ops, one ordered
list of passes; `lower` returns the new program and how many sites each pass replaced (the manifest's
`lowering` entry)."""

from __future__ import annotations

import logging
from typing import Callable, Sequence

from torch.export import ExportedProgram

from .fuse_add_rms_norm import PATTERNS as ADD_RMS_NORM_PATTERNS
from .fuse_add_rms_norm import fuse_add_rms_norm
from .fuse_projections import PATTERNS as PROJECTION_PATTERNS
from .fuse_projections import fuse_projections
from .fuse_qk_norm_rope import PATTERNS as QK_NORM_ROPE_PATTERNS
from .fuse_qk_norm_rope import fuse_qk_norm_rope
from .fuse_rms_norm import PATTERNS as RMS_NORM_PATTERNS
from .fuse_rms_norm import fuse_rms_norm
from .replace_attention import PATTERNS as ATTENTION_PATTERNS
from .replace_attention import replace_attention
from .replace_moe import PATTERNS as MOE_PATTERNS
from .replace_moe import replace_moe
from .rewrite import Pattern, PassResult

log = logging.getLogger("qwen3export.lower")
Pass = Callable[[ExportedProgram], PassResult]

DEFAULT_PASSES: tuple[Pass, ...] = (
    # 1. attention block: q/k norms + RoPE first, so that the generic norm pass does not split them off
    fuse_qk_norm_rope,
    replace_attention,
    # 2. feed-forward: routed experts (dense MLP layers stay as they are: plain GEMMs)
    replace_moe,
    # 3. the residual stream: hidden-size norms, then the residual add folded into the norm after it
    fuse_rms_norm,
    fuse_add_rms_norm,
    # 4. the GEMMs: q/k/v and gate/up, each group reading one normed input, -> one linear + split (last, so
    #    that the attention and norm patterns above see the projections as the model wrote them)
    fuse_projections,
)

# pass name -> the (pattern, check) entries it tries at each candidate node, first match wins
PATTERNS: dict[str, tuple[Pattern, ...]] = {
    "qk_norm_rope": QK_NORM_ROPE_PATTERNS,
    "attention": ATTENTION_PATTERNS,
    "moe": MOE_PATTERNS,
    "rms_norm": RMS_NORM_PATTERNS,
    "add_rms_norm": ADD_RMS_NORM_PATTERNS,
    "projections": PROJECTION_PATTERNS,
}


def run_passes(ep: ExportedProgram, passes: Sequence[Pass] = DEFAULT_PASSES,
               progress: Callable[[str], None] | None = None) -> tuple[ExportedProgram, list[PassResult]]:
    """Apply `passes` in order; each reads the previous one's program. -> (program, per-pass results)."""
    results = []
    for p in passes:
        result = p(ep)
        ep = result.program
        results.append(result)
        line = f"lower: {result.name}: {result.sites} site(s)"
        log.info(line)
        if progress is not None:
            progress(line)
    return ep, results


def lower(ep: ExportedProgram, passes: Sequence[Pass] = DEFAULT_PASSES,
          progress: Callable[[str], None] | None = None) -> tuple[ExportedProgram, dict[str, int]]:
    """-> (lowered program, {pass name: sites replaced}), e.g. for tiny-moe
    {"qk_norm_rope": 3, "attention": 3, "moe": 2, "rms_norm": 7, "add_rms_norm": 6, "projections": 4}
    (q/k/v in every layer, gate/up in the dense layer 0).

    The input program is left as it was. A site that a pass cannot prove equal to its op stays in plain
    ATen ops and is warned about (UnloweredSiteWarning): the program is always the same function.
    """
    ep, results = run_passes(ep, passes, progress)
    return ep, {r.name: r.sites for r in results}
