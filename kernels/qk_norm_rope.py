"""Qwen3's per-head q/k RMSNorm fused with rotary embedding (`qwen3export::qk_norm_rope`): one pass from the
q/k projections' [B, S, H, D] views to the attention layout [B, H, S, D]. Graph: graphs/decoder.py Attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.graphs.functional import apply_rope, rms_norm_reference
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, divisibility_hints
from qwen3export.kernels.launch import launch


@triton.jit
def _qk_norm_rope_kernel(
    # pointers
    q_ptr, k_ptr, q_weight_ptr, k_weight_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr,
    # dimensions
    seq_len, n_q_heads, n_kv_heads, head_dim, eps,
    # strides (elements; the head_dim axis of every tensor is contiguous)
    stride_qb, stride_qs, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_cb, stride_cs,
    stride_qob, stride_qoh, stride_qos,
    stride_kob, stride_koh, stride_kos,
    # meta
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    """y = rope(w * cast(x / sqrt(mean(x^2) + eps))) per head, rope(y) = y*cos + rotate_half(y)*sin.

    q [B, S, Hq, D], k [B, S, Hkv, D] (the projections viewed as heads); q_weight, k_weight [D];
    cos, sin [B, S, D]; q_out [B, Hq, S, D], k_out [B, Hkv, S, D]. rotate_half(y) = cat(-y2, y1) with
    y1, y2 the halves of head_dim (transformers modeling_qwen3.py `rotate_half`), so
    out1 = y1*cos1 - y2*sin1 and out2 = y2*cos2 + y1*sin2. Program (token, head block): head blocks
    [0, cdiv(Hq, BLOCK_H)) are q's, the rest k's, so one launch serves both. The normalised value is
    rounded to the input dtype before the weight and the weighted value before the rotation, as the
    graph's two separate ops do (RMSNorm module output, then apply_rope).
    Any even head_dim runs in BLOCK_HALF = next_pow2(D / 2) lanes per half: the halves are read at cols and
    cols + D / 2 (the real half, not BLOCK_HALF), lanes >= D / 2 load 0 and are never stored, and the mean of
    squares divides by the real D, so the padding enters neither the norm nor the rotation.
    """
    token = tl.program_id(0)
    head_block = tl.program_id(1)
    b = (token // seq_len).to(tl.int64)
    s = (token % seq_len).to(tl.int64)
    n_q_blocks = tl.cdiv(n_q_heads, BLOCK_H)
    if head_block < n_q_blocks:
        first_head = head_block * BLOCK_H
        n_heads = n_q_heads
        x_base = q_ptr + b * stride_qb + s * stride_qs
        stride_h = stride_qh
        w_ptr = q_weight_ptr
        out_base = q_out_ptr + b * stride_qob + s * stride_qos
        stride_out_h = stride_qoh
    else:
        first_head = (head_block - n_q_blocks) * BLOCK_H
        n_heads = n_kv_heads
        x_base = k_ptr + b * stride_kb + s * stride_ks
        stride_h = stride_kh
        w_ptr = k_weight_ptr
        out_base = k_out_ptr + b * stride_kob + s * stride_kos
        stride_out_h = stride_koh
    half = head_dim // 2
    heads = first_head + tl.arange(0, BLOCK_H)  # [BLOCK_H]
    cols = tl.arange(0, BLOCK_HALF)  # [BLOCK_HALF]
    col_ok = cols < half
    mask = (heads[:, None] < n_heads) & col_ok[None, :]  # [BLOCK_H, BLOCK_HALF]
    first = x_base + heads[:, None] * stride_h + cols[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + half, mask=mask, other=0.0).to(tl.float32)
    rstd = tl.rsqrt((tl.sum(x1 * x1, axis=1) + tl.sum(x2 * x2, axis=1)) / head_dim + eps)  # [BLOCK_H]
    dtype = q_ptr.dtype.element_ty
    w1 = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    w2 = tl.load(w_ptr + half + cols, mask=col_ok, other=0.0).to(tl.float32)
    y1 = ((x1 * rstd[:, None]).to(dtype).to(tl.float32) * w1[None, :]).to(dtype).to(tl.float32)
    y2 = ((x2 * rstd[:, None]).to(dtype).to(tl.float32) * w2[None, :]).to(dtype).to(tl.float32)
    rope = b * stride_cb + s * stride_cs
    cos1 = tl.load(cos_ptr + rope + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_ptr + rope + half + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_ptr + rope + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_ptr + rope + half + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    out = out_base + heads[:, None] * stride_out_h + cols[None, :]
    tl.store(out, (y1 * cos1 - y2 * sin1).to(dtype), mask=mask)
    tl.store(out + half, (y2 * cos2 + y1 * sin2).to(dtype), mask=mask)


def _check(q, k, q_weight, k_weight, cos, sin):
    if q.dim() != 4 or k.dim() != 4 or q.shape[:2] != k.shape[:2] or q.shape[3] != k.shape[3]:
        raise InputError(f"qk_norm_rope: q {tuple(q.shape)} and k {tuple(k.shape)} must be [B, S, H, D] alike")
    b, s, _, d = q.shape
    if d % 2 or q_weight.shape != (d,) or k_weight.shape != (d,):
        raise InputError(f"qk_norm_rope: head_dim {d} must be even and q/k norm weights [{d}]")
    if cos.shape[-2:] != (s, d) or sin.shape != cos.shape or cos.dim() != 3 or cos.shape[0] not in (1, b):
        raise InputError(f"qk_norm_rope: cos/sin {tuple(cos.shape)} must be [B or 1, {s}, {d}]")
    if k.dtype != q.dtype:
        raise InputError(f"qk_norm_rope: q is {q.dtype} but k is {k.dtype}")


def qk_norm_rope(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                 cos: torch.Tensor, sin: torch.Tensor, eps: float,
                 config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, S, Hq, D], k [B, S, Hkv, D] -> (q_out [B, Hq, S, D], k_out [B, Hkv, S, D]), contiguous."""
    _check(q, k, q_weight, k_weight, cos, sin)
    config = config or DEFAULT_CONFIG
    b, s, hq, d = q.shape
    hkv = k.shape[2]
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    cos, sin = cos.expand(b, s, d), sin.expand(b, s, d)
    if cos.stride(-1) != 1 or sin.stride() != cos.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    q_out = torch.empty(b, hq, s, d, dtype=q.dtype, device=q.device)
    k_out = torch.empty(b, hkv, s, d, dtype=k.dtype, device=k.device)
    block_h = config["BLOCK_H"]
    grid = (b * s, triton.cdiv(hq, block_h) + triton.cdiv(hkv, block_h))
    launch(_qk_norm_rope_kernel, grid,
           q, k, q_weight.to(q.dtype).contiguous(), k_weight.to(q.dtype).contiguous(), cos, sin, q_out, k_out,
           s, hq, hkv, d, eps,
           q.stride(0), q.stride(1), q.stride(2),
           k.stride(0), k.stride(1), k.stride(2),
           cos.stride(0), cos.stride(1),
           q_out.stride(0), q_out.stride(1), q_out.stride(2),
           k_out.stride(0), k_out.stride(1), k_out.stride(2),
           device=q.device, num_warps=config.num_warps, num_stages=config.num_stages,
           BLOCK_H=block_h, BLOCK_HALF=triton.next_power_of_2(d // 2))
    return q_out, k_out


def qk_norm_rope_reference(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                           cos: torch.Tensor, sin: torch.Tensor, eps: float,
                           config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """graphs/decoder.py's q_norm/k_norm then apply_rope; `config` is accepted and ignored."""
    q_out = apply_rope(rms_norm_reference(q, q_weight, eps).transpose(1, 2), cos, sin)
    k_out = apply_rope(rms_norm_reference(k, k_weight, eps).transpose(1, 2), cos, sin)
    return q_out.contiguous(), k_out.contiguous()


CONFIG_SPACE = [KernelConfig("qk_norm_rope", {"BLOCK_H": heads}, num_warps=warps, num_stages=1)
                for heads in (1, 2, 4, 8, 16) for warps in (1, 2, 4, 8)]
DEFAULT_CONFIG = KernelConfig("qk_norm_rope", {"BLOCK_H": 4}, num_warps=4, num_stages=1)

# every released Qwen3 model has head_dim 128 (config.json of 0.6B…235B-A22B)
COMPILE_SHAPES = ({"head_dim": 128},)


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """Drop configs with more warps than a 128-dim head block has 32-element rows for."""
    return config.threads <= arch.max_threads_per_block and config.num_warps <= 2 * config["BLOCK_H"]


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    """The kernel for one head_dim. Every stride is a multiple of head_dim (the projections viewed as heads,
    [B, S, D] rope tables, contiguous outputs), so each gets the divisibility hint head_dim earns."""
    ptrs = ("q_ptr", "k_ptr", "q_weight_ptr", "k_weight_ptr", "cos_ptr", "sin_ptr", "q_out_ptr", "k_out_ptr")
    strides = ("stride_qb", "stride_qs", "stride_qh", "stride_kb", "stride_ks", "stride_kh", "stride_cb",
               "stride_cs", "stride_qob", "stride_qoh", "stride_qos", "stride_kob", "stride_koh", "stride_kos")
    d = shape["head_dim"]
    return [CompileSpec(
        _qk_norm_rope_kernel, pointers={p: dtype for p in ptrs},
        constexprs={"BLOCK_HALF": triton.next_power_of_2(d // 2)} | config.constexprs,
        **divisibility_hints({"head_dim": d} | dict.fromkeys(strides, d)),
        scalars={"eps": "fp32"}, num_warps=config.num_warps, num_stages=config.num_stages,
        shape=f"head_dim={shape['head_dim']}")]
