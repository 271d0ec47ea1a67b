"""Thinking-mode control of the sampling graph (graphs/sampling.py), as properties over random models,
parameters and prompts (hypothesis): rollouts step the eager graph through `sample_step` as the runner
does, with a stand-in model whose logits come from a seed."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qwen3export.graphs.sampling import (SamplingGraph, SamplingParams, SamplingVocab, initial_state, mask_ids,
                                         sample_step)

V = 64
VOCAB = SamplingVocab(vocab_size=V, think_id=60, end_think_id=61)
THINK, END = VOCAB.think_id, VOCAB.end_think_id
EARLY_STOP = (5, 6, 7, END)
GRAPH = SamplingGraph(VOCAB, EARLY_STOP).eval()
NEG_INF = float("-inf")

PROPERTIES = settings(max_examples=40, deadline=None, database=None)

sampling = st.builds(
    SamplingParams,
    temperature=st.sampled_from([0.0, 0.3, 0.6, 1.0, 4.0]),
    top_k=st.sampled_from([0, 1, 5, 20, V, 500]),
    top_p=st.sampled_from([1.0, 0.95, 0.5, 0.01]),
    min_p=st.sampled_from([0.0, 0.05, 0.9]),
    repetition_penalty=st.sampled_from([1.0, 1.3, 0.7]),
    presence_penalty=st.sampled_from([0.0, 1.5, -2.0]),
)
plain_prompt = st.lists(st.integers(0, V - 1).filter(lambda t: t not in (THINK, END)), min_size=1, max_size=6)


def rollout(params: SamplingParams, prompt: list[int], steps: int, seed: int, shape_logits=None):
    """Step the graph `steps` times -> (tokens, states after each step). `shape_logits(step, logits)` edits
    the stand-in model's logits [1, V] in place."""
    rng = np.random.default_rng(seed)
    state = initial_state([prompt], VOCAB)
    p = params.to_tensors(1)
    tokens, states = [], []
    for step in range(steps):
        logits = torch.tensor(rng.standard_normal((1, V)) * 2, dtype=torch.float32)
        if shape_logits is not None:
            shape_logits(step, logits)
        token, state = sample_step(GRAPH, logits, state, p, rng)
        tokens.append(int(token))
        states.append({k: v.clone() for k, v in state.items()})
    return tokens, states


@PROPERTIES
@given(params=sampling, prompt=plain_prompt, seed=st.integers(0, 2**32 - 1), opened=st.booleans())
def test_thinking_off_never_yields_think(params, prompt, seed, opened):
    """Even a model that wants nothing but <think> (+30 on it) never gets it with thinking off; a prompt
    that already opened <think> is closed at once by the forced sequence (budget 0)."""
    params = params.replace(enable_thinking=False, thinking_budget=-1)

    def eager_to_think(step, logits):
        logits[0, THINK] += 30.0

    tokens, states = rollout(params, prompt + [THINK] * opened, 12, seed, eager_to_think)
    assert THINK not in tokens
    if opened:
        assert tuple(tokens[: len(EARLY_STOP)]) == EARLY_STOP
    assert not any(bool(s["in_think"]) for s in states[len(EARLY_STOP) * opened:])


@PROPERTIES
@given(params=sampling, prompt=plain_prompt, seed=st.integers(0, 2**32 - 1), budget=st.integers(0, 8),
       from_prompt=st.booleans())
def test_budget_n_gives_exactly_n_thinking_tokens_then_the_forced_sequence(params, prompt, seed, budget,
                                                                          from_prompt):
    """The model never closes (</think> at -inf). Thinking starts from the prompt or from the model's own
    <think> at step 0; then exactly `budget` sampled tokens, then the forced sequence, whose last token
    </think> ends thinking; think_spent ends at the budget."""
    params = params.replace(enable_thinking=True, thinking_budget=budget)

    def never_closes(step, logits):
        logits[0, END] = NEG_INF
        if step == 0 and not from_prompt:
            logits[0, THINK] = 1e4

    start = 0 if from_prompt else 1  # index of the first token after <think>
    n = start + budget + len(EARLY_STOP) + 3
    tokens, states = rollout(params, prompt + [THINK] * from_prompt, n, seed, never_closes)
    if not from_prompt:
        assert tokens[0] == THINK
    sampled = tokens[start: start + budget]
    forced = tokens[start + budget: start + budget + len(EARLY_STOP)]
    assert END not in sampled and tuple(forced) == EARLY_STOP
    assert all(int(s["forced_pos"]) == -1 for s in states[: start + budget])
    assert all(bool(s["in_think"]) for s in states[: start + budget + len(EARLY_STOP) - 1])
    after = states[start + budget + len(EARLY_STOP) - 1]
    assert forced[-1] == END and not bool(after["in_think"]) and int(after["forced_pos"]) == -1
    assert int(after["think_spent"]) == budget


