"""RoPE scaling (YaRN, linear) against transformers: cos/sin tables, logits and greedy tokens past 32K,
eager and ONNX engine."""

from __future__ import annotations

import pytest
import torch
import transformers
from transformers.models.qwen3.modeling_qwen3 import Qwen3RotaryEmbedding

import qwen3export
from qwen3export.errors import ConfigError
from qwen3export.graphs.decoder import rope_cos_sin
from qwen3export.graphs.rope import parse_rope_flag, rope_parameters
from qwen3export.spec import preset, spec_from_hf_config

from hf_reference import hf_model_from_spec

YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # Qwen3 model card


def _hf_config(spec):
    cfg = spec.to_hf_config()
    return transformers.Qwen3Config(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")})


@pytest.mark.parametrize("scaling", [None, YARN, {"rope_type": "linear", "factor": 2.0},
                                     {**YARN, "factor": 2.0, "beta_fast": 16.0}])
def test_cos_sin_tables_match_transformers_to_131071(scaling):
    spec = preset("qwen3-0.6b").replace(rope_scaling=scaling)
    rot = Qwen3RotaryEmbedding(_hf_config(spec))
    inv_freq, attn = rope_parameters(spec.head_dim, spec.rope_theta, spec.rope_scaling)
    assert torch.equal(inv_freq, rot.inv_freq) and attn == pytest.approx(rot.attention_scaling, rel=1e-12)
    for start in range(0, 131072, 32768):
        pos = torch.arange(start, start + 32768)[None]
        ref_cos, ref_sin = rot(torch.zeros(1, dtype=torch.float32), pos)
        cos, sin = rope_cos_sin(pos, inv_freq, torch.float32, attn)
        assert (cos - ref_cos).abs().max().item() <= 1e-6
        assert (sin - ref_sin).abs().max().item() <= 1e-6


def test_config_forms_and_limits():
    cfg = preset("tiny").to_hf_config()
    s = spec_from_hf_config({**cfg, "rope_scaling": YARN})
    assert s.rope_scaling == {**YARN, "factor": 4.0} and s.max_positions == 131072
    v5 = {**cfg, "rope_parameters": {**YARN, "rope_theta": 1e6}}
    del v5["rope_theta"]
    assert spec_from_hf_config(v5).rope_scaling == s.rope_scaling
    assert parse_rope_flag("yarn:4.0") == s.rope_scaling
    with pytest.raises(ConfigError, match="dynamic"):
        spec_from_hf_config({**cfg, "rope_scaling": {"rope_type": "dynamic", "factor": 2.0}})
    with pytest.raises(ConfigError, match="rope_scaling.factor"):
        spec_from_hf_config({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 0.5}})
    with pytest.raises(ConfigError, match="longrope"):
        spec_from_hf_config({**cfg, "rope_scaling": {"rope_type": "longrope", "factor": 2.0}})
    with pytest.raises(ConfigError, match="--rope-scaling"):
        parse_rope_flag("yarn")


def _hf_greedy(hf, prompt, offset, n):
    """transformers forward with explicit position ids shifted by `offset`, its own KV cache."""
    ids = torch.tensor([prompt])
    pos = torch.arange(offset, offset + len(prompt))[None]
    out = hf(input_ids=ids, position_ids=pos, use_cache=True)
    logits, past, toks = [out.logits[0, -1]], out.past_key_values, []
    for i in range(n):
        toks.append(int(logits[-1].argmax()))
        out = hf(input_ids=torch.tensor([[toks[-1]]]), position_ids=torch.tensor([[offset + len(prompt) + i]]),
                 past_key_values=past, use_cache=True)
        logits.append(out.logits[0, -1])
        past = out.past_key_values
    return toks, torch.stack(logits[:n])


def _our_greedy(step, empty, prompt, offset, n):
    ids = torch.tensor([prompt])
    mask = torch.ones_like(ids)
    logits, past = step(ids, torch.arange(offset, offset + len(prompt))[None], mask, empty)
    out, toks = [logits[0, -1]], []
    for i in range(n):
        toks.append(int(out[-1].argmax()))
        mask = torch.cat((mask, torch.ones(1, 1, dtype=torch.int64)), 1)
        logits, past = step(torch.tensor([[toks[-1]]]), torch.tensor([[offset + len(prompt) + i]]), mask, past)
        out.append(logits[0, -1])
    return toks, torch.stack(out[:n])


@pytest.fixture(scope="module")
def yarn_pair(tmp_path_factory):
    spec = preset("tiny").replace(vocab_size=2048, think_token_id=None, end_think_token_id=None, bos_token_id=1,
                                  eos_token_ids=(2,), rope_scaling=dict(YARN))
    folder = tmp_path_factory.mktemp("yarn")
    hf = hf_model_from_spec(spec, seed=11)
    hf.save_pretrained(folder)
    return folder, hf


@pytest.mark.parametrize("offset", [32768 + 100, 100_000, 131072 - 40])
def test_eager_matches_transformers_past_native_window(yarn_pair, offset):
    folder, hf = yarn_pair
    ours = qwen3export.load_model(folder)
    assert ours.spec.rope_scaling["rope_type"] == "yarn"
    prompt = [5, 77, 1000, 3, 42, 9]
    with torch.no_grad():
        ref_toks, ref_logits = _hf_greedy(hf, prompt, offset, 24)
        got_toks, got_logits = _our_greedy(ours, ours.empty_cache(1), prompt, offset, 24)
    assert got_toks == ref_toks
    assert (got_logits - ref_logits).abs().max().item() <= 1e-4


def test_onnx_engine_matches_transformers_past_native_window(yarn_pair, tmp_path):
    from qwen3export.artifact import load_artifact
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build
    from qwen3export.runner import open_engine

    folder, hf = yarn_pair
    build(BuildOptions.of(model=str(folder), artifact=tmp_path / "art"))
    artifact = load_artifact(tmp_path / "art")
    assert artifact.manifest["model"]["spec"]["rope_scaling"]["rope_type"] == "yarn"
    engine = open_engine(artifact)
    prompt = [11, 12, 13, 14]
    for offset in (40_000, 100_000):
        with torch.no_grad():
            ref_toks, ref_logits = _hf_greedy(hf, prompt, offset, 16)
        got_toks, got_logits = _our_greedy(engine, engine.empty_cache(1), prompt, offset, 16)
        assert got_toks == ref_toks
        assert (got_logits - ref_logits).abs().max().item() <= 1e-4


def test_cli_rope_scaling_flag_builds_verifies_and_extends_the_window(tmp_path, capsys):
    import json

    from qwen3export.cli import main

    out = tmp_path / "y"
    assert main(["build", "--model", "tiny", "--rope-scaling", "yarn:4.0", "--artifact", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["model"]["spec"]["rope_scaling"] == YARN
    assert manifest["model"]["ref"]["overrides"] == {"rope_scaling": YARN}
    capsys.readouterr()
    assert main(["verify", str(out), "--json"]) == 0  # eager rebuilt with the same scaling
    assert json.loads(capsys.readouterr().out)["passed"]
