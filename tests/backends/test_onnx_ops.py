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
        # one GroupQueryAttention per layer over the shared cache buffer: no If, no MultiHeadAttention fallback,
        # no slicing of the cache (issue 18 item 2)
        assert types["com.microsoft::GroupQueryAttention"] == layers
        assert types["com.microsoft::MultiHeadAttention"] == types["::If"] == 0
        assert types["com.microsoft::RotaryEmbedding"] == 2 * layers
        assert types["com.microsoft::SkipSimplifiedLayerNormalization"] == 2 * layers
        assert types["::SimplifiedLayerNormalization"] == 1 + 2 * layers  # layer 0's input norm + q/k norms
        assert types["com.microsoft::MoE"] == report["moe"]
        assert types["::Softmax"] == types["::TopK"] == 0
        for node in (n for n in program.model.graph if n.op_type == "MoE"):
            assert_interleaved(node.inputs[2], ep.state_dict)
        graph = program.model.graph
        assert [v.name for v in graph.inputs][:4] == ["input_ids", "position_ids", "attention_mask", "logits_index"]
        # logits_index is optional (an overridable initializer: empty = every position, what GenAI gets)
        assert graph.initializers["logits_index"].const_value.numpy().shape == (1, 0)
        gqa = [n for n in graph if n.op_type == "GroupQueryAttention"]
        # GQA's lengths computed once from the mask, as GenAI's model builder does, and shared by every layer
        assert {(n.inputs[5].name, n.inputs[6].name) for n in gqa} == {("seqlens_k", "total_sequence_length")}
        assert sorted(use.node.op_type for use in graph.inputs[2].uses()) == ["ReduceSum", "Shape"]
        for node in (n for n in graph if n.op_type == "GroupQueryAttention"):  # present = the past input's buffer
            assert node.outputs[1].name == node.inputs[3].name.replace("past_key_values", "present")
            assert node.outputs[1] in graph.outputs and node.inputs[3] in graph.inputs
        caches = [v for v in graph.inputs if v.name.startswith("past_key_values.")]
        # nothing but GQA reads the cache's data (the exporter may take the batch size from its Shape)
        assert {use.node.op_type for v in caches for use in v.uses()} <= {"GroupQueryAttention", "Shape"}
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

    # a 3-token step over a 6-token cache with batch 2 (ORT's GQA takes it one row at a time: the engine's slots)
    more = torch.cat((mask, torch.ones(2, 3, dtype=mask.dtype)), 1)
    nxt, pos = torch.tensor([[11, 12, 13], [14, 15, 16]]), position_ids_from_mask(more)[:, -3:]
    with torch.no_grad():
        _, want_past = model(ids, position_ids_from_mask(mask), mask, model.empty_cache(2))
        want_more, _ = model(nxt, pos, more, want_past)
    if flavour == "ort":
        slots = step.empty_cache(2)
        step.prefill(slots, [[t for t, m in zip(r, k) if m] for r, k in zip(ids.tolist(), mask.tolist())])
        got_more = torch.stack(step.prefill(slots, nxt.tolist(), all_logits=True))
    else:
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


@pytest.fixture(scope="module")
def cache_engine(tmp_path_factory):
    """tiny's ort-flavour decoder as the runner's CacheEngine: 3 slots of 40 positions."""
    model, ep, _ = lowered("tiny")
    path = tmp_path_factory.mktemp("cache") / "decoder.onnx"
    export(ep, model.spec, "ort").save(str(path))
    return model, OrtStep(path, model.spec, max_batch=3, max_seq=40)


def eager_logits(model, tokens: list[int]) -> torch.Tensor:
    """Eager logits [S, V] of one sequence from an empty cache (the reference each slot must reproduce)."""
    ids = torch.tensor([tokens])
    with torch.no_grad():
        return model(ids, torch.arange(len(tokens))[None], torch.ones_like(ids), model.empty_cache(1))[0][0]


