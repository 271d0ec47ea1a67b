"""Shared fixtures: Hugging Face reference checkpoints written to temp folders.

transformers is the parity reference (Qwen3ForCausalLM / Qwen3MoeForCausalLM); it is imported only here
and in tests, never by qwen3export itself.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


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


@pytest.fixture(scope="session")
def hf_checkpoints(tmp_path_factory):
    """Lazily written reference checkpoints, cached per spec for the session: name -> (folder, hf model)."""
    cache: dict = {}

    def get(spec, name: str | None = None, **kwargs):
        key = name or spec.name
        if key not in cache:
            folder = tmp_path_factory.mktemp(key)
            cache[key] = (folder, save_hf_checkpoint(spec, folder, **kwargs))
        return cache[key]

    return get
