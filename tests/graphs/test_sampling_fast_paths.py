"""The sampling graph's fast paths (graphs/sampling.py): all-greedy ArgMax and the top-k candidates path.

Each is checked against (a) the full-vocabulary path that was the whole graph before (filter_weights +
inverse_cdf over the sorted vocabulary), (b) transformers' logits processors, and (c) ONNX Runtime running
the exported graph, bit for bit, on adversarial rows: ties at the k-th value, all-equal logits, -inf and
huge logits, batches mixing greedy and sampling rows, at V = 1,000 (K = 128 candidates < V) and at Qwen3's
V = 151,936.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from qwen3export import tokens
from qwen3export.graphs.sampling import (OUTPUT_NAMES, STATE_NAMES, TOPK_CANDIDATES, SamplingGraph,
                                         SamplingSession, SamplingVocab, emit_sampling_onnx, full_path, initial_state,
                                         pad_ids, penalize, topk_complete, topk_pick)

ODD = SamplingVocab(vocab_size=1000, think_id=990, end_think_id=991)
REAL = SamplingVocab(tokens.VOCAB_SIZE, tokens.THINK, tokens.END_THINK)


def adversarial_logits(rng: np.random.Generator, b: int, v: int) -> torch.Tensor:
    """[b, v] float32 rows of six kinds: gaussian at several scales, small integers (ties everywhere, also
    at the k-th value), all equal, a plateau of 25 tokens tied at the top around k = 20, -inf holes, huge."""
    kind = rng.integers(0, 6, size=b)
    x = rng.standard_normal((b, v)) * rng.choice([0.01, 1.0, 10.0, 300.0], size=(b, 1))
    for r in range(b):
        if kind[r] == 1:
            x[r] = rng.integers(-3, 4, size=v)
        elif kind[r] == 2:
            x[r] = 0.5
        elif kind[r] == 3:  # 25 tied tokens straddle top_k = 20 (and 130 straddle K = 128 when v allows)
            x[r] = rng.standard_normal(v)
            x[r, rng.choice(v, size=min(v, 25 if rng.random() < 0.5 else 130), replace=False)] = 9.0
        elif kind[r] == 4:
            x[r, rng.random(v) < 0.3] = -np.inf
            x[r, rng.integers(0, v)] = 1.0
        elif kind[r] == 5:
            x[r] = rng.choice([-3e38, 3e38, 1e30, -1e30, 0.0], size=v)
    return torch.tensor(x, dtype=torch.float32)


def params_batch(rng: np.random.Generator, b: int, mode: str) -> tuple[torch.Tensor, ...]:
    """(temperature, top_k, top_p, min_p, uniforms) [b]: "greedy" (all rows), "topk" (every row 0 < top_k <
    K) or "mixed" (greedy and top-k rows)."""
    temperature = rng.choice([1e-3, 0.6, 0.7, 1.0, 2.0], size=b).astype(np.float32)
    if mode == "greedy":
        temperature[:] = 0
    elif mode == "mixed":
        temperature[rng.random(b) < 0.4] = 0
    top_k = rng.choice([1, 2, 20, 50, TOPK_CANDIDATES - 1], size=b)
    top_p = rng.choice([1.0, 0.95, 0.8, 0.3, 1e-6], size=b).astype(np.float32)
    min_p = rng.choice([0.0, 0.0, 0.05, 1.0], size=b).astype(np.float32)
    u = rng.random(b, dtype=np.float32)
    u[rng.random(b) < 0.1] = 0.0
    u[rng.random(b) < 0.05] = 1.0
    return (torch.tensor(temperature), torch.tensor(top_k), torch.tensor(top_p), torch.tensor(min_p),
            torch.tensor(u))


def graph_inputs(rng, logits, params, vocab: SamplingVocab):
    """The graph's inputs in order: prompts of 8 random ids (every other opening <think>), penalties on."""
    b, v = logits.shape
    prompts = [rng.integers(0, v, size=8).tolist() + ([vocab.think_id] if r % 2 else []) for r in range(b)]
    state = initial_state(prompts, vocab)
    state["generated_ids"] = pad_ids([[i for i in row if i >= 0 and rng.random() < 0.5] + [int(row[0])] * 2
                                      for row in state["seen_ids"].tolist()])  # a subset, repeats
    temperature, top_k, top_p, min_p, u = params
    rep = torch.tensor(rng.choice([1.0, 1.1, 0.5], size=b), dtype=torch.float32)
    presence = torch.tensor(rng.choice([0.0, 1.5, -2.0], size=b), dtype=torch.float32)
    enable = torch.tensor(rng.random(b) < 0.5)
    budget = torch.tensor(rng.choice([-1, 0, 3], size=b))
    return (logits, *(state[n] for n in STATE_NAMES), temperature, top_k, top_p, min_p, rep, presence, enable,
            budget, u)


