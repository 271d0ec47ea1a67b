"""ONNX translations of the qwen3export:: ops (qwen3export/backends/onnx_ops.py), both flavours: the lowered
decoder exported with each table and run by ONNX Runtime's CPU provider against eager PyTorch, and the op
types each flavour emits."""

from __future__ import annotations

import functools
from collections import Counter

import numpy as np
import onnx
import pytest
import torch

import qwen3export
from qwen3export.backends.onnx import OPSET
from qwen3export.backends.onnx_ops import bake_weight_layouts, custom_translation_table
from qwen3export.graph_capture import capture
from qwen3export.generation import greedy_generate, left_pad, position_ids_from_mask
from qwen3export.graphs.passes import lower

from ort_step import PROMPTS, OrtStep
from ort_step import export as export_program



pytestmark = pytest.mark.usefixtures("one_thread")


@functools.cache
def lowered(name: str):
    model = qwen3export.load_model(name, seed=2)
    ep, report = lower(capture(model))
    return model, ep, report


def export(ep, spec, flavour: str):
    return export_program(ep, spec, custom_translation_table(flavour), OPSET)


def op_types(program) -> Counter:
    """domain::op_type counts over the graph and its subgraphs (If branches)."""
    return Counter(f"{n.domain}::{n.op_type}" for n in program.model.graph.all_nodes())


@pytest.mark.parametrize("name", ["tiny", "tiny-moe"])
@pytest.mark.parametrize("flavour", ["ort", "standard"])
def test_lowered_decoder_matches_eager_in_onnx_runtime(name, flavour, tmp_path):
    model, ep, report = lowered(name)
    spec, layers = model.spec, model.spec.num_hidden_layers
    program = export(ep, spec, flavour)
    baked = bake_weight_layouts(program.model)
    types = op_types(program)
    if flavour == "ort":
        assert baked == report["moe"]  # fc1 interleaved into an initializer, not recomputed per run
        assert types["com.microsoft::GroupQueryAttention"] == types["com.microsoft::MultiHeadAttention"] == layers
        assert types["com.microsoft::RotaryEmbedding"] == 2 * layers
        assert types["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * layers
        assert types["::SimplifiedLayerNormalization"] == 1 + 2 * layers  # layer 0's input norm + q/k norms
        assert types["com.microsoft::MoE"] == report["moe"]
        assert types["::Softmax"] == types["::TopK"] == 0
        for node in (n for n in program.model.graph if n.op_type == "MoE"):
            assert_interleaved(node.inputs[2], ep.state_dict)
    else:  # every node an ai.onnx op at the model's opset: what TensorRT's parser reads
        assert baked == 0
        assert all(key.startswith("::") and onnx.defs.has(key[2:], OPSET, "") for key in types), types
        assert types["::Softmax"] == layers + report["moe"]
        # each MoE: an If between the gathered top-k experts (decode: T * k <= E; here batch 2 x top-2 <= 8
        # experts) and every expert (prefill: 12 tokens x 2 > 8); the steps below take both branches
        assert types["::If"] == report["moe"] and types["::Gather"] >= 2 * report["moe"]
    path = tmp_path / "decoder.onnx"
    program.save(str(path))
    step = OrtStep(path, spec)

    ids, mask = left_pad(PROMPTS)
    want, want_prefill, want_steps = greedy_generate(model, model.empty_cache(2), ids, mask, 16, keep_logits=True)
    got, got_prefill, got_steps = greedy_generate(step, model.empty_cache(2), ids, mask, 16, keep_logits=True)
    assert got.tolist() == want.tolist()
    real = mask.bool()
    assert (got_prefill - want_prefill)[real].abs().max().item() <= 1e-4
    assert max((g - w).abs().max().item() for g, w in zip(got_steps, want_steps)) <= 1e-4

    # a 3-token step over a 6-token cache with batch 2: ORT's GQA refuses it, the If takes MultiHeadAttention
    more = torch.cat((mask, torch.ones(2, 3, dtype=mask.dtype)), 1)
    nxt, pos = torch.tensor([[11, 12, 13], [14, 15, 16]]), position_ids_from_mask(more)[:, -3:]
    with torch.no_grad():
        _, want_past = model(ids, position_ids_from_mask(mask), mask, model.empty_cache(2))
        want_more, _ = model(nxt, pos, more, want_past)
    _, got_past = step(ids, position_ids_from_mask(mask), mask, model.empty_cache(2))
    got_more, _ = step(nxt, pos, more, got_past)
    assert (got_more - want_more).abs().max().item() <= 1e-4


def test_unknown_flavour_is_refused():
    with pytest.raises(ValueError, match="ort, standard"):
        custom_translation_table("tensorrt")


def assert_interleaved(fc1, state_dict) -> None:
    """The fc1 layout ORT's CPU MoE reads (DESIGN §5): row 2j is gate row j, row 2j + 1 is up row j."""
    gate_up = state_dict[fc1.name.removesuffix(".interleaved")].detach().numpy()  # [E, 2I, H], gate rows first
    got, inter = fc1.const_value.numpy(), gate_up.shape[1] // 2
    assert np.array_equal(got[:, 0::2], gate_up[:, :inter]) and np.array_equal(got[:, 1::2], gate_up[:, inter:])
