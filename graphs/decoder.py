"""The export-friendly Qwen3 decoder (dense and MoE) in plain torch ops: the pipeline's reference graph.

Its semantics are the reference that lowering passes and every engine are checked against. It is
written for `torch.export`: no data-dependent shapes, no Python control flow on tensor values, and
an explicit KV cache (inputs `past`, outputs `present`), so one graph serves prefill and decode.
Parameter names are Hugging Face's, except the MoE experts, which are stacked per layer
(`experts.gate_up_proj` [E, 2I, H], `experts.down_proj` [E, H, I], as in transformers 5).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwen3export.spec import ModelSpec

from .functional import apply_rope, rms_norm_reference, rope_cos_sin
from .rope import rope_parameters

KVCache = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (key, value): [B, Hkv, P, D]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.custom_ops = False  # Qwen3Decoder.use_custom_ops: call qwen3export:: kernels instead

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.custom_ops:
            return torch.ops.qwen3export.rms_norm(x, self.weight, self.eps)
        return rms_norm_reference(x, self.weight, self.eps)


class Attention(nn.Module):
    """GQA attention with per-head q_norm/k_norm before RoPE, over an explicit KV cache."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        h, d = spec.hidden_size, spec.head_dim
        self.n_heads, self.n_kv, self.head_dim = spec.num_attention_heads, spec.num_key_value_heads, d
        bias = spec.attention_bias
        self.q_proj = nn.Linear(h, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.v_proj = nn.Linear(h, self.n_kv * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, h, bias=bias)
        # q_norm/k_norm: RMSNorm over head_dim, per head, before RoPE (Qwen3's change from Qwen2)
        self.q_norm = RMSNorm(d, spec.rms_norm_eps)
        self.k_norm = RMSNorm(d, spec.rms_norm_eps)
        self.scale = d ** -0.5
        self.custom_ops = False

    def forward(self, x, cos, sin, mask, past_k, past_v, attention_mask=None):
        b, s, _ = x.shape
        d, hkv, g = self.head_dim, self.n_kv, self.n_heads // self.n_kv
        if self.custom_ops:  # the same computation through qwen3export:: kernels (kernels/ops.py)
            q, k = torch.ops.qwen3export.qk_norm_rope(
                self.q_proj(x).view(b, s, self.n_heads, d), self.k_proj(x).view(b, s, hkv, d),
                self.q_norm.weight, self.k_norm.weight, cos, sin, self.q_norm.eps)  # [B, H, S, D]
            v = self.v_proj(x).view(b, s, hkv, d).transpose(1, 2)
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
            out = torch.ops.qwen3export.attention(q, k, v, attention_mask, None, self.scale)  # [B, Hq, S, D]
            return self.o_proj(out.transpose(1, 2).reshape(b, s, self.n_heads * d)), k, v
        q = self.q_norm(self.q_proj(x).view(b, s, self.n_heads, d)).transpose(1, 2)  # [B, Hq, S, D]
        k = self.k_norm(self.k_proj(x).view(b, s, hkv, d)).transpose(1, 2)  # [B, Hkv, S, D]
        v = self.v_proj(x).view(b, s, hkv, d).transpose(1, 2)  # [B, Hkv, S, D]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        k = torch.cat((past_k, k), dim=2)  # [B, Hkv, L, D], L = P + S
        v = torch.cat((past_v, v), dim=2)
        # GQA without repeating K/V: query heads of one KV group share a batch slot
        qg = q.view(b, hkv, g, s, d)  # [B, Hkv, G, S, D]
        scores = torch.matmul(qg, k[:, :, None].transpose(-1, -2)) * self.scale  # [B, Hkv, G, S, L]
        scores = scores + mask  # mask [B, 1, 1, S, L]
        probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
        out = torch.matmul(probs, v[:, :, None])  # [B, Hkv, G, S, D]
        out = out.reshape(b, self.n_heads, s, d).transpose(1, 2).reshape(b, s, self.n_heads * d)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False)
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Experts(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        e, h, i = spec.num_experts, spec.hidden_size, spec.moe_intermediate_size
        self.gate_up_proj = nn.Parameter(torch.empty(e, 2 * i, h))  # rows [0, I) gate, [I, 2I) up
        self.down_proj = nn.Parameter(torch.empty(e, h, i))


class Router(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(spec.num_experts, spec.hidden_size))


def router_topk(x: torch.Tensor, router_weight: torch.Tensor, top_k: int, norm_topk_prob: bool):
    """Router softmax in fp32 -> top-k -> optional renormalisation (transformers Qwen3MoeTopKRouter).

    x [T, H], router_weight [E, H] -> (weights [T, k] in x.dtype, expert ids [T, k] int64).
    """
    logits = F.linear(x, router_weight)  # [T, E]
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    top_w, top_i = torch.topk(probs, top_k, dim=-1)  # [T, k]
    if norm_topk_prob:
        top_w = top_w / top_w.sum(dim=-1, keepdim=True)
    return top_w.to(x.dtype), top_i


class SparseMoeBlock(nn.Module):
    """Top-k MoE with no data-dependent shapes.

    Every expert runs on every token (one [T, H] x [H, E*2I] GEMM, then a batched [E, T, I] x [E, I, H]),
    and the outputs are combined with a dense [T, E] weight matrix that is zero off the top-k. Each
    expert's weights are read once whatever T is, nothing is gathered per token, and torch.export
    captures it whole; the lowering pass replaces it with a grouped kernel that skips unrouted experts.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.top_k, self.norm_topk_prob = spec.num_experts_per_tok, spec.norm_topk_prob
        self.num_experts, self.inter = spec.num_experts, spec.moe_intermediate_size
        self.gate = Router(spec)
        self.experts = Experts(spec)
        self.custom_ops = False

    def forward(self, x):
        b, s, h = x.shape
        if self.custom_ops:
            return torch.ops.qwen3export.moe(x, self.gate.weight, self.experts.gate_up_proj, self.experts.down_proj,
                                             self.top_k, self.norm_topk_prob)
        t = x.reshape(b * s, h)  # [T, H]
        top_w, top_i = router_topk(t, self.gate.weight, self.top_k, self.norm_topk_prob)
        dense_w = torch.zeros(t.shape[0], self.num_experts, dtype=t.dtype, device=t.device).scatter(1, top_i, top_w)  # [T, E]
        e, i = self.num_experts, self.inter
        gu = F.linear(t, self.experts.gate_up_proj.reshape(e * 2 * i, h)).view(-1, e, 2 * i)  # [T, E, 2I]
        act = F.silu(gu[..., :i]) * gu[..., i:]  # [T, E, I]
        y = torch.matmul(act.transpose(0, 1), self.experts.down_proj.transpose(1, 2))  # [E, T, H]
        out = (y * dense_w.t()[..., None]).sum(0)  # [T, H]
        return out.view(b, s, h)


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, idx: int):
        super().__init__()
        self.self_attn = Attention(spec)
        self.mlp = SparseMoeBlock(spec) if spec.layer_is_moe(idx) else MLP(spec.hidden_size, spec.intermediate_size)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)

    def forward(self, x, cos, sin, mask, past_k, past_v, attention_mask=None):
        """x: the residual stream [B, S, H], fp32 in an fp16 decoder (residual_dtype); the sublayers compute in
        the weights' dtype and their outputs are added in the stream's (a no-op cast when both agree)."""
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v, attention_mask)
        x = x + a.to(x.dtype)
        x = x + self.mlp(self.post_attention_layernorm(x)).to(x.dtype)
        return x, k, v


class Body(nn.Module):
    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


def attention_mask_bias(attention_mask: torch.Tensor, s: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive mask [B, 1, 1, S, L] from a key padding mask [B, L] whose last S slots are the queries.

    Key j is visible to query i iff j <= (L - S) + i (causal over the cache) and attention_mask[b, j] != 0.
    Masked entries get finfo.min (not -inf) so a fully padded query row stays finite, as in transformers.
    """
    total = attention_mask.shape[1]
    past = total - s
    kpos = torch.arange(total, device=attention_mask.device)  # [L]
    qpos = torch.arange(s, device=attention_mask.device) + past  # [S]
    allowed = (kpos[None, :] <= qpos[:, None])[None] & (attention_mask[:, None, :] != 0)  # [B, S, L]
    zero = torch.zeros((), dtype=dtype, device=attention_mask.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=attention_mask.device)
    return torch.where(allowed, zero, neg)[:, None, None]


class Qwen3Decoder(nn.Module):
    """Qwen3 causal LM with an explicit KV cache.

    forward(input_ids [B, S], position_ids [B, S], attention_mask [B, P+S], past) -> (logits [B, S, V], present)
    where past/present are per-layer (key, value) pairs of shape [B, Hkv, P, D] / [B, Hkv, P+S, D].
    Prefill passes P = 0 (empty past); decode passes S = 1.
    """

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.spec = spec
        self.model = Body(spec)
        self.lm_head = nn.Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.register_buffer("inv_freq", torch.empty(spec.head_dim // 2), persistent=False)
        self.reset_derived()

    def reset_derived(self) -> None:
        """Re-tie lm_head to the embedding and recompute RoPE frequencies (after to_empty / dtype moves)."""
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scaling_factor = rope_parameters(self.spec.head_dim, self.spec.rope_theta,
                                                             self.spec.rope_scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    @classmethod
    def empty(cls, spec: ModelSpec, dtype: torch.dtype) -> "Qwen3Decoder":
        """Uninitialised weights of `dtype` on CPU, built without running any initialiser (0.6B+ would
        spend seconds on kaiming init that load_into overwrites anyway)."""
        with torch.device("meta"):
            module = cls(spec)
        module = module.to_empty(device="cpu").to(dtype)
        module.reset_derived()
        return module.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def use_custom_ops(self, enabled: bool = True) -> "Qwen3Decoder":
        """Route norms, q/k-norm+RoPE, attention and MoE through the qwen3export:: custom ops (Triton on
        CUDA, the interpreter under QWEN3EXPORT_TRITON_INTERPRET=1, references otherwise)."""
        # lazy: registering the qwen3export:: ops loads Triton; the plain decoder (eager references, run) never needs it
        import qwen3export.kernels.ops  # noqa: F401  (registers the ops)

        for m in self.modules():
            if hasattr(m, "custom_ops"):
                m.custom_ops = enabled
        return self

    def empty_cache(self, batch: int) -> KVCache:
        s = self.spec
        z = torch.zeros(batch, s.num_key_value_heads, 0, s.head_dim, dtype=self.dtype, device=self.model.embed_tokens.weight.device)
        return tuple((z, z) for _ in range(s.num_hidden_layers))

    @property
    def residual_dtype(self) -> torch.dtype:
        """The residual stream's dtype: fp32 in an fp16 decoder, else the weights'. Trained Qwen3 residuals hold
        massive activations in the thousands (tens of thousands in larger models) where fp16's spacing is 1-32
        and its range ends at 65,504; every GPU target adds in fp32 at no cost next to the GEMMs. bf16 keeps
        fp32's range and stays as transformers runs it."""
        return torch.float32 if self.dtype == torch.float16 else self.dtype

    def forward(self, input_ids, position_ids, attention_mask, past: KVCache):
        dtype = self.dtype  # the compute dtype of the GEMMs, attention and KV cache
        x = self.model.embed_tokens(input_ids).to(self.residual_dtype)  # [B, S, H]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, dtype, self.rope_scaling_factor)
        mask = attention_mask_bias(attention_mask, input_ids.shape[1], dtype)
        present = []
        for layer, (pk, pv) in zip(self.model.layers, past):
            x, k, v = layer(x, cos, sin, mask, pk, pv, attention_mask)
            present.append((k, v))
        logits = self.lm_head(self.model.norm(x))  # [B, S, V]
        return logits, tuple(present)
