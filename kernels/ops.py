"""The `qwen3export::` custom ops that lowering passes put into the exported graph, each with a fake (meta)
implementation for torch.export. CUDA tensors run the Triton launchers; CPU tensors run the pure-torch
references, or the Triton kernels through the interpreter when QWEN3EXPORT_TRITON_INTERPRET=1 (kernels/launch.py).
"""

from __future__ import annotations

import torch

from qwen3export.kernels.selected_configs import selected_config
from qwen3export.kernels.attention_decode import attention_decode
from qwen3export.kernels.attention_prefill import attention_prefill, attention_prefill_reference
from qwen3export.kernels.fp8_matmul import fp8_matmul, fp8_matmul_reference
from qwen3export.kernels.fused_moe import fused_moe, fused_moe_reference
from qwen3export.kernels.fused_moe_wq import fused_moe_wq, fused_moe_wq_reference
from qwen3export.kernels.launch import ops_run_triton
from qwen3export.kernels.moe_routing import moe_routing, moe_routing_reference
from qwen3export.kernels.qk_norm_rope import qk_norm_rope, qk_norm_rope_reference
from qwen3export.kernels.rms_norm import add_rms_norm, add_rms_norm_reference, rms_norm, rms_norm_reference
from qwen3export.kernels.wq_matmul import wq_matmul, wq_matmul_reference

Tensor = torch.Tensor


def _rows(x: Tensor) -> int:
    """Tokens in a [..., N] activation: the M of the norm kernels' tuned buckets."""
    return x.numel() // max(x.shape[-1], 1)


@torch.library.custom_op("qwen3export::rms_norm", mutates_args=())
def rms_norm_op(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """x [..., N], weight [N] -> [..., N] (graphs/decoder.py rms_norm_reference)."""
    if ops_run_triton(x):
        return rms_norm(x, weight, eps, selected_config("rms_norm", M=_rows(x)))
    return rms_norm_reference(x, weight, eps)


@rms_norm_op.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=weight.dtype)


