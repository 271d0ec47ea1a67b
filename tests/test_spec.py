"""ModelSpec: presets, Hugging Face config parsing, and one-line validation errors naming the field."""

from __future__ import annotations

import json

import pytest
import transformers

from qwen3export.errors import ConfigError
from qwen3export.spec import PRESETS, ModelSpec, preset, spec_from_hf_config
from qwen3export.weights import expected_tensors


def test_presets_have_real_qwen3_vocab_and_token_ids():
    for name in ("tiny", "tiny-moe"):
        s = preset(name)
        assert s.vocab_size == 151936 and s.think_token_id == 151667 and s.end_think_token_id == 151668
        assert set(s.eos_token_ids) == {151643, 151645}
    moe = preset("tiny-moe")
    assert moe.is_moe and moe.moe_layers == (1, 2)  # layer 0 is in mlp_only_layers
    assert not preset("tiny").is_moe


@pytest.mark.parametrize("name", [n for n in PRESETS if n.startswith("qwen3-")])
def test_real_shape_presets_parameter_counts_match_transformers(name):
    """Our parameter count equals transformers' for the same config (meta device: no memory used)."""
    import torch

    spec = preset(name)
    cfg = spec.to_hf_config()
    cls = transformers.Qwen3MoeConfig if spec.is_moe else transformers.Qwen3Config
    model_cls = transformers.Qwen3MoeForCausalLM if spec.is_moe else transformers.Qwen3ForCausalLM
    with torch.device("meta"):
        hf = model_cls(cls(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}))
    assert spec.param_count() == sum(p.numel() for p in hf.parameters())
    assert sum(int(__import__("math").prod(s)) for s in expected_tensors(spec).values()) == spec.param_count()


def test_published_sizes():
    # DESIGN.md §6 / the Qwen3 config.json files: 0.6B has head_dim 128 != hidden/heads (64)
    s = preset("qwen3-0.6b")
    assert (s.hidden_size, s.num_attention_heads, s.head_dim, s.num_hidden_layers) == (1024, 16, 128, 28)
    assert 0.59e9 < s.param_count() < 0.61e9
    assert 30.0e9 < preset("qwen3-30b-a3b").param_count() < 31.0e9
    assert 234e9 < preset("qwen3-235b-a22b").param_count() < 236e9


def test_round_trip_through_hf_config_and_dict():
    for name in ("tiny", "tiny-moe", "qwen3-30b-a3b"):
        s = preset(name)
        assert spec_from_hf_config(json.loads(json.dumps(s.to_hf_config())), name=name) == s
        assert ModelSpec.from_dict(s.to_dict()) == s


def test_transformers5_style_config_is_read():
    """transformers 5 writes rope_parameters and num_local_experts; released checkpoints rope_theta/num_experts."""
    cfg = transformers.Qwen3MoeConfig(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
                                      moe_intermediate_size=32, norm_topk_prob=True,
                                      rope_parameters={"rope_type": "default", "rope_theta": 12345.0})
    s = spec_from_hf_config(cfg.to_dict(), name="x")
    assert s.num_experts == 8 and s.rope_theta == 12345.0 and s.norm_topk_prob and s.head_dim == 16
    assert s.think_token_id is None  # a 1000-token vocabulary cannot hold <think>


def test_norm_topk_prob_defaults_to_transformers_default_false():
    cfg = preset("tiny-moe").to_hf_config()
    del cfg["norm_topk_prob"]
    assert spec_from_hf_config(cfg).norm_topk_prob is False


BAD = [
    ({"num_attention_heads": 5}, "num_attention_heads"),  # 5 % 2 kv heads != 0
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # > 8 experts
    ({"model_type": "llama"}, "model_type"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": "64"}, "hidden_size"),
    ({"head_dim": 31}, "head_dim"),
    ({"mlp_only_layers": [7]}, "mlp_only_layers"),
    ({"num_experts": 0}, "num_experts"),
    ({"rms_norm_eps": -1.0}, "rms_norm_eps"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 4.0}}, "rope_scaling"),
    ({"quantization_config": {"quant_method": "awq"}}, "quantization_config"),
]


@pytest.mark.parametrize("change,field", BAD, ids=[f for _, f in BAD])
def test_bad_config_names_the_field(change, field):
    cfg = {**preset("tiny-moe").to_hf_config(), **change}
    with pytest.raises(ConfigError) as e:
        spec_from_hf_config(cfg, name="bad")
    msg = str(e.value)
    assert field in msg and "\n" not in msg


def test_missing_required_field():
    cfg = preset("tiny").to_hf_config()
    del cfg["hidden_size"]
    with pytest.raises(ConfigError, match="hidden_size"):
        spec_from_hf_config(cfg)


def test_unknown_preset_lists_known():
    with pytest.raises(ConfigError, match="tiny-moe"):
        preset("qwen3-7b")
