"""Tensor- and expert-parallel Qwen3 decoders: one rank's slice of Qwen3Decoder plus the collectives that
recombine it (Megatron-style), written so that torch.export captures a rank like the unsharded graph.

Layout (the one qwen3export/memory_plan.py sizes): world = tp x ep ranks, rank = ep_rank * tp + tp_rank (TP
innermost, so a TP group is contiguous ranks, e.g. one NVLink island).
- Attention: q/k/v column-parallel by heads (nq/tp query heads, nkv/tp KV heads per rank, so the KV cache
  holds only the rank's KV heads), o_proj row-parallel, then an all-reduce over the TP group.
- Dense MLP: gate/up column-parallel, down row-parallel, all-reduce over the TP group.
- MoE: the router is replicated; EP places num_experts/ep whole experts on a rank and TP splits each
  expert's intermediate columns/rows. Each rank applies its experts to every token routed to them (the
  reference's dense form: zero weight for unrouted tokens) and one all-reduce over all tp x ep ranks sums
  the partial outputs. Why all-reduce and not all-to-all: attention here is tensor-parallel, not
  data-parallel, so every rank already holds every token and there is nothing to dispatch; the combine is
  one [T, H] sum (2 (N-1)/N T H elements sent per rank on a ring), whereas an all-to-all dispatch + combine
  needs data-dependent per-expert token counts, the `nonzero()` that breaks torch.export of HF's MoE
  (DESIGN.md section 6). All-to-all pays off with data-parallel attention and long prefills (tokens
  sharded over ranks, top_k = 8 of 128 experts); that is a later, optional path.
- Embedding and lm_head: vocab-parallel by tp (ceil(V/tp) rows per rank, the last rank zero-padded).
  The embedding masks ids outside the rank's rows and all-reduces; the lm_head's logits are all-gathered
  so every rank holds the full [B, S, V] logits and can pick the next token itself. Norms replicated.
- Across EP groups attention and dense MLPs are replicated (computed redundantly), as plan.py assumes.

Collectives are torch.ops._c10d_functional ops on group *role names* (TP_GROUP, WORLD_GROUP), not on
process-group objects: the rank module traces on one process with no process group (fake tensors only),
and at run time each process registers its own TP group under the role name (init_parallel_groups).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from qwen3export.errors import InputError
from qwen3export.spec import ModelSpec

from .decoder import MLP, Attention, KVCache, RMSNorm, Router, attention_mask_bias, rope_cos_sin, router_topk
from .rope import rope_parameters

TP_GROUP = "qwen3export.tp"  # this rank's tensor-parallel group: tp ranks sharing one expert placement
WORLD_GROUP = "qwen3export.world"  # all tp x ep ranks (the MoE combine)


def _divisors(*values: int) -> str:
    common = [d for d in range(1, min(values) + 1) if all(v % d == 0 for v in values)]
    return ", ".join(map(str, common))


def check_parallelism(spec: ModelSpec, tp: int, ep: int) -> None:
    """TP must divide the query and KV heads and the MLP widths; EP must divide the experts.

    The one check shared by `plan`, the rank graphs (graphs/parallel.py) and the parallel build; each
    message names the field and the valid degrees.
    """
    if tp < 1 or ep < 1:
        raise InputError(f"--tp and --ep must be >= 1, got tp={tp} ep={ep}")
    fields = [("num_attention_heads", spec.num_attention_heads), ("num_key_value_heads", spec.num_key_value_heads)]
    if any(not spec.layer_is_moe(i) for i in range(spec.num_hidden_layers)):
        fields.append(("intermediate_size", spec.intermediate_size))
    if spec.is_moe:
        fields.append(("moe_intermediate_size", spec.moe_intermediate_size))
    valid_tp = _divisors(*(v for _, v in fields))
    for name, value in fields:
        if value % tp:
            raise InputError(f"--tp {tp} does not divide {name} ({value}) of {spec.name}; valid --tp: {valid_tp}")
    if ep > 1 and not spec.is_moe:
        raise InputError(f"--ep {ep} needs a mixture-of-experts model; {spec.name} is dense (valid --ep: 1)")
    if spec.is_moe and spec.num_experts % ep:
        raise InputError(f"--ep {ep} does not divide num_experts ({spec.num_experts}) of {spec.name}; "
                         f"valid --ep: {_divisors(spec.num_experts)}")


@dataclass(frozen=True)
class RankLayout:
    """Which slice of the model one rank holds."""

    tp: int
    ep: int
    rank: int

    @property
    def world(self) -> int:
        return self.tp * self.ep

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp

    @property
    def ep_rank(self) -> int:
        return self.rank // self.tp

    def _part(self, n: int, parts: int, index: int) -> tuple[int, int]:
        size = n // parts
        return index * size, (index + 1) * size

    def heads(self, spec: ModelSpec) -> tuple[int, int]:
        return self._part(spec.num_attention_heads, self.tp, self.tp_rank)

    def kv_heads(self, spec: ModelSpec) -> tuple[int, int]:
        return self._part(spec.num_key_value_heads, self.tp, self.tp_rank)

    def columns(self, width: int) -> tuple[int, int]:
        """The rank's slice of an MLP / expert intermediate dimension."""
        return self._part(width, self.tp, self.tp_rank)

    def experts(self, spec: ModelSpec) -> tuple[int, int]:
        return self._part(spec.num_experts, self.ep, self.ep_rank) if spec.is_moe else (0, 0)

    def vocab(self, spec: ModelSpec) -> tuple[int, int]:
        """Rows [start, start + ceil(V/tp)); rows past V are zero padding (on the last rank)."""
        rows = -(-spec.vocab_size // self.tp)
        return self.tp_rank * rows, (self.tp_rank + 1) * rows

    def to_dict(self, spec: ModelSpec) -> dict[str, Any]:
        return {"rank": self.rank, "tp_rank": self.tp_rank, "ep_rank": self.ep_rank,
                "heads": list(self.heads(spec)), "kv_heads": list(self.kv_heads(spec)),
                "experts": list(self.experts(spec)), "vocab": list(self.vocab(spec))}


def layouts(spec: ModelSpec, tp: int, ep: int) -> list[RankLayout]:
    """All ranks' layouts, after checking the degrees (one-line InputError before any work)."""
    check_parallelism(spec, tp, ep)
    return [RankLayout(tp, ep, r) for r in range(tp * ep)]


# ---------------------------------------------------------------------- collectives
def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Sum over the ranks of `group` (a role name registered by init_parallel_groups)."""
    return torch.ops._c10d_functional.wait_tensor(torch.ops._c10d_functional.all_reduce(x, "sum", group))


def all_gather_last(x: torch.Tensor, parts: int, group: str) -> torch.Tensor:
    """[B, S, N] per rank -> [B, S, parts * N], rank-ordered along the last dim (gathered along dim 0)."""
    b, s, n = x.shape
    g = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), parts, group))  # [parts*B, S, N]
    return g.view(parts, b, s, n).permute(1, 2, 0, 3).reshape(b, s, parts * n)


def init_parallel_groups(layout: RankLayout) -> None:
    """After torch.distributed.init_process_group(world = tp x ep): make the TP groups (every rank takes
    part in creating each) and register this rank's TP group and the world under the role names the rank
    graphs name. Re-registers when called again with another layout (one process group, many layouts).

    Uses torch's name registry (`_register_process_group`), the lookup functional collectives resolve
    group names through; it is private API (torch 2.13), so this is the one place that touches it.
    """
    # lazy: rank processes only (the graphs build and trace without a process group), and torch's private
    # c10d registry is touched nowhere else
    import torch.distributed as dist
    from torch._C._distributed_c10d import _register_process_group, _resolve_process_group, _unregister_process_group

    world = dist.get_world_size()
    if world != layout.world:
        raise InputError(f"the process group has {world} ranks but tp {layout.tp} x ep {layout.ep} needs "
                         f"{layout.world}; launch {layout.world} processes")
    mine = dist.group.WORLD  # TP group when tp == world; unused when tp == 1
    if 1 < layout.tp < world:
        for e in range(layout.ep):  # new_group must be called by every rank, for every group, in order
            group = dist.new_group(list(range(e * layout.tp, (e + 1) * layout.tp)))
            if e == layout.ep_rank:
                mine = group
    for name, group in ((TP_GROUP, mine), (WORLD_GROUP, dist.group.WORLD)):
        try:
            _resolve_process_group(name)
            _unregister_process_group(name)
        except (RuntimeError, ValueError):
            pass  # not registered yet
        _register_process_group(name, group)


# ---------------------------------------------------------------------- rank modules
class VocabParallelEmbedding(nn.Module):
    """Rows [start, start + rows) of the embedding; ids outside give zeros, then the TP all-reduce adds
    the one rank's row that holds each id (exact: the other terms are zeros)."""

    def __init__(self, start: int, rows: int, hidden: int, tp: int):
        super().__init__()
        self.start, self.rows, self.tp = start, rows, tp
        self.weight = nn.Parameter(torch.empty(rows, hidden))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        inside = (local >= 0) & (local < self.rows)  # [B, S]
        x = F.embedding(local.clamp(0, self.rows - 1), self.weight)  # [B, S, H]
        return all_reduce(torch.where(inside[..., None], x, torch.zeros_like(x)), TP_GROUP)


class RankExperts(nn.Module):
    """The rank's experts, stacked as in graphs/decoder.py Experts, each cut to the rank's columns."""

    def __init__(self, experts: int, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(experts, 2 * inter, hidden))  # rows [0, I) gate, [I, 2I) up
        self.down_proj = nn.Parameter(torch.empty(experts, hidden, inter))


class RankMoeBlock(nn.Module):
    """SparseMoeBlock over the rank's experts: the replicated router picks top-k of all E experts, the
    rank applies only its own [e0, e1) (a zero weight for every other expert), the caller all-reduces."""

    def __init__(self, spec: ModelSpec, layout: RankLayout):
        super().__init__()
        self.top_k, self.norm_topk_prob, self.num_experts = spec.num_experts_per_tok, spec.norm_topk_prob, spec.num_experts
        self.first, last = layout.experts(spec)
        self.local = last - self.first
        c0, c1 = layout.columns(spec.moe_intermediate_size)
        self.inter = c1 - c0
        self.gate = Router(spec)
        self.experts = RankExperts(self.local, spec.hidden_size, self.inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        t = x.reshape(b * s, h)  # [T, H]
        top_w, top_i = router_topk(t, self.gate.weight, self.top_k, self.norm_topk_prob)
        dense_w = torch.zeros(t.shape[0], self.num_experts, dtype=t.dtype, device=t.device).scatter(1, top_i, top_w)  # [T, E]
        w = dense_w[:, self.first:self.first + self.local]  # [T, El]
        e, i = self.local, self.inter
        gu = F.linear(t, self.experts.gate_up_proj.reshape(e * 2 * i, h)).view(-1, e, 2 * i)  # [T, El, 2Il]
        act = F.silu(gu[..., :i]) * gu[..., i:]  # [T, El, Il]
        y = torch.matmul(act.transpose(0, 1), self.experts.down_proj.transpose(1, 2))  # [El, T, H]
        return (y * w.t()[..., None]).sum(0).view(b, s, h)


class RankDecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layout: RankLayout, idx: int):
        super().__init__()
        h0, h1 = layout.heads(spec)
        k0, k1 = layout.kv_heads(spec)
        # graphs/decoder.py Attention over the rank's heads; o_proj's bias lives on TP rank 0 only
        self.self_attn = Attention(spec.replace(num_attention_heads=h1 - h0, num_key_value_heads=k1 - k0))
        self.is_moe = spec.layer_is_moe(idx)
        if self.is_moe:
            self.mlp: nn.Module = RankMoeBlock(spec, layout)
        else:
            c0, c1 = layout.columns(spec.intermediate_size)
            self.mlp = MLP(spec.hidden_size, c1 - c0)
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.tp, self.world = layout.tp, layout.world

    def forward(self, x, cos, sin, mask, past_k, past_v, attention_mask=None):
        a, k, v = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_k, past_v, attention_mask)
        if self.tp > 1:
            a = all_reduce(a, TP_GROUP)  # row-parallel o_proj
        x = x + a
        m = self.mlp(self.post_attention_layernorm(x))
        if self.is_moe and self.world > 1:
            m = all_reduce(m, WORLD_GROUP)  # experts on ep ranks x columns on tp ranks
        elif not self.is_moe and self.tp > 1:
            m = all_reduce(m, TP_GROUP)  # row-parallel down_proj
        return x + m, k, v


