"""Causal GQA flash attention of S new queries over a KV cache (prefill, with or without past): the prefill
half of `qwen3export::attention`. Graph: graphs/decoder.py Attention + attention_mask_bias.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, divisibility_hints
from qwen3export.kernels.launch import launch

# VISIBILITY (shared with attention_decode.py): row b's cache holds n_b = kv_lens[b] valid positions (L
# without kv_lens); query i sits at position n_b - S + i and sees key j iff j <= n_b - S + i and
# key_mask[b, j] != 0. Without kv_lens this is the graph's rule; a query that sees no key gets zeros
# where the graph's finfo.min mask averages arbitrary values (only padding queries are in that case).
LOG2E = 1.4426950408889634  # scores are scaled by log2(e) so the kernel can use exp2
MIN_DOT_K = 16  # tl.dot needs every operand dimension >= 16: head_dim 8 still runs a 16-wide tile


def head_block(head_dim: int) -> int:
    """BLOCK_D for a head_dim: the next power of two (tl.arange ranges must be), lanes >= head_dim masked off.
    Qwen3's 128 (and 64) are their own block, so their masks are all-true; 24 runs in 32, 72 / 80 / 96 in 128."""
    return max(MIN_DOT_K, triton.next_power_of_2(head_dim))


@triton.jit
def _attention_prefill_kernel(
    # pointers
    q_ptr, k_ptr, v_ptr, out_ptr, kv_lens_ptr, key_mask_ptr,
    # dimensions
    n_q_heads, group_size, seq_len, cache_len, head_dim, scale_log2,
    # strides (elements; head_dim is contiguous everywhere)
    stride_qb, stride_qh, stride_qs,
    stride_kb, stride_kh, stride_kl,
    stride_vb, stride_vh, stride_vl,
    stride_ob, stride_oh, stride_os,
    stride_mask_b,
    # meta
    HAS_KV_LENS: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """out = softmax(q k^T * scale + mask) v per query head, online over key blocks (FlashAttention-2,
    Dao 2023, arXiv:2307.08691, Algorithm 1; Triton tutorial 06-fused-attention.py).

    q [B, Hq, S, D], k/v [B, Hkv, L, D], out [B, Hq, S, D]; kv_lens [B] int; key_mask [B, L] int.
    Program (query block, b * Hq + h) reads kv head h // group_size and only the key blocks below its
    causal bound. Scores and the running max/sum are fp32; p is cast to v's dtype for the second
    product (as the graph casts its probabilities); a row that sees no key ends with sum 0 and writes 0.
    Any head_dim runs in BLOCK_D = head_block(D) lanes: q, k, v load 0 past D, so the padded lanes add 0
    to q.k and the padded output columns are never stored.
    """
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // n_q_heads).to(tl.int64)
    h = (bh % n_q_heads).to(tl.int64)
    kv_h = h // group_size
    if HAS_KV_LENS:
        n_valid = tl.load(kv_lens_ptr + b).to(tl.int32)
    else:
        n_valid = cache_len
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # [BLOCK_M] query index
    q_pos = n_valid - seq_len + offs_m  # [BLOCK_M] cache position of each query
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < head_dim
    q = tl.load(q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :],
                mask=(offs_m[:, None] < seq_len) & d_ok[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
    k_base = k_ptr + b * stride_kb + kv_h * stride_kh
    v_base = v_ptr + b * stride_vb + kv_h * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # keys at or beyond `hi` are invisible to every query of this block
    hi = tl.minimum(n_valid, n_valid - seq_len + (pid_m + 1) * BLOCK_M)
    for start_n in range(0, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)  # [BLOCK_N]
        n_ok = offs_n < hi
        k = tl.load(k_base + offs_n[None, :] * stride_kl + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # [BLOCK_D, BLOCK_N]
        s = tl.dot(q, k) * scale_log2  # [BLOCK_M, BLOCK_N], log2 units
        visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
        if HAS_KEY_MASK:
            key_ok = tl.load(key_mask_ptr + b * stride_mask_b + offs_n, mask=n_ok, other=0) != 0
            visible = visible & key_ok[None, :]
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # no visible key yet: avoid inf - inf
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + offs_n[:, None] * stride_vl + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=(offs_m[:, None] < seq_len) & d_ok[None, :])


def check_attention_inputs(q, k, v, kv_lens, key_mask, op: str) -> None:
    """q [B, Hq, S, D], k/v [B, Hkv, L, D] with Hq % Hkv == 0; kv_lens [B]; key_mask [B, L]."""
    if q.dim() != 4 or k.dim() != 4 or k.shape != v.shape:
        raise InputError(f"{op}: q {tuple(q.shape)} must be [B, Hq, S, D] and k, v equal [B, Hkv, L, D]")
    b, hq, _, d = q.shape
    if k.shape[0] != b or k.shape[3] != d or hq % k.shape[1]:
        raise InputError(f"{op}: q {tuple(q.shape)} and k {tuple(k.shape)} disagree (batch, head_dim, or "
                         f"query heads not a multiple of kv heads)")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise InputError(f"{op}: q, k, v dtypes differ ({q.dtype}, {k.dtype}, {v.dtype})")
    if kv_lens is not None and kv_lens.shape != (b,):
        raise InputError(f"{op}: kv_lens {tuple(kv_lens.shape)} must be [{b}]")
    if key_mask is not None and key_mask.shape != (b, k.shape[2]):
        raise InputError(f"{op}: key_mask {tuple(key_mask.shape)} must be [{b}, {k.shape[2]}]")


def last_dim_contiguous(*tensors):
    return [t if t.stride(-1) == 1 else t.contiguous() for t in tensors]


def mask_pointer(key_mask: torch.Tensor | None, fallback: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(tensor to pass, row stride) for an optional [B, L] key mask; bool masks are read as bytes."""
    if key_mask is None:
        return fallback, 0
    key_mask = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
    key_mask = key_mask if key_mask.stride(-1) == 1 else key_mask.contiguous()
    return key_mask, key_mask.stride(0)


def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                      kv_lens: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                      config: KernelConfig | None = None) -> torch.Tensor:
    """q [B, Hq, S, D], k/v cache [B, Hkv, L, D] (the S queries are each row's last S valid positions)
    -> out [B, Hq, S, D] in q's dtype. scale defaults to D**-0.5."""
    check_attention_inputs(q, k, v, kv_lens, key_mask, "attention_prefill")
    config = config or DEFAULT_CONFIG
    b, hq, s, d = q.shape
    hkv, cache_len = k.shape[1], k.shape[2]
    q, k, v = last_dim_contiguous(q, k, v)
    out = torch.empty(b, hq, s, d, dtype=q.dtype, device=q.device)
    mask_arg, stride_mask = mask_pointer(key_mask, q)
    lens_arg = kv_lens.to(torch.int32) if kv_lens is not None else q
    scale = d ** -0.5 if scale is None else scale
    block_m = config["BLOCK_M"]
    launch(_attention_prefill_kernel, (triton.cdiv(s, block_m), b * hq),
           q, k, v, out, lens_arg, mask_arg,
           hq, hq // hkv, s, cache_len, d, scale * LOG2E,
           q.stride(0), q.stride(1), q.stride(2),
           k.stride(0), k.stride(1), k.stride(2),
           v.stride(0), v.stride(1), v.stride(2),
           out.stride(0), out.stride(1), out.stride(2),
           stride_mask,
           device=q.device, num_warps=config.num_warps, num_stages=config.num_stages,
           HAS_KV_LENS=kv_lens is not None, HAS_KEY_MASK=key_mask is not None,
           BLOCK_M=block_m, BLOCK_N=config["BLOCK_N"], BLOCK_D=head_block(d))
    return out


def visible_keys(b: int, s: int, cache_len: int, kv_lens, key_mask, device) -> torch.Tensor:
    """[B, S, L] bool: which cache positions each query sees (the VISIBILITY rule above)."""
    n = kv_lens.to(torch.int64) if kv_lens is not None else torch.full((b,), cache_len, device=device)
    q_pos = n[:, None] - s + torch.arange(s, device=device)  # [B, S]
    k_pos = torch.arange(cache_len, device=device)  # [L]
    visible = (k_pos[None, None, :] <= q_pos[:, :, None]) & (k_pos[None, None, :] < n[:, None, None])
    if key_mask is not None:
        visible = visible & (key_mask[:, None, :] != 0)
    return visible


def attention_prefill_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None,
                                kv_lens: torch.Tensor | None = None, key_mask: torch.Tensor | None = None,
                                config: KernelConfig | None = None) -> torch.Tensor:
    """The graph's GQA attention (grouped heads share a kv head, no repeat) in fp32, with the VISIBILITY
    rule above; rows that see no key are 0. `config` is accepted and ignored."""
    b, hq, s, d = q.shape
    hkv, cache_len = k.shape[1], k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    visible = visible_keys(b, s, cache_len, kv_lens, key_mask, q.device)  # [B, S, L]
    qg = q.float().view(b, hkv, hq // hkv, s, d)  # [B, Hkv, G, S, D]
    scores = torch.matmul(qg, k.float()[:, :, None].transpose(-1, -2)) * scale  # [B, Hkv, G, S, L]
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # a row with no visible key is all NaN -> 0
    out = torch.matmul(probs, v.float()[:, :, None])  # [B, Hkv, G, S, D]
    return out.reshape(b, hq, s, d).to(q.dtype)


CONFIG_SPACE = [KernelConfig("attention_prefill", {"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
                for bm in (16, 32, 64, 128) for bn in (16, 32, 64, 128) for w in (4, 8) for st in (1, 2, 3)]
# FlashAttention tile of Triton tutorial 06 (128 x 64, 8 warps): at head_dim 128 it compiles with no
# spills on sm_80..sm_90 (196-221 registers); 64 x 64 with 4 warps hits 255 and spills on sm_86
DEFAULT_CONFIG = KernelConfig("attention_prefill", {"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2)

COMPILE_SHAPES = ({"head_dim": 64}, {"head_dim": 128})  # Qwen3 ships 128; 64 for smaller custom specs
# every stride of q, k, v and out is a multiple of head_dim (contiguous [.., S or L, D] tensors)
STRIDES = ("stride_qb", "stride_qh", "stride_qs", "stride_kb", "stride_kh", "stride_kl", "stride_vb", "stride_vh",
           "stride_vl", "stride_ob", "stride_oh", "stride_os")


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """Prune tiles whose fp32 accumulator for a 128-dim head exceeds 128 registers per thread, and whose
    K/V stages (fp16) plus the Q tile cannot fit the arch's shared memory per block."""
    bm, bn, stages = config["BLOCK_M"], config["BLOCK_N"], config.num_stages
    acc_regs = bm * 128 // config.threads
    shared = 2 * (bm * 128 + 2 * stages * bn * 128)
    return acc_regs <= 128 and shared <= arch.max_shared_per_block and bm * bn // config.threads <= 64


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    """The kernel for one head_dim: BLOCK_D as the launcher picks it (head_block). head_dim and the strides get
    the divisibility hint head_dim earns (config.divisibility_hints): a stride like S * 24 is a multiple of 8
    for every S but of 16 only for even S, which a packed binary cannot know."""
    d = shape["head_dim"]
    return [CompileSpec(
        _attention_prefill_kernel,
        pointers={"q_ptr": dtype, "k_ptr": dtype, "v_ptr": dtype, "out_ptr": dtype, "kv_lens_ptr": "i32",
                  "key_mask_ptr": "i64"},
        constexprs={"HAS_KV_LENS": False, "HAS_KEY_MASK": True, "BLOCK_D": head_block(d)} | config.constexprs,
        **divisibility_hints({"head_dim": d} | dict.fromkeys(STRIDES, d)),
        scalars={"scale_log2": "fp32"}, num_warps=config.num_warps, num_stages=config.num_stages,
        shape=f"head_dim={d},key_mask")]
