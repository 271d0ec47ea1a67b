"""Parallel artifacts (qwen3export/parallel_artifact.py): per-rank weight shards, programs re-captured at load
in N gloo processes, equal to the unsharded eager decoder; manifest ranks; errors before work; a part that
carries a program (pickle: code) is refused and never loaded."""

from __future__ import annotations

import os
import pickle
import time
import zipfile

import pytest
import torch

from qwen3export.artifact import load_artifact, seal
from qwen3export.errors import ArtifactError, InputError
from qwen3export.generation import greedy_generate, left_pad
from qwen3export.model import build_module
from qwen3export.parallel_artifact import ParallelEngine, load_rank_program

from parallel_helpers import run_parallel_artifact, write_parallel_artifact
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
    assert sorted(m["files"]) == [f"rank{r}/weights.safetensors" for r in range(tp * ep)]  # data only, no program
    for r in m["ranks"]:
        assert r["files"] == [f"rank{r['rank']}/weights.safetensors"]
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


class _Payload:
    """Unpickling this makes the folder `marker`: the code a pickled .pt2 can run when loaded."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickled_pt2(path, marker) -> None:
    """A .pt2-shaped zip whose pickle runs a payload, as a hostile resealed artifact would carry."""
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("decoder/data.pkl", pickle.dumps(_Payload(marker)))


def test_part_carrying_a_pickled_program_is_refused_never_loaded(tmp_path):
    """Issue 16: a rank0/decoder.pt2 with a pickle payload, listed in a resealed manifest (anyone can recompute
    its hash), is refused before any rank process starts, and its code never runs."""
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps(_Payload(probe)))  # the payload is live: unpickling it runs code
    assert probe.is_dir()

    spec = preset("tiny", num_hidden_layers=1)
    art = write_parallel_artifact(tmp_path / "art", spec, RandomSource(spec, 0), 2, 1)
    marker = tmp_path / "payload-ran"
    _pickled_pt2(art.path / "rank0" / "decoder.pt2", marker)
    ids, mask = left_pad([[1, 2]])
    for resealed in (False, True):  # unlisted, then listed with valid checksums
        if resealed:
            seal(art.path, art.manifest)
            assert "rank0/decoder.pt2" in load_artifact(art.path).manifest["files"]
        with pytest.raises(ArtifactError, match=r"rank0/decoder\.pt2: a stored torch\.export program .* never "
                                                r"loaded: rebuild") as e:
            ParallelEngine(art)
        assert "\n" not in str(e.value)
        with pytest.raises(ArtifactError, match="never loaded"):
            load_rank_program(art, 1)  # a rank process checks its folder again
    with pytest.raises(ArtifactError, match="never loaded"):
        run_parallel_artifact(art.path, ids, mask, 1)
    assert not marker.exists()


def _rewrite_shard(path, how: str) -> None:
    from safetensors.torch import load_file, save_file

    if how == "garbage":
        path.write_bytes(b"\xff" * 64)
        return
    tensors = load_file(str(path))
    if how == "missing":
        del tensors["model.norm.weight"]
    else:  # fp16: names and shapes right, dtype wrong
        tensors["model.norm.weight"] = tensors["model.norm.weight"].half()
    save_file(tensors, str(path))


@pytest.mark.parametrize("how,needle", [
    ("missing", r"rank0/weights\.safetensors does not hold the tensors .*\(missing \['model\.norm\.weight'\]"),
    ("dtype", r"tensor model\.norm\.weight is F16 \[64\], the rank program re-captured .* wants F32 \[64\]"),
    ("garbage", r"rank0/weights\.safetensors is not a readable safetensors file"),
])
def test_shard_not_matching_the_recaptured_program_is_one_line(tmp_path, how, needle):
    spec = preset("tiny", num_hidden_layers=1)
    art = write_parallel_artifact(tmp_path / "art", spec, RandomSource(spec, 0), 2, 1)
    _rewrite_shard(art.path / "rank0" / "weights.safetensors", how)
    seal(art.path, art.manifest)
    with pytest.raises(ArtifactError, match=needle) as e:
        load_rank_program(load_artifact(art.path), 0)
    assert "\n" not in str(e.value) and str(e.value).endswith("rebuild the artifact with this version of qwen3export")