def candidates(scores: torch.Tensor, k: int, rng: np.random.Generator | None = None):
    """torch.topk's candidates, or (rng given) the same values with tied ids in a random order."""
    cand_s, cand_ids = torch.topk(scores, k, dim=-1)
    if rng is None:
        return cand_s, cand_ids
    perm = torch.tensor(rng.permuted(np.tile(np.arange(scores.shape[1]), (scores.shape[0], 1)), axis=1))
    shuffled = scores.gather(1, perm)
    s, pos = torch.sort(shuffled, dim=-1, descending=True, stable=True)  # ties in the shuffled order
    return s[:, :k], perm.gather(1, pos[:, :k])


# ---------------------------------------------------------------------- (a) against the full path
@pytest.mark.parametrize("vocab", [ODD, REAL], ids=["V1000", "V151936"])
@pytest.mark.parametrize("mode", ["greedy", "topk", "mixed"])
def test_topk_pick_equals_the_full_path(vocab, mode):
    """Wherever topk_complete admits a row, topk_pick on TopK's candidates (and on candidates whose ties are
    shuffled) returns the full path's token; the graph's own output equals the full path for every row."""
    rng = np.random.default_rng(vocab.vocab_size + len(mode))
    graph = SamplingGraph(vocab).eval()
    b = 64 if vocab is ODD else 12
    admitted = 0
    for _ in range(6 if vocab is ODD else 2):
        params = params_batch(rng, b, mode)
        args = graph_inputs(rng, adversarial_logits(rng, b, vocab.vocab_size), params, vocab)
        s = penalize(args[0], args[1], args[2], args[10], args[11])
        temperature, top_k, top_p, min_p, u = params
        want = full_path(s, temperature, top_k, top_p, min_p, u)
        k = min(vocab.vocab_size, TOPK_CANDIDATES)
        ok = topk_complete(torch.topk(s, k, dim=-1)[0], temperature, top_k, vocab.vocab_size)
        for shuffle in (None, rng):
            cand_s, cand_ids = candidates(s, k, shuffle)
            got = topk_pick(s, temperature, top_k, top_p, min_p, u, cand_s, cand_ids)
            assert torch.equal(got[ok], want[ok])
        if mode == "greedy":
            assert torch.equal(torch.argmax(s, dim=-1), want)
        admitted += int(ok.sum())
        with torch.no_grad():  # thinking on for every row and no row inside <think>: the graph's token is s's
            plain = (*args[:3], torch.zeros(b, dtype=torch.bool), *args[4:12], torch.ones(b, dtype=torch.bool),
                     *args[13:])
            assert torch.equal(graph(*plain)[0], want)
    assert admitted >= 0.3 * b * (6 if vocab is ODD else 2)  # the fast path decided many rows


def test_candidate_set_keeps_every_token_tied_with_the_kth():
    """30 tokens tied at the top with top_k 20: TopKLogitsWarper keeps all 30 (>= the 20th value), and so
    does the fast path, which each of them gets a share of u; 130 tied tokens (> K) fall back to the full
    path (topk_complete false) and still keep all 130."""
    v = ODD.vocab_size
    graph = SamplingGraph(ODD).eval()
    for tied in (30, 130):
        logits = torch.full((1, v), -5.0)
        ids = torch.randperm(v, generator=torch.Generator().manual_seed(tied))[:tied]
        logits[0, ids] = 4.0
        keep = TopKLogitsWarper(20)(None, logits.clone()) > float("-inf")
        assert int(keep.sum()) == tied
        n = 4 * tied
        u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
        state = initial_state([[]] * n, ODD)
        p = [torch.full((n,), x, dtype=d) for x, d in ((1.0, torch.float32), (20, torch.int64),
                                                       (1.0, torch.float32), (0.0, torch.float32),
                                                       (1.0, torch.float32), (0.0, torch.float32),
                                                       (True, torch.bool), (-1, torch.int64))]
        with torch.no_grad():
            token = graph(logits.expand(n, v), *(state[k] for k in STATE_NAMES), *p, u)[0]
        assert set(token.tolist()) == set(ids.tolist())
        assert bool(topk_complete(torch.topk(logits, TOPK_CANDIDATES)[0], p[0][:1], p[1][:1], v)) == (tied < 128)


