"""fuse_add_rms_norm: the residual add before a qwen3export::rms_norm folds into qwen3export::add_rms_norm."""

from __future__ import annotations

import warnings

from lowering_checks import assert_same_function, custom_op_counts, op_counts

from qwen3export.graphs.passes import fuse_add_rms_norm, fuse_rms_norm


def test_residual_adds_fold_into_the_norm_after_them(captured):
    model, ep = captured("tiny-moe")
    normed = fuse_rms_norm(ep).program
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        result = fuse_add_rms_norm(normed)
    # every hidden norm but layer 0's input norm (it reads the embedding); q/k norms read projections
    assert result.sites == 6
    assert custom_op_counts(result.program) == {"rms_norm": 7, "add_rms_norm": 6}
    assert op_counts(result.program)["aten.add"] == op_counts(normed)["aten.add"] - 6
    assert_same_function(ep, result.program, model, steps=4)


def test_plain_graph_has_nothing_to_fold(captured):
    _, ep = captured("tiny")
    result = fuse_add_rms_norm(ep)  # it reads rms_norm ops: run fuse_rms_norm first
    assert result.sites == 0 and not custom_op_counts(result.program)
