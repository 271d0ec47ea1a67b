"""Whole-model check of the Triton kernels: the eager decoder routed through the qwen3export:: custom ops,
with the kernels run by Triton's interpreter on CPU, gives the pure-torch model's greedy tokens."""

from __future__ import annotations

import os

import pytest
import torch

import qwen3export
from qwen3export.generation import greedy_generate, left_pad


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
def test_kernel_backed_decoder_matches_pure_torch(name, monkeypatch):
    monkeypatch.setenv("QWEN3EXPORT_TRITON_INTERPRET", "1")  # read at call time by kernels/ops.py
    assert os.environ.get("TRITON_INTERPRET") == "1"  # set before triton's import (tests/conftest.py)
    ref = qwen3export.load_model(name, seed=3)
    ker = qwen3export.load_model(name, seed=3).use_custom_ops()
    ids, mask = left_pad([[151644, 872, 198, 9707, 11, 151667], [5, 6, 7]])
    with torch.no_grad():
        want, want_logits, _ = greedy_generate(ref, ref.empty_cache(2), ids, mask, 8)
        got, got_logits, _ = greedy_generate(ker, ker.empty_cache(2), ids, mask, 8)
    real = mask.bool()
    assert (got_logits - want_logits)[real].abs().max().item() <= 1e-4
    assert got.tolist() == want.tolist()


def test_custom_ops_really_run_the_kernels(monkeypatch):
    """Guard against a silent fallback: a broken Triton launcher changes the result when the interpreter
    path is on, and does not when it is off (CPU tensors then take the pure-torch reference)."""
    import qwen3export.kernels.ops as ops

    model = qwen3export.load_model("tiny").use_custom_ops()
    ids = torch.tensor([[1, 2, 3]])
    mask = torch.ones_like(ids)

    def logits():
        with torch.no_grad():
            return model(ids, torch.arange(3)[None], mask, model.empty_cache(1))[0]

    monkeypatch.setenv("QWEN3EXPORT_TRITON_INTERPRET", "1")
    good = logits()
    real = ops.rms_norm
    monkeypatch.setattr(ops, "rms_norm", lambda x, w, eps, config=None: real(x, w, eps, config) * 2)
    assert (good - logits()).abs().max().item() > 1e-3
    monkeypatch.delenv("QWEN3EXPORT_TRITON_INTERPRET")
    assert (good - logits()).abs().max().item() <= 1e-5
