"""Lowering passes over captured Qwen3 graphs (one pass per file): plain-op subgraphs -> qwen3export:: ops.

`lower(ep) -> (ep, {pass: sites})` runs DEFAULT_PASSES in order (graphs/passes/lowering.py).
"""

from .fuse_add_rms_norm import fuse_add_rms_norm
from .fuse_projections import fuse_projections
from .fuse_qk_norm_rope import fuse_qk_norm_rope
from .fuse_rms_norm import fuse_rms_norm
from .lowering import DEFAULT_PASSES, PATTERNS, lower, run_passes
from .replace_attention import replace_attention
from .replace_moe import replace_moe
from .rewrite import PassResult, UnloweredSiteWarning

__all__ = ["DEFAULT_PASSES", "PATTERNS", "PassResult", "UnloweredSiteWarning", "fuse_add_rms_norm", "fuse_projections",
           "fuse_qk_norm_rope", "fuse_rms_norm", "lower", "replace_attention", "replace_moe", "run_passes"]