@torch.library.custom_op("qwen3export::add_rms_norm", mutates_args=())
def add_rms_norm_op(x: Tensor, residual: Tensor, weight: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """(rms_norm(x + residual), x + residual): the residual add that precedes every decoder-layer norm."""
    if ops_run_triton(x):
        return add_rms_norm(x, residual, weight, eps, selected_config("rms_norm", M=_rows(x)))
    return add_rms_norm_reference(x, residual, weight, eps)


@add_rms_norm_op.register_fake
def _(x, residual, weight, eps):
    return x.new_empty(x.shape, dtype=weight.dtype), torch.empty_like(x)


@torch.library.custom_op("qwen3export::qk_norm_rope", mutates_args=())
def qk_norm_rope_op(q: Tensor, k: Tensor, q_weight: Tensor, k_weight: Tensor, cos: Tensor, sin: Tensor,
                    eps: float) -> tuple[Tensor, Tensor]:
    """q [B, S, Hq, D], k [B, S, Hkv, D], cos/sin [B, S, D] -> (q [B, Hq, S, D], k [B, Hkv, S, D])."""
    if ops_run_triton(q):
        return qk_norm_rope(q, k, q_weight, k_weight, cos, sin, eps,
                            selected_config("qk_norm_rope", M=q.shape[0] * q.shape[1]))
    return qk_norm_rope_reference(q, k, q_weight, k_weight, cos, sin, eps)


@qk_norm_rope_op.register_fake
def _(q, k, q_weight, k_weight, cos, sin, eps):
    b, s, hq, d = q.shape
    return q.new_empty(b, hq, s, d), k.new_empty(b, k.shape[2], s, d)


@torch.library.custom_op("qwen3export::attention", mutates_args=())
def attention_op(q: Tensor, k: Tensor, v: Tensor, attention_mask: Tensor | None, kv_lens: Tensor | None,
                 scale: float) -> Tensor:
    """Causal GQA attention of q [B, Hq, S, D] over the whole cache k/v [B, Hkv, L, D] -> [B, Hq, S, D].

    attention_mask [B, L] is the graph's key padding mask (the input attention_mask_bias turns into the
    additive [B, 1, 1, S, L] mask; nonzero = visible); kv_lens [B] optionally says how many cache
    positions each row holds. Query i sees key j iff j <= n_b - S + i (n_b = kv_lens[b], else L) and
    attention_mask[b, j] != 0: the graph's rule whenever kv_lens is absent. One difference: a query that
    sees no key (a left-padding position) gets zeros where the graph's finfo.min mask gives an arbitrary
    average; such rows feed only padding positions. S == 1 runs flash-decoding, S > 1 the prefill kernel.
    """
    if not ops_run_triton(q):
        return attention_prefill_reference(q, k, v, scale, kv_lens, attention_mask)
    if q.shape[2] == 1:
        config = selected_config("attention_decode", B=q.shape[0], L=k.shape[2])
        return attention_decode(q, k, v, scale, kv_lens, attention_mask, config)
    return attention_prefill(q, k, v, scale, kv_lens, attention_mask, selected_config("attention_prefill", S=q.shape[2]))


@attention_op.register_fake
def _(q, k, v, attention_mask, kv_lens, scale):
    return torch.empty_like(q)


@torch.library.custom_op("qwen3export::moe", mutates_args=())
def moe_op(x: Tensor, router_weight: Tensor, gate_up: Tensor, down: Tensor, top_k: int,
           norm_topk_prob: bool) -> Tensor:
    """Qwen3 sparse MoE block: x [..., H], router [E, H], gate_up [E, 2I, H], down [E, H, I] -> [..., H].

    Routing ties go to the lowest expert id (kernels/moe_routing.py says why the graph's torch.topk
    cannot promise an order); otherwise graphs/decoder.py SparseMoeBlock.
    """
    tokens = x.reshape(-1, x.shape[-1])  # [T, H]
    if ops_run_triton(x):
        rows = tokens.shape[0]
        weights, ids = moe_routing(tokens, router_weight, top_k, norm_topk_prob, selected_config("moe_routing", M=rows))
        return fused_moe(tokens, gate_up, down, weights, ids, selected_config("fused_moe", M=rows),
                         align_config=selected_config("moe_align", M=rows)).view(x.shape)
    weights, ids = moe_routing_reference(tokens, router_weight, top_k, norm_topk_prob)
    return fused_moe_reference(tokens, gate_up, down, weights, ids).view(x.shape)


@moe_op.register_fake
def _(x, router_weight, gate_up, down, top_k, norm_topk_prob):
    return torch.empty_like(x)


# ---------------------------------------------------------------- quantized weights (qwen3export/quant.py layout)
@torch.library.custom_op("qwen3export::wq_linear", mutates_args=())
def wq_linear_op(x: Tensor, qweight: Tensor, scales: Tensor, zero_points: Tensor | None, bits: int,
                 group_size: int) -> Tensor:
    """A weight-only int8 / int4 nn.Linear without bias (Qwen3 has none): x [..., K] -> [..., N] in x's dtype;
    qweight uint8 [N, K * bits / 8], scales [N, K/g], zero_points uint8 [N, K/g] or None (2^(bits-1))."""
    if ops_run_triton(x):
        return wq_matmul(x, qweight, scales, zero_points, bits, group_size, selected_config("wq_matmul", M=_rows(x)))
    return wq_matmul_reference(x, qweight, scales, zero_points, bits, group_size)


@wq_linear_op.register_fake
def _(x, qweight, scales, zero_points, bits, group_size):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("qwen3export::wq_moe", mutates_args=())
def wq_moe_op(x: Tensor, router_weight: Tensor, gate_up_qweight: Tensor, gate_up_scales: Tensor,
              gate_up_zero_points: Tensor | None, down_qweight: Tensor, down_scales: Tensor,
              down_zero_points: Tensor | None, bits: int, top_k: int, norm_topk_prob: bool) -> Tensor:
    """qwen3export::moe with int8 / int4 experts (the router stays unquantized): x [..., H] -> [..., H]."""
    tokens = x.reshape(-1, x.shape[-1])  # [T, H]
    gate_up = (gate_up_qweight, gate_up_scales, gate_up_zero_points)
    down = (down_qweight, down_scales, down_zero_points)
    if ops_run_triton(x):
        rows = tokens.shape[0]
        weights, ids = moe_routing(tokens, router_weight, top_k, norm_topk_prob, selected_config("moe_routing", M=rows))
        return fused_moe_wq(tokens, gate_up, down, weights, ids, bits, selected_config("fused_moe_wq", M=rows)).view(x.shape)
    weights, ids = moe_routing_reference(tokens, router_weight, top_k, norm_topk_prob)
    return fused_moe_wq_reference(tokens, gate_up, down, weights, ids, bits).view(x.shape)


@wq_moe_op.register_fake
def _(x, router_weight, gate_up_qweight, gate_up_scales, gate_up_zero_points, down_qweight, down_scales,
      down_zero_points, bits, top_k, norm_topk_prob):
    return torch.empty_like(x)


@torch.library.custom_op("qwen3export::fp8_linear", mutates_args=())
def fp8_linear_op(x: Tensor, weight: Tensor, weight_scales: Tensor) -> Tensor:
    """fp8 nn.Linear without bias: x [..., K] quantized per token at run time, weight float8_e4m3fn [N, K] with fp32
    per-channel weight_scales [N, 1] -> [..., N] in x's dtype. CUDA needs sm_89+ (kernels/fp8_matmul.py)."""
    if ops_run_triton(x):
        return fp8_matmul(x, weight, weight_scales, selected_config("fp8_matmul", M=_rows(x)))
    return fp8_matmul_reference(x, weight, weight_scales)


@fp8_linear_op.register_fake
def _(x, weight, weight_scales):
    return x.new_empty(*x.shape[:-1], weight.shape[0])
