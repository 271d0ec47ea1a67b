"""Sampling parameters (graphs/sampling_params.py): validation errors, Qwen3 defaults, generation_config.json,
and the host-side checks that run before the sampling graph."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qwen3export.errors import ConfigError, InputError
from qwen3export.graphs.sampling import (PARAM_NAMES, QWEN3_DEFAULTS, SamplingGraph, SamplingParams, SamplingVocab,
                                         check_logits, check_params, initial_state, read_generation_config,
                                         sample_step, sampling_defaults, stack_params)

VOCAB = SamplingVocab(vocab_size=64, think_id=60, end_think_id=61)


@pytest.mark.parametrize("field, value, words", [
    ("temperature", -0.1, "finite number >= 0"),
    ("temperature", math.inf, "finite number >= 0"),
    ("temperature", math.nan, "finite number >= 0"),
    ("temperature", "hot", "finite number >= 0"),
    ("top_k", -1, "integer >= 0"),
    ("top_k", 2.5, "must be an integer"),
    ("top_p", 0.0, "in (0, 1]"),
    ("top_p", 1.01, "in (0, 1]"),
    ("top_p", math.nan, "in (0, 1]"),
    ("min_p", -0.01, "in [0, 1]"),
    ("min_p", 1.5, "in [0, 1]"),
    ("repetition_penalty", 0.0, "finite number > 0"),
    ("repetition_penalty", -1.2, "finite number > 0"),
    ("presence_penalty", 2.5, "in [-2, 2]"),
    ("presence_penalty", -3.0, "in [-2, 2]"),
    ("thinking_budget", -2, "integer >= -1"),
    ("thinking_budget", 1.0, "must be an integer"),
    ("enable_thinking", "yes", "true or false"),
])
def test_bad_parameter_is_one_clear_line(field, value, words):
    with pytest.raises(InputError) as info:
        SamplingParams(**{field: value})
    msg = str(info.value)
    assert f"sampling parameter {field} must be" in msg and words in msg
    assert "\n" not in msg and "row" not in msg


def test_edge_values_are_valid():
    SamplingParams(temperature=0.0, top_k=10**9, top_p=1.0, min_p=1.0, repetition_penalty=1e-3,
                   presence_penalty=-2.0, thinking_budget=-1)
    SamplingParams(top_p=1e-9, min_p=0.0, presence_penalty=2.0, thinking_budget=0, enable_thinking=False)


def test_batch_check_names_the_row():
    rows = [SamplingParams(), SamplingParams(top_p=0.5), SamplingParams()]
    params = stack_params(rows)
    check_params(params)
    params["top_p"][2] = 0.0
    with pytest.raises(InputError, match=r"top_p must be in \(0, 1\].*\(row 2\)"):
        check_params(params)
    params = stack_params(rows)
    params["top_k"] = params["top_k"].float()
    with pytest.raises(InputError, match="top_k must be int64"):
        check_params(params)
    params = stack_params(rows)
    params["min_p"] = params["min_p"][:2]
    with pytest.raises(InputError, match=r"min_p must be one value per row \[3\]"):
        check_params(params)
    del params["min_p"]
    with pytest.raises(InputError, match="missing"):
        check_params(params)


def test_tensors_have_the_graph_dtypes():
    rows = [SamplingParams(temperature=0.5, top_k=3), SamplingParams(enable_thinking=False, thinking_budget=7)]
    stacked = stack_params(rows)
    assert list(stacked) == list(PARAM_NAMES)
    assert stacked["top_k"].tolist() == [3, 0] and stacked["top_k"].dtype == torch.int64
    assert stacked["enable_thinking"].tolist() == [True, False] and stacked["enable_thinking"].dtype == torch.bool
    assert stacked["temperature"].dtype == torch.float32 and stacked["thinking_budget"].tolist() == [-1, 7]
    one = rows[0].to_tensors(4)
    assert all(t.shape == (4,) for t in one.values()) and one["temperature"].tolist() == [0.5] * 4


def test_qwen3_recommended_values():
    """The Qwen3 model cards' "Best Practices" (e.g. Qwen/Qwen3-8B): thinking T 0.6 / top_p 0.95 / top_k 20 /
    min_p 0; non-thinking T 0.7 / top_p 0.8 / top_k 20 / min_p 0."""
    thinking, plain = SamplingParams.recommended(True), SamplingParams.recommended(False)
    assert (thinking.temperature, thinking.top_p, thinking.top_k, thinking.min_p) == (0.6, 0.95, 20, 0.0)
    assert (plain.temperature, plain.top_p, plain.top_k, plain.min_p) == (0.7, 0.8, 20, 0.0)
    assert thinking.enable_thinking and not plain.enable_thinking
    assert SamplingParams.recommended(True, thinking_budget=1024).thinking_budget == 1024


def test_generation_config_overrides_the_thinking_defaults(tmp_path):
    # Qwen/Qwen3-8B generation_config.json as published on the Hugging Face Hub
    qwen3_8b = {"bos_token_id": 151643, "do_sample": True, "eos_token_id": [151645, 151643],
                "pad_token_id": 151643, "temperature": 0.6, "top_k": 20, "top_p": 0.95,
                "transformers_version": "4.51.0"}
    (tmp_path / "generation_config.json").write_text(json.dumps(qwen3_8b))
    assert read_generation_config(tmp_path) == {"temperature": 0.6, "top_k": 20, "top_p": 0.95}

    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.9, "min_p": 0.05,
                                                                  "repetition_penalty": 1.05}))
    table = sampling_defaults(read_generation_config(tmp_path))
    assert table["thinking"] == {"temperature": 0.9, "top_p": 0.95, "top_k": 20, "min_p": 0.05,
                                 "repetition_penalty": 1.05}
    assert table["non_thinking"] == QWEN3_DEFAULTS["non_thinking"]
    assert QWEN3_DEFAULTS["thinking"]["temperature"] == 0.6  # the table itself is never modified
    assert SamplingParams.recommended(True, table).repetition_penalty == 1.05

    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False, "temperature": 0.6}))
    assert read_generation_config(tmp_path)["temperature"] == 0.0


def test_generation_config_errors(tmp_path):
    assert read_generation_config(tmp_path) == {}
    path = tmp_path / "generation_config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        read_generation_config(tmp_path)
    path.write_text(json.dumps({"top_p": 2.0}))
    with pytest.raises(ConfigError, match=r"generation_config.json: sampling parameter top_p must be in \(0, 1\]"):
        read_generation_config(tmp_path)


@pytest.mark.parametrize("bad, words", [
    (float("nan"), "NaN or \\+inf"),
    (float("inf"), "NaN or \\+inf"),
])
def test_non_finite_logits_are_refused_before_the_graph_runs(bad, words):
    calls = []

    def engine(*args):  # would record a run; the check must stop before it
        calls.append(args)

    logits = torch.zeros(2, 64)
    logits[1, 5] = bad
    with pytest.raises(InputError, match=f"logits row 1 holds {words}"):
        sample_step(engine, logits, initial_state([[1], [2]], VOCAB), SamplingParams().to_tensors(2),
                    np.random.default_rng(0))
    assert not calls


def test_logits_checks():
    check_logits(torch.tensor([[0.0, float("-inf")]]))  # -inf is a masked token: fine
    with pytest.raises(InputError, match="all -inf"):
        check_logits(torch.tensor([[1.0, 2.0], [float("-inf")] * 2]))
    with pytest.raises(InputError, match="float32"):
        check_logits(torch.zeros(1, 4, dtype=torch.float16))
    with pytest.raises(InputError, match=r"\[batch, 64\]"):
        check_logits(torch.zeros(1, 63), vocab_size=64)


def test_bad_params_are_refused_by_sample_step():
    params = SamplingParams().to_tensors(2)
    params["temperature"][0] = -1.0
    with pytest.raises(InputError, match=r"temperature must be a finite number >= 0.*\(row 0\)"):
        sample_step(SamplingGraph(VOCAB), torch.zeros(2, 64), initial_state([[1], [2]], VOCAB), params,
                    np.random.default_rng(0))
