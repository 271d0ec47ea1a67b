"""transformers reference models for parity tests (a uniquely named module: subfolders have their own
conftest.py, so tests import these helpers from here, not from `conftest`).

The reference models carry the presets' "trained" weight statistics (qwen3export/synthetic_weights.py:
logits std ~3 and max 15-35, massive activations, norms not 1, uneven routing) unless a test asks for
`stats="small"`: a transformers model initialised with N(0, 0.02) has logits near zero, where a wrong
engine and a right one look alike.
"""

from __future__ import annotations

from pathlib import Path

import torch


def hf_model_from_spec(spec, seed: int = 0, stats: str = "trained"):
    """A transformers Qwen3 / Qwen3-MoE model with the spec's config, its weights drawn by the presets'
    generator (the same tensors as `RandomSource(spec, seed, stats)`), loaded by parameter name."""
    import transformers

    from qwen3export.model import build_module
    from qwen3export.weights import RandomSource

    cfg_dict = spec.to_hf_config()
    cls_cfg = transformers.Qwen3MoeConfig if spec.is_moe else transformers.Qwen3Config
    cfg = cls_cfg(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    cfg.attn_implementation = "eager"
    model_cls = transformers.Qwen3MoeForCausalLM if spec.is_moe else transformers.Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(cfg).eval()  # transformers' own init (incl. RoPE buffers), then every weight replaced
    ours = build_module(spec, RandomSource(spec, seed, stats), torch.float32)
    missing, unexpected = model.load_state_dict(ours.state_dict(), strict=False)
    buffers = {n for n, _ in model.named_buffers()}
    assert not unexpected and set(missing) <= buffers, (missing, unexpected)  # names are transformers' own
    model.generation_config.eos_token_id = None  # compare fixed-length sequences
    model.generation_config.pad_token_id = 0
    return model


def save_hf_checkpoint(spec, folder: Path, seed: int = 0, max_shard_size: str | None = None, stats: str = "trained"):
    """Write the reference model with transformers' save_pretrained; returns the model."""
    model = hf_model_from_spec(spec, seed, stats)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model
