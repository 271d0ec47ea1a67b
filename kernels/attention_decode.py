"""Flash-decoding: one new query per sequence over a KV cache, split along the cache then reduced; the decode
half of `qwen3export::attention`. Visibility is attention_prefill.py's VISIBILITY rule with S = 1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.kernels.attention_prefill import (LOG2E, attention_prefill_reference, check_attention_inputs,
                                                   head_block, last_dim_contiguous, mask_pointer)
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, divisibility_hints
from qwen3export.kernels.launch import launch

MIN_DOT_ROWS = 16  # tl.dot needs M >= 16: a kv head's query group is padded to 16 rows


@triton.jit
def _attention_decode_split_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, partial_out_ptr, partial_lse_ptr, kv_lens_ptr, key_mask_ptr,
    # dimensions
    n_kv_heads, group_size, cache_len, head_dim, scale_log2,
    # strides (elements; head_dim is contiguous everywhere)
    stride_qb, stride_qh,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_pb, stride_ph, stride_ps,
    stride_mask_b,
    # meta
    HAS_KV_LENS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """Partial attention of one kv head's query group over one slice of the cache.

    q [B, Hq, D]; k/v [B, Hkv, L, D]; partial_out [B, Hq, NUM_SPLITS, D] fp32 (normalised within the
    slice); partial_lse [B, Hq, NUM_SPLITS] fp32, log2(sum exp2) of the slice's scores, -inf if it saw no
    key. Program (b * Hkv + kv head, split): the G = Hq / Hkv query heads sharing the kv head are the
    rows of one [BLOCK_H, D] x [D, BLOCK_N] product, so each K/V block is read once per group (the GQA
    grouping of FlashDecoding++ / vLLM's triton_decode_attention.py); split s covers keys
    [s * chunk, (s + 1) * chunk) with chunk = cdiv(n_b, NUM_SPLITS) rounded up to BLOCK_N
    (Flash-Decoding, Dao et al. 2023, https://crfm.stanford.edu/2023/10/12/flashdecoding.html).
    Any head_dim runs in BLOCK_D = head_block(D) lanes: loads past D are 0 (adding 0 to q.k), stores stop at D.
    """
    bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (bh // n_kv_heads).to(tl.int64)
    kv_h = (bh % n_kv_heads).to(tl.int64)
    if HAS_KV_LENS:
        n_valid = tl.load(kv_lens_ptr + b).to(tl.int32)
    else:
        n_valid = cache_len
    chunk = tl.cdiv(tl.cdiv(n_valid, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, n_valid)
    rows = tl.arange(0, BLOCK_H)
    heads = kv_h * group_size + rows  # [BLOCK_H] query heads of this group
    row_ok = rows < group_size
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_H, BLOCK_D]
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], tl.float32)
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < end
        k = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k) * scale_log2  # [BLOCK_H, BLOCK_N]
        visible = n_ok
        if HAS_KEY_MASK:
            visible = visible & (tl.load(key_mask_ptr + b * stride_mask_b + offs_n, mask=n_ok, other=0) != 0)
        s = tl.where(visible[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
    base = b * stride_pb + heads * stride_ph + split * stride_ps  # [BLOCK_H]
    tl.store(partial_out_ptr + base[:, None] + offs_d[None, :], out, mask=row_ok[:, None] & d_ok[None, :])
    lse_index = (b * n_kv_heads * group_size + heads) * NUM_SPLITS + split  # partial_lse is contiguous
    tl.store(partial_lse_ptr + lse_index, lse, mask=row_ok)


@triton.jit
def _attention_decode_reduce_kernel(
    # pointers
    partial_out_ptr, partial_lse_ptr, out_ptr,
    # dimensions
    n_q_heads, head_dim,
    # strides (elements)
    stride_pb, stride_ph, stride_ps,
    stride_ob, stride_oh,
    # meta
    BLOCK_D: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """out = sum_s w_s o_s / sum_s w_s with w_s = exp2(lse_s - max lse): the splits' log-sum-exp merge.

    partial_out [B, Hq, NUM_SPLITS, D] fp32, partial_lse [B, Hq, NUM_SPLITS] fp32 -> out [B, Hq, D];
    program b * Hq + h. A query that saw no key in any split gets 0.
    """
    bh = tl.program_id(0)
    b = (bh // n_q_heads).to(tl.int64)
    h = (bh % n_q_heads).to(tl.int64)
    splits = tl.arange(0, NUM_SPLITS)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    base = b * stride_pb + h * stride_ph + splits * stride_ps  # [NUM_SPLITS]
    lse = tl.load(partial_lse_ptr + (b * n_q_heads + h) * NUM_SPLITS + splits)  # contiguous [B, Hq, NUM_SPLITS]
    o = tl.load(partial_out_ptr + base[:, None] + offs_d[None, :], mask=d_ok[None, :], other=0.0)
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))  # 0 for splits that saw no key
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0.0, total, 1.0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty), mask=d_ok)


def attention_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                     kv_lens: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                     config: KernelConfig | None = None) -> torch.Tensor:
    """q [B, Hq, 1, D] (or [B, Hq, D]), k/v cache [B, Hkv, L, D] -> out shaped like q, in q's dtype.
    Row b's query is at position kv_lens[b] - 1 (L - 1 without kv_lens); scale defaults to D**-0.5."""
    q4 = q if q.dim() == 4 else q[:, :, None]
    check_attention_inputs(q4, k, v, kv_lens, key_mask, "attention_decode")
    if q4.shape[2] != 1:
        raise InputError(f"attention_decode: q {tuple(q.shape)} has {q4.shape[2]} queries per row; "
                         f"use attention_prefill")
    config = config or DEFAULT_CONFIG
    b, hq, _, d = q4.shape
    hkv, cache_len = k.shape[1], k.shape[2]
    group = hq // hkv
    q3, k, v = last_dim_contiguous(q4[:, :, 0], k, v)
    splits = config["NUM_SPLITS"]
    partial_out = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    partial_lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    mask_arg, stride_mask = mask_pointer(key_mask, q3)
    lens_arg = kv_lens.to(torch.int32) if kv_lens is not None else q3
    scale = d ** -0.5 if scale is None else scale
    block_d = head_block(d)
    launch(_attention_decode_split_kernel, (b * hkv, splits),
           q3, k, v, partial_out, partial_lse, lens_arg, mask_arg,
           hkv, group, cache_len, d, scale * LOG2E,
           q3.stride(0), q3.stride(1),
           k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2),
           partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
           stride_mask,
           device=q.device, num_warps=config.num_warps, num_stages=config.num_stages,
           HAS_KV_LENS=kv_lens is not None, HAS_KEY_MASK=key_mask is not None,
           BLOCK_H=max(MIN_DOT_ROWS, triton.next_power_of_2(group)), BLOCK_N=config["BLOCK_N"], BLOCK_D=block_d,
           NUM_SPLITS=splits)
    out = torch.empty(b, hq, d, dtype=q.dtype, device=q.device)
    launch(_attention_decode_reduce_kernel, (b * hq,),
           partial_out, partial_lse, out,
           hq, d,
           partial_out.stride(0), partial_out.stride(1), partial_out.stride(2),
           out.stride(0), out.stride(1),
           device=q.device, num_warps=REDUCE_WARPS, num_stages=1,
           BLOCK_D=block_d, NUM_SPLITS=splits)
    return out.view(q.shape)


def attention_decode_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                               kv_lens: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                               config: KernelConfig | None = None) -> torch.Tensor:
    """attention_prefill_reference with one query per row; `config` is accepted and ignored."""
    q4 = q if q.dim() == 4 else q[:, :, None]
    return attention_prefill_reference(q4, k, v, scale, kv_lens, key_mask).view(q.shape)