class RankBody(nn.Module):
    def __init__(self, spec: ModelSpec, layout: RankLayout):
        super().__init__()
        v0, v1 = layout.vocab(spec)
        self.embed_tokens = VocabParallelEmbedding(v0, v1 - v0, spec.hidden_size, layout.tp)
        self.layers = nn.ModuleList(RankDecoderLayer(spec, layout, i) for i in range(spec.num_hidden_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class RankDecoder(nn.Module):
    """One rank of a tp x ep Qwen3 decoder, with Qwen3Decoder's signature and parameter names.

    forward(input_ids [B, S], position_ids [B, S], attention_mask [B, P+S], past) -> (logits [B, S, V], present)
    with past/present [B, Hkv/tp, P(+S), D] per layer. Every rank returns the full logits.
    """

    def __init__(self, spec: ModelSpec, layout: RankLayout):
        super().__init__()
        check_parallelism(spec, layout.tp, layout.ep)
        self.spec, self.layout = spec, layout
        self.model = RankBody(spec, layout)
        self.lm_head = nn.Linear(spec.hidden_size, self.model.embed_tokens.rows, bias=False)
        self.register_buffer("inv_freq", torch.empty(spec.head_dim // 2), persistent=False)
        self.reset_derived()

    def reset_derived(self) -> None:
        if self.spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        inv_freq, self.rope_scaling_factor = rope_parameters(self.spec.head_dim, self.spec.rope_theta,
                                                             self.spec.rope_scaling)
        self.inv_freq = inv_freq.to(self.inv_freq.device)

    @classmethod
    def empty(cls, spec: ModelSpec, layout: RankLayout, dtype: torch.dtype) -> "RankDecoder":
        with torch.device("meta"):
            module = cls(spec, layout)
        module = module.to_empty(device="cpu").to(dtype)
        module.reset_derived()
        return module.eval()

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    @property
    def kv_heads(self) -> int:
        k0, k1 = self.layout.kv_heads(self.spec)
        return k1 - k0

    def empty_cache(self, batch: int) -> KVCache:
        w = self.model.embed_tokens.weight
        z = torch.zeros(batch, self.kv_heads, 0, self.spec.head_dim, dtype=w.dtype, device=w.device)
        return tuple((z, z) for _ in range(self.spec.num_hidden_layers))

    def forward(self, input_ids, position_ids, attention_mask, past: KVCache):
        x = self.model.embed_tokens(input_ids)  # [B, S, H]
        cos, sin = rope_cos_sin(position_ids, self.inv_freq, x.dtype, self.rope_scaling_factor)
        mask = attention_mask_bias(attention_mask, input_ids.shape[1], x.dtype)
        present = []
        for layer, (pk, pv) in zip(self.model.layers, past):
            x, k, v = layer(x, cos, sin, mask, pk, pv, attention_mask)
            present.append((k, v))
        logits = self.lm_head(self.model.norm(x))  # [B, S, ceil(V/tp)]
        if self.layout.tp > 1:
            logits = all_gather_last(logits, self.layout.tp, TP_GROUP)[..., :self.spec.vocab_size]  # [B, S, V]
        return logits, tuple(present)


# ---------------------------------------------------------------------- weights
def _get(source: Any, name: str) -> torch.Tensor:
    return source[name] if isinstance(source, Mapping) else source.get(name)


def rank_tensors(spec: ModelSpec, source: Any, layout: RankLayout,
                 dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
    """(RankDecoder parameter name, tensor) for one rank, one tensor at a time.

    `source` is a WeightSource (weights.py) or a mapping of Hugging Face names to full tensors. Each
    full tensor is read once, sliced and copied, so a streamed build holds one full tensor at a time
    (per expert for stacked experts).
    """
    check_parallelism(spec, layout.tp, layout.ep)
    d = spec.head_dim
    h0, h1 = (x * d for x in layout.heads(spec))
    k0, k1 = (x * d for x in layout.kv_heads(spec))

    def rows(name: str, a: int, b: int) -> torch.Tensor:
        return _get(source, name)[a:b].to(dtype).clone()

    v0, v1 = layout.vocab(spec)

    def vocab(name: str) -> torch.Tensor:
        full = _get(source, name)
        out = torch.zeros(v1 - v0, full.shape[1], dtype=dtype)
        part = full[v0:min(v1, spec.vocab_size)]
        out[:part.shape[0]] = part.to(dtype)
        return out

    yield "model.embed_tokens.weight", vocab("model.embed_tokens.weight")
    if not spec.tie_word_embeddings:
        yield "lm_head.weight", vocab("lm_head.weight")
    yield "model.norm.weight", rows("model.norm.weight", 0, spec.hidden_size)
    for li in range(spec.num_hidden_layers):
        p = f"model.layers.{li}."
        for n in ("input_layernorm", "post_attention_layernorm", "self_attn.q_norm", "self_attn.k_norm"):
            yield p + n + ".weight", _get(source, p + n + ".weight").to(dtype).clone()
        for proj, (a, b) in (("q_proj", (h0, h1)), ("k_proj", (k0, k1)), ("v_proj", (k0, k1))):
            yield p + f"self_attn.{proj}.weight", rows(p + f"self_attn.{proj}.weight", a, b)
            if spec.attention_bias:
                yield p + f"self_attn.{proj}.bias", rows(p + f"self_attn.{proj}.bias", a, b)
        yield p + "self_attn.o_proj.weight", _get(source, p + "self_attn.o_proj.weight")[:, h0:h1].to(dtype).clone()
        if spec.attention_bias:  # added once, after the all-reduce: by TP rank 0
            bias = _get(source, p + "self_attn.o_proj.bias").to(dtype).clone()
            yield p + "self_attn.o_proj.bias", bias if layout.tp_rank == 0 else torch.zeros_like(bias)
        if spec.layer_is_moe(li):
            c0, c1 = layout.columns(spec.moe_intermediate_size)
            e0, e1 = layout.experts(spec)
            q = p + "mlp.experts."
            yield p + "mlp.gate.weight", _get(source, p + "mlp.gate.weight").to(dtype).clone()
            yield q + "gate_up_proj", torch.stack([
                torch.cat((rows(f"{q}{e}.gate_proj.weight", c0, c1), rows(f"{q}{e}.up_proj.weight", c0, c1)))
                for e in range(e0, e1)])  # [El, 2Il, H]
            yield q + "down_proj", torch.stack([
                _get(source, f"{q}{e}.down_proj.weight")[:, c0:c1].to(dtype).clone() for e in range(e0, e1)])
        else:
            c0, c1 = layout.columns(spec.intermediate_size)
            yield p + "mlp.gate_proj.weight", rows(p + "mlp.gate_proj.weight", c0, c1)
            yield p + "mlp.up_proj.weight", rows(p + "mlp.up_proj.weight", c0, c1)
            yield p + "mlp.down_proj.weight", _get(source, p + "mlp.down_proj.weight")[:, c0:c1].to(dtype).clone()


def shard_weights(spec: ModelSpec, source: Any, rank: int, tp: int, ep: int,
                  dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """One rank's tensors by RankDecoder parameter name (see rank_tensors)."""
    return dict(rank_tensors(spec, source, RankLayout(tp, ep, rank), dtype))


@torch.no_grad()
def build_rank_module(spec: ModelSpec, layout: RankLayout, tensors: Mapping[str, torch.Tensor],
                      dtype: torch.dtype = torch.float32) -> RankDecoder:
    """The eager RankDecoder holding `tensors` (shard_weights' output)."""
    module = RankDecoder.empty(spec, layout, dtype)
    params = dict(module.named_parameters())  # tied lm_head appears once, as model.embed_tokens.weight
    missing, unexpected = sorted(set(params) - set(tensors)), sorted(set(tensors) - set(params))
    if missing or unexpected:
        raise InputError(f"rank {layout.rank} tensors do not match its module: missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}; shard with the same spec, tp and ep")
    for name, p in params.items():
        if tuple(tensors[name].shape) != tuple(p.shape):
            raise InputError(f"rank {layout.rank} tensor {name} has shape {list(tensors[name].shape)}, "
                             f"the module wants {list(p.shape)}; shard with the same spec, tp and ep")
        p.copy_(tensors[name])
    return module


# ---------------------------------------------------------------------- capture
def meta_rank_decoder(spec: ModelSpec, layout: RankLayout, dtype: torch.dtype) -> RankDecoder:
    """A rank's decoder with every parameter and buffer on the meta device (nothing allocated); the RoPE
    frequencies stay fp32 as in the eager module (reset_derived), so the traced graph casts as eager does."""
    with torch.device("meta"):
        module = RankDecoder(spec, layout)
    module = module.to(dtype)
    module.reset_derived()
    return module.eval()


