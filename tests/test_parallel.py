"""Tensor- and expert-parallel rank decoders (graphs/parallel.py) run as 2 and 4 gloo processes against
the unsharded eager Qwen3Decoder: identical greedy tokens, logits within 1e-4 (fp32), eager rank modules
and torch.export-ed ones. One process group per world size serves all of its configurations."""

from __future__ import annotations

import time

import pytest
import torch

from qwen3export.errors import InputError
from qwen3export.generation import greedy_generate, left_pad
from qwen3export.graph_capture import capture_rank
from qwen3export.graphs.parallel import RankLayout, build_rank_module, layouts, shard_weights
from qwen3export.model import build_module
from qwen3export.spec import preset
from qwen3export.weights import RandomSource

from parallel_helpers import run_greedy_jobs

STEPS = 4
TOL = dict(atol=1e-4, rtol=1e-4)

# tiny / tiny-moe have 4 query and 2 KV heads: tp 4 needs 8 / 4. The 4-rank dense model also has a
# vocabulary that 4 does not divide (last rank zero-padded) and the MoE one attention biases (o_proj's
# bias must be added once, after the all-reduce).
SPECS = {
    "tiny": preset("tiny"),
    "tiny-moe": preset("tiny-moe"),
    "tiny8h": preset("tiny", num_attention_heads=8, num_key_value_heads=4, vocab_size=151939),
    "tiny-moe8h": preset("tiny-moe", num_attention_heads=8, num_key_value_heads=4, attention_bias=True),
}
CONFIGS = {  # world -> (job name, spec, tp, ep, exported)
    2: [("dense-tp2", "tiny", 2, 1, False), ("moe-tp2", "tiny-moe", 2, 1, False),
        ("moe-ep2", "tiny-moe", 1, 2, False), ("moe-tp2-exported", "tiny-moe", 2, 1, True),
        ("moe-ep2-exported", "tiny-moe", 1, 2, True)],
    4: [("dense-tp4", "tiny8h", 4, 1, False), ("moe-tp4", "tiny-moe8h", 4, 1, False),
        ("moe-ep4", "tiny-moe8h", 1, 4, False), ("moe-tp2-ep2", "tiny-moe8h", 2, 2, False)],
}


def prompts(spec):
    # ragged batch (left padding) and the last vocabulary id (the padded last rank's rows)
    return left_pad([[11, 500, 9000, 151643, 3, 77], [spec.vocab_size - 1, 42, 7]])


@pytest.fixture(scope="module")
def eager():
    out = {}
    for name, spec in SPECS.items():
        model = build_module(spec, RandomSource(spec, 0), torch.float32)
        ids, mask = prompts(spec)
        tokens, prefill, steps = greedy_generate(model, model.empty_cache(2), ids, mask, STEPS, keep_logits=True)
        out[name] = (tokens, prefill, torch.stack(steps, 1))
    return out


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """world -> {job: [per-rank results]}, each world size spawned once, lazily."""
    cache: dict[int, dict] = {}

    def get(world: int):
        if world not in cache:
            jobs = []
            for name, spec_name, tp, ep, exported in CONFIGS[world]:
                spec = SPECS[spec_name]
                ids, mask = prompts(spec)
                jobs.append(dict(name=name, spec=spec, source=RandomSource(spec, 0), tp=tp, ep=ep, exported=exported,
                                 input_ids=ids, attention_mask=mask, steps=STEPS))
            t0 = time.perf_counter()
            cache[world] = run_greedy_jobs(world, jobs, tmp_path_factory.mktemp(f"ranks{world}"))
            print(f"{world} ranks, {len(jobs)} configurations: {time.perf_counter() - t0:.1f} s")
        return cache[world]

    return get


@pytest.mark.parametrize("world,job", [(w, c) for w, cs in CONFIGS.items() for c in cs],
                         ids=[c[0] for cs in CONFIGS.values() for c in cs])
def test_ranks_match_unsharded_eager(ranked, eager, world, job):
    name, spec_name, *_ = job
    results = ranked(world)[name]
    tokens, prefill, steps = eager[spec_name]
    for rank, r in enumerate(results):  # every rank chose the same tokens as the unsharded model
        assert torch.equal(r["tokens"], tokens), f"rank {rank}"
    torch.testing.assert_close(results[0]["prefill"], prefill, **TOL)
    torch.testing.assert_close(results[0]["steps"], steps, **TOL)


