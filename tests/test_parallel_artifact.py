"""Parallel artifacts (qwen3export/parallel_artifact.py): per-rank parts written from weight-free captures,
loaded in N gloo processes, equal to the unsharded eager decoder; manifest ranks; errors before work."""

from __future__ import annotations

import time

import pytest
import torch

from qwen3export.errors import ArtifactError, InputError
from qwen3export.generation import greedy_generate, left_pad
from qwen3export.model import build_module
from qwen3export.parallel_artifact import ParallelEngine, run_parallel_artifact, write_parallel_artifact
from qwen3export.spec import preset
from qwen3export.weights import RandomSource

STEPS = 3


@pytest.mark.parametrize("name,overrides,tp,ep", [
    # 2 layers (dense, MoE) keep the weight-free captures short; tied embeddings across vocab shards
    ("tiny-moe", dict(num_hidden_layers=2), 2, 1),
    ("tiny-moe", dict(num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=4, tie_word_embeddings=True),
     2, 2),
])
def test_parallel_artifact_runs_like_eager(tmp_path, name, overrides, tp, ep):
    spec = preset(name, **overrides)
    source = RandomSource(spec, 0)
    art = write_parallel_artifact(tmp_path / "art", spec, source, tp, ep)
    m = art.manifest
    assert m["parallel"]["world"] == tp * ep and len(m["ranks"]) == tp * ep
    for r in m["ranks"]:
        assert all(f in m["files"] for f in r["files"])
        assert r["experts"] == [r["ep_rank"] * 8 // ep, (r["ep_rank"] + 1) * 8 // ep]
        heads = spec.num_attention_heads // tp
        assert r["heads"] == [r["tp_rank"] * heads, (r["tp_rank"] + 1) * heads]

    ids, mask = left_pad([[11, 500, 9000, 151643, 3], [spec.vocab_size - 1, 42]])
    eager = build_module(spec, source, torch.float32)
    tokens, prefill, steps = greedy_generate(eager, eager.empty_cache(2), ids, mask, STEPS, keep_logits=True)
    got = run_parallel_artifact(art.path, ids, mask, STEPS)  # N gloo processes stepped as one decoder
    assert torch.equal(got["tokens"], tokens)
    torch.testing.assert_close(got["prefill"], prefill, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got["steps"], torch.stack(steps, 1), atol=1e-4, rtol=1e-4)


def test_bad_degree_writes_nothing(tmp_path):
    spec = preset("tiny-moe")
    with pytest.raises(InputError, match=r"--ep 3 does not divide num_experts \(8\)"):
        write_parallel_artifact(tmp_path / "art", spec, RandomSource(spec, 0), 1, 3)
    assert not list(tmp_path.iterdir())


def test_tampered_part_is_refused_before_ranks_start(tmp_path):
    spec = preset("tiny", num_hidden_layers=1)
    art = write_parallel_artifact(tmp_path / "art", spec, RandomSource(spec, 0), 2, 1)
    w = art.path / "rank1" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 1
    w.write_bytes(bytes(data))
    ids, mask = left_pad([[1, 2]])
    with pytest.raises(ArtifactError, match="rank1/weights.safetensors does not match its sha256"):
        run_parallel_artifact(art.path, ids, mask, 1)


def test_rank_error_is_one_line_not_a_hang(tmp_path):
    """A step every rank refuses (a KV cache handle used twice) closes the engine with one line, at once."""
    spec = preset("tiny", num_hidden_layers=1)
    art = write_parallel_artifact(tmp_path / "art", spec, RandomSource(spec, 0), 2, 1)
    ids, mask = left_pad([[1, 2, 3]])
    pos = torch.arange(3)[None]
    with ParallelEngine(art) as engine:
        logits, present = engine(ids, pos, mask, engine.empty_cache(1))
        eager = build_module(spec, RandomSource(spec, 0), torch.float32)
        torch.testing.assert_close(logits, eager(ids, pos, mask, eager.empty_cache(1))[0], atol=1e-4, rtol=1e-4)
        step = (torch.tensor([[4]]), torch.tensor([[3]]), torch.ones(1, 4, dtype=torch.int64))
        engine(*step, present)
        t0 = time.perf_counter()
        with pytest.raises(ArtifactError, match=r"rank \d failed: KeyError"):
            engine(*step, present)  # consumed by the previous step
        assert time.perf_counter() - t0 < 30 and all(p.exitcode is not None for p in engine._procs)