# ---------------------------------------------------------------------- (b) against transformers
@pytest.mark.parametrize("top_k, top_p, min_p, temperature", [(20, 0.95, 0.0, 0.6), (20, 0.8, 0.0, 0.7),
                                                              (50, 1.0, 0.05, 1.0), (5, 0.5, 0.0, 1.3)])
def test_fast_path_distribution_matches_transformers(top_k, top_p, min_p, temperature):
    """Sweeping u over N grid points at V = 1000: each token's share is within 1/N of its probability under
    transformers' Temperature/TopK/TopP/MinP warpers, and exactly their surviving tokens are drawn."""
    n, v = 4096, ODD.vocab_size
    logits = torch.tensor(np.random.default_rng(top_k).standard_normal(v) * 3, dtype=torch.float32)
    scores = logits[None].clone()
    for proc in [TemperatureLogitsWarper(temperature), TopKLogitsWarper(top_k)] + (
            [TopPLogitsWarper(top_p)] if top_p < 1 else []) + ([MinPLogitsWarper(min_p)] if min_p else []):
        scores = proc(None, scores)
    want = scores.double().softmax(-1)[0]
    params = [torch.full((n,), x, dtype=d) for x, d in ((temperature, torch.float32), (top_k, torch.int64),
                                                        (top_p, torch.float32), (min_p, torch.float32))]
    u = (torch.arange(n, dtype=torch.float32) + 0.5) / n
    x = logits.expand(n, v)
    cand = torch.topk(x, TOPK_CANDIDATES, dim=-1)
    assert bool(topk_complete(cand[0], params[0], params[1], v).all())  # the fast path decides every row
    token = topk_pick(x, *params, u, *cand)
    share = torch.bincount(token, minlength=v).double() / n
    assert ((share - want).abs() <= 1.0 / n + 1e-6).all()
    assert set(token.tolist()) == set(torch.nonzero(want).flatten().tolist())


# ---------------------------------------------------------------------- (c) torch vs ONNX Runtime
@pytest.fixture(scope="module")
def odd_onnx(tmp_path_factory):
    graph = SamplingGraph(ODD, (5, 6, ODD.end_think_id)).eval()
    path = tmp_path_factory.mktemp("fast") / "sampling.onnx"
    emit_sampling_onnx(graph, path)
    return graph, SamplingSession(path), path


def assert_same(graph, session, args):
    with torch.no_grad():
        want = graph(*args)
    got = session(*args)
    for name, w, g in zip(OUTPUT_NAMES, want, got):
        assert w.dtype == g.dtype and torch.equal(w, g), name


def test_onnx_has_the_fast_paths_as_if_nodes(odd_onnx):
    import onnx

    model = onnx.load(str(odd_onnx[2]))
    assert [n.op_type for n in model.graph.node].count("If") >= 1
    inner = [n for g in model.graph.node if g.op_type == "If" for a in g.attribute for n in a.g.node]
    assert {"ArgMax", "TopK", "If"} <= {n.op_type for n in inner}


@pytest.mark.parametrize("mode", ["greedy", "topk", "mixed"])
def test_onnx_fast_paths_bit_identical_at_v1000(odd_onnx, mode):
    graph, session, _ = odd_onnx
    rng = np.random.default_rng(len(mode))
    for b in (1, 64, 64, 64):
        params = params_batch(rng, b, mode)
        assert_same(graph, session, graph_inputs(rng, adversarial_logits(rng, b, ODD.vocab_size), params, ODD))


@pytest.mark.parametrize("mode", ["greedy", "topk", "mixed"])
def test_onnx_fast_paths_bit_identical_at_qwen3_vocabulary(real_sampling, mode):
    """At V = 151,936: the session-wide export of tests/graphs/conftest.py (REAL, early stop 198, 271, </think>)."""
    graph, session = real_sampling
    assert graph.vocab == REAL
    rng = np.random.default_rng(100 + len(mode))
    for b in (1, 8):
        params = params_batch(rng, b, mode)
        assert_same(graph, session, graph_inputs(rng, adversarial_logits(rng, b, REAL.vocab_size), params, REAL))
