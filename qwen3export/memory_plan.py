"""Memory plan: what a model needs per rank on a target, from its ModelSpec alone (no weights read).

Used by `qwen3export plan` before a build. Model of the layout (stated so it can be checked):
- ranks = tp x ep. Tensor parallelism splits attention heads (q/k/v columns, o rows), dense-MLP and
  per-expert intermediate columns/rows, and the embedding / lm_head vocabulary, by tp. Expert
  parallelism places num_experts / ep whole experts on each rank. Norms and the router are replicated.
  graphs/parallel.py builds exactly this layout (rank = ep_rank * tp + tp_rank; vocabulary rows
  ceil(V/tp) per rank, zero-padded), and check_parallelism below is the one check both use.
- Quantized weights (int8 / int4 / fp8) cover the linear layers of attention, MLP and experts; the
  embedding, norms and router stay in the activation dtype, the lm_head too unless quantize_lm_head.
  int8/fp8 carry one fp16 scale per output channel, int4 one fp16 scale per group of `group_size`.
- KV cache: 2 (K, V) x layers x kv heads per rank x head_dim x dtype bytes per token; kv heads per rank
  = kv_heads / tp (tp must divide both head counts).
- Activation workspace (peak of one forward, prefill of max_batch x max_seq tokens chunked to 4096
  tokens): hidden states (residual + normed + q/k/v + attention out + MLP intermediate x 3) plus fp32
  logits of the last position of each sequence; flash attention, so no S x S scores.
- Fits when weights + KV cache + workspace <= 90 % of device memory (the rest: CUDA context, allocator
  fragmentation, runtime buffers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .errors import InputError, TargetError
from qwen3export.graphs.parallel import check_parallelism

from .manifest import ServingRecord
from .spec import ModelSpec

QUANT_MODES = ("none", "int8", "int4", "fp8")
DTYPE_BYTES = {"fp32": 4, "fp16": 2, "bf16": 2}
USABLE_FRACTION = 0.9
PREFILL_CHUNK = 4096
GiB = 1024**3


@dataclass(frozen=True)
class PlanOptions:
    dtype: str = "bf16"
    quant: str = "none"
    group_size: int = 128
    quantize_lm_head: bool = False
    tp: int = 1
    ep: int = 1
    max_batch: int = 1
    max_seq: int | None = None  # default: the model's max positions


def _linear_bytes(rows: int, cols: int, quant: str, act_bytes: int, group: int) -> float:
    """Bytes of one [rows, cols] weight (rows = output channels)."""
    n = rows * cols
    if quant == "none":
        return n * act_bytes
    if quant in ("int8", "fp8"):
        return n + rows * 2
    return n / 2 + rows * -(-cols // group) * 2  # int4


def memory_plan(spec: ModelSpec, memory_bytes: int, opts: PlanOptions) -> dict[str, Any]:
    if opts.quant not in QUANT_MODES:
        raise InputError(f"unknown --quant {opts.quant!r}; choose from {', '.join(QUANT_MODES)}")
    if opts.dtype not in DTYPE_BYTES:
        raise InputError(f"unknown --dtype {opts.dtype!r}; choose from {', '.join(DTYPE_BYTES)}")
    if opts.max_batch < 1:
        raise InputError(f"--max-batch must be >= 1, got {opts.max_batch}")
    max_seq = opts.max_seq or spec.max_positions
    if not 1 <= max_seq <= spec.max_positions:
        raise InputError(f"--max-seq {max_seq} must be in 1..{spec.max_positions} (the model's positions; "
                         "longer needs --rope-scaling)")
    check_parallelism(spec, opts.tp, opts.ep)
    tp, ep, a = opts.tp, opts.ep, DTYPE_BYTES[opts.dtype]
    q, g = opts.quant, opts.group_size
    h, d = spec.hidden_size, spec.head_dim
    nq, nkv = spec.num_attention_heads // tp, spec.num_key_value_heads // tp

    attn = (_linear_bytes(nq * d, h, q, a, g) + 2 * _linear_bytes(nkv * d, h, q, a, g)
            + _linear_bytes(h, nq * d, q, a, g) + 2 * d * a)
    per_layer, moe_layer_bytes = [], 0.0
    for i in range(spec.num_hidden_layers):
        if spec.layer_is_moe(i):
            inter = spec.moe_intermediate_size // tp
            expert = 2 * _linear_bytes(inter, h, q, a, g) + _linear_bytes(h, inter, q, a, g)
            mlp = spec.num_experts // ep * expert + spec.num_experts * h * a
            moe_layer_bytes = max(moe_layer_bytes, mlp)
        else:
            inter = spec.intermediate_size // tp
            mlp = 2 * _linear_bytes(inter, h, q, a, g) + _linear_bytes(h, inter, q, a, g)
        per_layer.append(attn + mlp + 2 * h * a)
    vocab = spec.vocab_size // tp + (spec.vocab_size % tp > 0)
    embed = vocab * h * a
    head = 0.0 if spec.tie_word_embeddings else (
        _linear_bytes(vocab, h, q, a, g) if opts.quantize_lm_head else vocab * h * a)
    weights = sum(per_layer) + embed + head + h * a

    kv_per_token = 2 * spec.num_hidden_layers * nkv * d * a
    kv_per_seq = kv_per_token * max_seq
    kv_total = kv_per_seq * opts.max_batch
    tokens = min(opts.max_batch * max_seq, PREFILL_CHUNK)
    widest = max([spec.intermediate_size if any(not spec.layer_is_moe(i) for i in range(spec.num_hidden_layers))
                  else 0, spec.moe_intermediate_size * spec.num_experts_per_tok if spec.is_moe else 0]) // tp
    workspace = tokens * (4 * h + (nq + 2 * nkv) * d + 3 * widest) * a + opts.max_batch * spec.vocab_size * 4
    need = weights + kv_total + workspace
    usable = memory_bytes * USABLE_FRACTION
    return {
        "model": spec.name, "dtype": opts.dtype, "quant": opts.quant, "tp": tp, "ep": ep, "ranks": tp * ep,
        "max_batch": opts.max_batch, "max_seq": max_seq,
        "param_count": spec.param_count(),
        "per_rank": {
            "weight_bytes": int(weights),
            "largest_layer_bytes": int(max(per_layer)),
            "kv_cache_bytes_per_token": int(kv_per_token),
            "kv_cache_bytes_per_sequence": int(kv_per_seq),
            "kv_cache_bytes": int(kv_total),
            "activation_workspace_bytes": int(workspace),
            "total_bytes": int(need),
        },
        "device_memory_bytes": int(memory_bytes),
        "usable_memory_bytes": int(usable),
        "fits": need <= usable,
        "headroom_bytes": int(usable - need),
        "assumptions": "see qwen3export/memory_plan.py docstring; figures are modelled from the spec, not measured",
    }


def host_memory_bytes() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def available_memory_bytes() -> int:
    """MemAvailable from /proc/meminfo (Linux), else the machine's physical memory."""
    try:
        for line in open("/proc/meminfo"):
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return host_memory_bytes()


