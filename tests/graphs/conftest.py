"""The sampling graph at Qwen3's real vocabulary (V = 151,936), exported to ONNX once per session: test_sampling.py
and test_sampling_fast_paths.py both compare it with ONNX Runtime, and each export is ~10 s on 2 cores."""

from __future__ import annotations

import pytest

from qwen3export import tokens
from qwen3export.graphs.sampling import SamplingGraph, SamplingSession, SamplingVocab, emit_sampling_onnx

# a three-token forced early stop ending in </think>, the one both modules used (198, 271: '\n', '\n\n')
REAL_EARLY_STOP = (198, 271, tokens.END_THINK)


@pytest.fixture(scope="session")
def real_sampling(tmp_path_factory):
    """(SamplingGraph in eval mode, SamplingSession over its ONNX) at V = 151,936 with <think> 151667 / </think>
    151668. Shared: tests only call both (under torch.no_grad for the graph), never change them."""
    graph = SamplingGraph(SamplingVocab(tokens.VOCAB_SIZE, tokens.THINK, tokens.END_THINK), REAL_EARLY_STOP).eval()
    path = tmp_path_factory.mktemp("sampling_real") / "sampling.onnx"
    emit_sampling_onnx(graph, path)
    return graph, SamplingSession(path)