def test_cache_engine_slots_join_and_leave_in_place(cache_engine):
    """Continuous batching on one buffer: sequences join (prefill into a free slot while another decodes) and leave
    (release) at token boundaries, each slot with its own length; every step's logits equal eager PyTorch's on that
    sequence alone, the cache stays the same memory and holds eager's keys."""
    model, engine = cache_engine
    ptrs = [b.__array_interface__["data"][0] for b in engine.buffers]
    seqs = {0: [5, 6, 7, 8, 9, 10, 11], 2: [300, 301]}
    engine.release([0, 1, 2])
    got = engine.prefill([0, 2], [seqs[0], seqs[2]])  # two fresh slots, not adjacent: right-padded, one call each
    for i, slot in enumerate((0, 2)):
        torch.testing.assert_close(got[i], eager_logits(model, seqs[slot])[-1], atol=1e-4, rtol=1e-4)
    for step in range(3):
        if step == 1:  # a request joins slot 1 between two decode steps
            seqs[1] = [42, 43, 44, 45]
            torch.testing.assert_close(engine.prefill([1], [seqs[1]])[0], eager_logits(model, seqs[1])[-1],
                                       atol=1e-4, rtol=1e-4)
        slots = sorted(seqs)
        tokens = [100 + step + s for s in slots]
        got = engine.decode(slots, tokens)
        for i, slot in enumerate(slots):
            seqs[slot].append(tokens[i])
            torch.testing.assert_close(got[i], eager_logits(model, seqs[slot])[-1], atol=1e-4, rtol=1e-4)
    assert engine.lengths.tolist() == [len(seqs[s]) for s in range(3)]
    engine.release([0])  # slot 0 leaves; slot 1 and 2 go on
    del seqs[0]
    got = engine.decode([1, 2], [7, 8])
    for i, slot in enumerate((1, 2)):
        seqs[slot].append((7, 8)[i])
        torch.testing.assert_close(got[i], eager_logits(model, seqs[slot])[-1], atol=1e-4, rtol=1e-4)
    assert [b.__array_interface__["data"][0] for b in engine.buffers] == ptrs  # updated in place, never reallocated
    with torch.no_grad():
        ids = torch.tensor([seqs[2]])
        _, present = model(ids, torch.arange(ids.shape[1])[None], torch.ones_like(ids), model.empty_cache(1))
    n = len(seqs[2])
    torch.testing.assert_close(torch.from_numpy(engine.buffers[0][2, :, :n]), present[0][0][0], atol=1e-5, rtol=1e-5)


def test_cache_engine_prefill_computes_the_lm_head_at_the_asked_positions_only(cache_engine):
    """logits_index picks the rows the lm_head runs on: generation asks for the last position ([B, 1, V] from the
    session, not [B, S, V]); parity asks for all and gets eager's logits at every position."""
    model, engine = cache_engine
    prompt = list(range(20, 33))
    engine.release([0])
    engine.prefill([0], [prompt])
    engine.release([0])
    assert list(engine.run_rows(0, np.array([prompt]), np.arange(13)[None], np.array([13]),
                            np.array([[12]])).shape) == [1, 1, model.spec.vocab_size]
    engine.release([0])
    every = engine.prefill([0], [prompt], all_logits=True)[0]
    torch.testing.assert_close(every, eager_logits(model, prompt), atol=1e-4, rtol=1e-4)
    engine.release([0])


def test_cache_engine_refuses_what_its_buffer_cannot_hold(cache_engine):
    _, engine = cache_engine
    engine.release([0, 1, 2])
    with pytest.raises(qwen3export.errors.InputError, match="over the engine's 40 per sequence"):
        engine.prefill([0], [list(range(41))])
    with pytest.raises(qwen3export.errors.InputError, match="slot 3 is out of range"):
        engine.prefill([3], [[1, 2]])
    with pytest.raises(qwen3export.errors.InputError, match="prefill it first"):
        engine.decode([1], [5])