@PROPERTIES
@given(params=sampling, prompt=plain_prompt, seed=st.integers(0, 2**32 - 1), budget=st.integers(-1, 8),
       close_at=st.integers(0, 7))
def test_model_closing_think_itself_forces_nothing(params, prompt, seed, budget, close_at):
    """Inside thinking from the prompt, the model emits </think> before the budget (or with none):
    thinking ends there and no forced token ever appears."""
    if budget >= 0:
        close_at = min(close_at, budget - 1)
        if close_at < 0:
            return  # budget 0 forces before the model can close: covered by the budget property
    params = params.replace(enable_thinking=True, thinking_budget=budget)

    def closes_once(step, logits):
        logits[0, THINK] = NEG_INF
        logits[0, END] = 1e4 if step == close_at else NEG_INF

    tokens, states = rollout(params, prompt + [THINK], close_at + 6, seed, closes_once)
    assert tokens[close_at] == END and END not in tokens[:close_at]
    assert all(int(s["forced_pos"]) == -1 for s in states)
    assert [bool(s["in_think"]) for s in states] == [i < close_at for i in range(len(states))]
    assert int(states[-1]["think_spent"]) == close_at


@PROPERTIES
@given(seed=st.integers(0, 2**32 - 1), rep=st.sampled_from([1.0, 1.3, 0.5, 2.0]),
       presence=st.sampled_from([0.0, 1.5, -2.0, 0.25]), params=sampling)
def test_greedy_equals_argmax_of_the_penalised_logits(seed, rep, presence, params):
    """Temperature 0 -> the first argmax of the logits after the penalties (reference written here in
    numpy from transformers' and vLLM's rules) and the <think> mask, whatever the other filters say."""
    rng = np.random.default_rng(seed)
    b = 32
    logits = np.round(rng.standard_normal((b, V)) * 2, 1).astype(np.float32)  # ties on purpose
    seen = rng.random((b, V)) < 0.3
    generated = seen & (rng.random((b, V)) < 0.5)
    enable = rng.random(b) < 0.5
    ref = logits.copy()
    ref[seen] = np.where(ref[seen] < 0, ref[seen] * np.float32(rep), ref[seen] / np.float32(rep))
    ref[generated] -= np.float32(presence)
    ref[~enable, THINK] = -np.inf
    p = params.replace(temperature=0.0, repetition_penalty=rep, presence_penalty=presence).to_tensors(b)
    p["enable_thinking"] = torch.tensor(enable)
    state = initial_state([[0]] * b, VOCAB)
    state["seen_ids"], state["generated_ids"] = mask_ids(torch.tensor(seen)), mask_ids(torch.tensor(generated))
    token, _ = sample_step(GRAPH, torch.tensor(logits), state, p, rng)
    assert token.tolist() == ref.argmax(1).tolist()


@PROPERTIES
@given(prompt=st.lists(st.sampled_from([1, 2, 3, THINK, END]), min_size=0, max_size=12),
       tail=st.lists(st.integers(0, V - 1), max_size=4))
def test_prompt_sets_the_starting_state(prompt, tail):
    """in_think iff the prompt's last <think> is not followed by a </think> (a scan written here); every
    prompt token is seen, none is generated."""
    prompt = prompt + tail
    inside = False
    for t in prompt:
        inside = True if t == THINK else False if t == END else inside
    state = initial_state([prompt], VOCAB)
    assert bool(state["in_think"][0]) == inside
    seen = state["seen_ids"][0].tolist()
    listed = [i for i in seen if i >= 0]
    assert set(listed) == set(prompt) and len(set(listed)) == len(listed)  # each prompt id once
    assert (state["generated_ids"] == -1).all()
    assert int(state["think_spent"][0]) == 0 and int(state["forced_pos"][0]) == -1


def test_qwen3_templates_start_states():
    """Qwen3 chat-template endings (DESIGN §6): enable_thinking=False appends an empty closed block;
    Thinking-2507 templates open <think> themselves."""
    assistant = [151644, 77091, 198]  # <|im_start|>assistant\n (Qwen3 tokenizer)
    vocab = SamplingVocab(151936, 151667, 151668)
    no_think = assistant + [151667, 271, 151668, 271]  # <think>\n\n</think>\n\n
    opened = assistant + [151667, 198]  # <think>\n
    state = initial_state([assistant, no_think, opened], vocab)
    assert state["in_think"].tolist() == [False, False, True]


@pytest.mark.parametrize("budget", [0, 3])
def test_vocabulary_without_thinking_tokens_samples_plainly(budget):
    vocab = SamplingVocab(vocab_size=V, think_id=None, end_think_id=None)
    graph = SamplingGraph(vocab)
    state = initial_state([[1, 2]], vocab)
    p = SamplingParams(thinking_budget=budget).to_tensors(1)
    rng = np.random.default_rng(0)
    for _ in range(5):
        token, state = sample_step(graph, torch.zeros(1, V), state, p, rng)
        assert not bool(state["in_think"]) and int(state["forced_pos"]) == -1
