"""Lowering-pass tests: one capture per preset family per session (~8 s each on this machine's 2 cores)."""

from __future__ import annotations

import pytest
import torch

import qwen3export
from qwen3export.graph_capture import capture

# dense; MoE with a dense layer 0 (mlp_only_layers); MoE every other layer (decoder_sparse_step=2)
FAMILIES = {
    "tiny": ("tiny", {}),
    "tiny-moe": ("tiny-moe", {}),
    "mixed": ("tiny-moe", dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=())),
}


@pytest.fixture(scope="session")
def captured():
    """family -> (eager model, its ExportedProgram), built on first use."""
    cache: dict = {}

    def get(family: str):
        if family not in cache:
            name, overrides = FAMILIES[family]
            model = qwen3export.load_model(name, seed=1, **overrides)
            cache[family] = (model, capture(model))
        return cache[family]

    return get


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine torch's thread pool makes the tiny ops of these
    graphs far slower (index_add_ on [3, 64]: 88 ms with 2 threads, 8 us with 1, measured under load)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