def plan_for_target(spec: ModelSpec, target, opts: PlanOptions) -> dict[str, Any]:
    memory = target.memory_bytes or (host_memory_bytes() if target.kind == "cpu" else 0)
    if not memory:
        raise TargetError(f"target {target.name} has no memory size in its spec; cannot plan for it")
    out = memory_plan(spec, memory, opts)
    out["target"] = target.name
    return out


def memory_plan_summary(p: dict[str, Any]) -> str:
    r = p["per_rank"]
    verdict = (f"fits with {p['headroom_bytes'] / GiB:.1f} GiB to spare" if p["fits"]
               else f"does NOT fit: {-p['headroom_bytes'] / GiB:.1f} GiB over")
    return "\n".join([
        f"{p['model']} on {p['target']} ({p['dtype']}, quant {p['quant']}, tp {p['tp']} x ep {p['ep']} = "
        f"{p['ranks']} ranks), batch {p['max_batch']} x {p['max_seq']} tokens  [modelled]",
        f"  parameters            {p['param_count'] / 1e9:,.2f} B",
        f"  weights per rank      {r['weight_bytes'] / GiB:,.2f} GiB (largest layer {r['largest_layer_bytes'] / GiB:.2f} GiB)",
        f"  KV cache per sequence {r['kv_cache_bytes_per_sequence'] / GiB:,.2f} GiB ({r['kv_cache_bytes_per_token']:,} B/token)",
        f"  KV cache at batch     {r['kv_cache_bytes'] / GiB:,.2f} GiB",
        f"  activation workspace  {r['activation_workspace_bytes'] / GiB:,.2f} GiB",
        f"  total per rank        {r['total_bytes'] / GiB:,.2f} GiB of {p['usable_memory_bytes'] / GiB:,.1f} GiB usable "
        f"({USABLE_FRACTION:.0%} of {p['device_memory_bytes'] / GiB:,.0f} GiB): {verdict}",
    ])


DEFAULT_SERVING_SEQ = 8192  # an engine's default --max-seq: min(model positions, this)


def serving_limits(spec: ModelSpec, target, dtype: str, quant: str = "none", group_size: int = 128,
                 quantize_lm_head: bool = False, tp: int = 1, ep: int = 1, max_batch: int = 1,
                 max_seq: int | None = None) -> ServingRecord:
    """What a build records as the engine's serving limits (`--max-batch`, `--max-seq`) with the modelled
    memory of its KV cache at those limits: the manifest's `serving` entry, and what `run` enforces.

    A GPU target whose memory cannot hold the plan is refused with one line before any work (that engine
    would not run there); for the cpu target the plan is recorded (the build machine is not the serving one)."""
    seq = max_seq or min(spec.max_positions, DEFAULT_SERVING_SEQ)
    p = plan_for_target(spec, target, PlanOptions(dtype=dtype, quant=quant, group_size=group_size,
                                                  quantize_lm_head=quantize_lm_head, tp=tp, ep=ep,
                                                  max_batch=max_batch, max_seq=seq))
    if target.kind == "gpu" and not p["fits"]:
        r = p["per_rank"]
        raise TargetError(
            f"{spec.name} does not fit {target.name} at {dtype} quant {quant}, batch {max_batch} x {seq} tokens: "
            f"{r['total_bytes'] / GiB:.1f} GiB per rank (weights {r['weight_bytes'] / GiB:.1f}, KV cache "
            f"{r['kv_cache_bytes'] / GiB:.1f}) of {p['usable_memory_bytes'] / GiB:.1f} GiB usable [modelled]; lower "
            "--max-batch/--max-seq, use --quant int4 or --dtype bf16, or shard with --tp/--ep "
            "(`qwen3export plan` shows the figures)")
    r = p["per_rank"]
    return {"max_batch": max_batch, "max_seq": seq, "dtype": dtype, "quant": quant, "ranks": tp * ep,
            "kv_cache_bytes_per_token": r["kv_cache_bytes_per_token"],
            "kv_cache_bytes_per_sequence": r["kv_cache_bytes_per_sequence"],
            "kv_cache_bytes": r["kv_cache_bytes"], "total_bytes_per_rank": r["total_bytes"],
            "target_memory_bytes": p["device_memory_bytes"], "fits": p["fits"], "figures": "modelled"}
