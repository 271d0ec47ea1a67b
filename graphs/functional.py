"""The decoder's elementwise math in plain torch (RMSNorm, RoPE): one definition that the eager graph
(decoder.py) uses and the kernels (kernels/rms_norm.py, kernels/qk_norm_rope.py) are checked against. A leaf module:
it imports torch only, so kernels can depend on it without depending on the graph."""

from __future__ import annotations

import torch


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """y = w * x / sqrt(mean(x^2) + eps), computed in fp32 and cast to the weight's dtype before the weight
    (transformers Qwen3RMSNorm; Qwen3 is trained in bf16, so fp32 keeps fp16 from overflowing: the sum of
    squares of a massive activation of 2,000 is 4e6, past fp16's 65,504). x may be the fp32 residual stream
    of an fp16 decoder; the output is in the weight's (compute) dtype either way."""
    xf = x.to(torch.float32)
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(weight.dtype)


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, scaling: float = 1.0):
    """cos/sin tables [B, S, D] for positions [B, S] (transformers Qwen3RotaryEmbedding: fp32 math,
    times YaRN's attention scaling when RoPE is scaled)."""
    freqs = position_ids.to(torch.float32)[..., None] * inv_freq  # [B, S, D/2]
    emb = torch.cat((freqs, freqs), dim=-1)  # [B, S, D]
    if scaling != 1.0:
        return (emb.cos() * scaling).to(dtype), (emb.sin() * scaling).to(dtype)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, H, S, D]; cos/sin [B, S, D]. rotate_half convention (first half, second half)."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