def test_shards_partition_the_weights():
    """Query/KV heads, columns, experts and vocabulary rows split without overlap; KV cache per rank."""
    spec = SPECS["tiny-moe8h"]
    source = RandomSource(spec, 0)
    parts = [shard_weights(spec, source, r, 2, 2) for r in range(4)]
    q = "model.layers.0.self_attn.q_proj.weight"
    assert parts[0][q].shape == (4 * spec.head_dim, spec.hidden_size)
    torch.testing.assert_close(torch.cat([parts[0][q], parts[1][q]]), source.get(q), atol=0, rtol=0)
    torch.testing.assert_close(parts[2][q], parts[0][q], atol=0, rtol=0)  # replicated across EP groups
    gu = "model.layers.1.mlp.experts.gate_up_proj"
    assert parts[0][gu].shape == (4, spec.moe_intermediate_size, spec.hidden_size)  # 8/2 experts, 2 x 32/2 rows
    torch.testing.assert_close(parts[3][gu][3, :16], source.get("model.layers.1.mlp.experts.7.gate_proj.weight")[16:],
                               atol=0, rtol=0)
    layout = RankLayout(2, 2, 3)
    assert layout.to_dict(spec) == {"rank": 3, "tp_rank": 1, "ep_rank": 1, "heads": [4, 8], "kv_heads": [2, 4],
                                    "experts": [4, 8], "vocab": [75968, 151936]}
    assert build_rank_module(spec, layout, parts[3]).empty_cache(3)[0][0].shape == (3, 2, 0, spec.head_dim)


def test_rank_capture_needs_no_process_group():
    """torch.export of a rank runs on one process: the collectives are in the graph, by group role."""
    spec = SPECS["tiny-moe"]
    layout = RankLayout(2, 1, 0)
    ep = capture_rank(build_rank_module(spec, layout, shard_weights(spec, RandomSource(spec, 0), 0, 2, 1)))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    # embedding + 3 attention + 1 dense MLP (TP group) and 2 MoE (world) all-reduces, 1 logits all-gather
    assert targets.count("_c10d_functional.all_reduce.default") == 1 + 3 + 1 + 2
    assert targets.count("_c10d_functional.all_gather_into_tensor.default") == 1
    assert targets.count("_c10d_functional.wait_tensor.default") == 8


@pytest.mark.parametrize("spec_name,tp,ep,needle", [
    ("tiny", 3, 1, "--tp 3 does not divide num_attention_heads (4) of tiny; valid --tp: 1, 2"),
    ("tiny", 4, 1, "--tp 4 does not divide num_key_value_heads (2) of tiny; valid --tp: 1, 2"),
    ("tiny-moe", 1, 3, "--ep 3 does not divide num_experts (8) of tiny-moe; valid --ep: 1, 2, 4, 8"),
    ("tiny", 1, 2, "--ep 2 needs a mixture-of-experts model; tiny is dense"),
])
def test_bad_degrees_fail_before_any_process_starts(tmp_path, spec_name, tp, ep, needle):
    spec = SPECS[spec_name]
    ids, mask = prompts(spec)
    job = dict(name="bad", spec=spec, source=RandomSource(spec, 0), tp=tp, ep=ep, input_ids=ids,
               attention_mask=mask, steps=1)
    t0 = time.perf_counter()
    with pytest.raises(InputError) as e:
        run_greedy_jobs(tp * ep, [job], tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert time.perf_counter() - t0 < 1.0 and not list(tmp_path.iterdir())
    with pytest.raises(InputError, match="does not divide|needs a mixture"):
        layouts(spec, tp, ep)
    with pytest.raises(InputError, match="does not divide|needs a mixture"):
        shard_weights(spec, RandomSource(spec, 0), 0, tp, ep)


def test_world_size_must_match_the_layout(tmp_path):
    spec = SPECS["tiny-moe"]
    ids, mask = prompts(spec)
    job = dict(name="bad", spec=spec, source=RandomSource(spec, 0), tp=2, ep=2, input_ids=ids,
               attention_mask=mask, steps=1)
    with pytest.raises(InputError, match="tp 2 x ep 2 is not 2 ranks"):
        run_greedy_jobs(2, [job], tmp_path)
