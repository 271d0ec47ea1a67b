"""transformers reference models for parity tests (a uniquely named module: subfolders have their own
conftest.py, so tests import these helpers from here, not from `conftest`)."""

from __future__ import annotations

from pathlib import Path

import torch


def hf_model_from_spec(spec, seed: int = 0):
    """A transformers Qwen3 model with the spec's config and its own random init (seeded)."""
    import transformers

    cfg_dict = spec.to_hf_config()
    cls_cfg = transformers.Qwen3MoeConfig if spec.is_moe else transformers.Qwen3Config
    cfg = cls_cfg(**{k: v for k, v in cfg_dict.items() if k not in ("architectures", "model_type")})
    cfg.attn_implementation = "eager"
    cfg.initializer_range = 0.1  # logits of order 1 (std ~0.8), so a 1e-4 gate is a real check
    torch.manual_seed(seed)
    model_cls = transformers.Qwen3MoeForCausalLM if spec.is_moe else transformers.Qwen3ForCausalLM
    model = model_cls(cfg).eval()
    # default init leaves norms at exactly 1 and the router near zero: perturb them so routing,
    # q/k-norm scales and top-k ties are exercised for real
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
            elif name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    model.generation_config.eos_token_id = None  # compare fixed-length sequences
    model.generation_config.pad_token_id = 0
    return model


def save_hf_checkpoint(spec, folder: Path, seed: int = 0, max_shard_size: str | None = None):
    model = hf_model_from_spec(spec, seed)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    return model