REDUCE_WARPS = 4  # the merge reads NUM_SPLITS x D fp32 (<= 16 KB): one 4-warp block per query head
CONFIG_SPACE = [KernelConfig("attention_decode", {"BLOCK_N": bn}, num_warps=w, num_stages=st, meta={"NUM_SPLITS": sp})
                for bn in (32, 64, 128) for sp in (1, 2, 4, 8, 16, 32) for w in (2, 4, 8) for st in (1, 2, 3)]
# 8 splits x 64-key blocks: a batch-1 decode of a 4 kv-head model (30B-A3B) still launches 32 programs
DEFAULT_CONFIG = KernelConfig("attention_decode", {"BLOCK_N": 64}, num_warps=4, num_stages=2, meta={"NUM_SPLITS": 8})

COMPILE_SHAPES = ({"head_dim": 128, "group": 8},)  # Qwen3-30B-A3B: 32 q heads over 4 kv heads


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """Prune K/V stages that cannot fit shared memory and warps with less than 8 keys each."""
    shared = 2 * 2 * config.num_stages * config["BLOCK_N"] * 128
    return shared <= arch.max_shared_per_block and config["BLOCK_N"] >= 8 * config.num_warps


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    """Split and reduce kernels for one head_dim and GQA group: BLOCK_D and BLOCK_H as the launcher picks
    them; every stride is a multiple of head_dim, so each gets the divisibility hint head_dim earns."""
    d = shape["head_dim"]
    block_d = head_block(d)
    block_h = max(MIN_DOT_ROWS, triton.next_power_of_2(shape["group"]))
    strides = ("stride_qb", "stride_qh", "stride_kb", "stride_kh", "stride_kl", "stride_vb", "stride_vh",
               "stride_vl", "stride_pb", "stride_ph", "stride_ps")
    split = CompileSpec(
        _attention_decode_split_kernel,
        pointers={"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "partial_out_ptr": "fp32",
                  "partial_lse_ptr": "fp32", "kv_lens_ptr": "i32", "key_mask_ptr": "i64"},
        constexprs={"HAS_KV_LENS": True, "HAS_KEY_MASK": False, "BLOCK_H": block_h, "BLOCK_D": block_d}
        | config.constexprs,
        **divisibility_hints({"head_dim": d} | dict.fromkeys(strides, d)), scalars={"scale_log2": "fp32"},
        num_warps=config.num_warps, num_stages=config.num_stages, shape=f"head_dim={d},group={shape['group']},kv_lens")
    reduce = CompileSpec(
        _attention_decode_reduce_kernel,
        pointers={"partial_out_ptr": "fp32", "partial_lse_ptr": "fp32", "out_ptr": dtype},
        constexprs={"BLOCK_D": block_d, "NUM_SPLITS": config["NUM_SPLITS"]},
        **divisibility_hints(dict.fromkeys(("head_dim", "stride_pb", "stride_ph", "stride_ob", "stride_oh"), d)),
        num_warps=REDUCE_WARPS, num_stages=1, shape=f"head_dim={d}")
    return [split, reduce]
