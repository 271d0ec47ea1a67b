"""Verify stage for quantized builds: parity two ways (issue 9).

(a) gated: the quantized engine against eager PyTorch running the same dequantized weights (parity.check_parity,
    the fp32 thresholds): this checks the engine, not the quantization. At MatMulNBits accuracy level 4 the
    engine quantizes each int4 linear's input to int8 per block; the reference emulates that (hooks running
    quant_format.quantize_activation_int8_blocks) and the gate is parity.THRESHOLDS["int8_activations"]: the
    median row at the fp32 bound, a few rows off by rounding flips (measured there). The manifest's parity
    records which reference ran (`quant_gate`) and the thresholds used.
(b) reported, never gated: the quantized model against the unquantized one: logit KL divergence, top-1 agreement,
    greedy match length, per-layer hidden-state error and, for MoE layers, router top-k agreement. This
    measures what quantization costs.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from qwen3export.graphs.decoder import Qwen3Decoder, SparseMoeBlock, router_topk
from qwen3export.quant import build_quantized
from qwen3export.kernels.moe_routing import moe_routing_reference

from .errors import ParityError
from .generation import Step, greedy_generate, left_pad, position_ids_from_mask
from .model import build_module
from .parity import NEW_TOKENS, THRESHOLDS, check_parity, parity_prompts, reference_run
from .quant_format import (QUANTIZED_PROJECTIONS, QuantConfig, nbits_block, qmoe_block,
                           quantize_activation_int8_blocks)
from .quant import QuantizedSource
from .spec import ModelSpec
from .weights import WeightSource


def dequantized_reference(spec: ModelSpec, source: QuantizedSource, dtype: torch.dtype = torch.float32) -> Qwen3Decoder:
    """Eager PyTorch on the engine's weights: int4 / int8 -> the plain decoder loaded with the dequantized weights
    (QuantizedSource.get); fp8 -> the eager quantized decoder, since fp8 quantizes activations too (per token,
    fp8_linear) and dequantized weights alone would not compute what the engine computes. int4 at accuracy
    level 4: the quantized linears' inputs quantized as MatMulNBits does (emulate_int8_activations).
    `quant_gate` on the model says which of these it is (check_engine_parity records it)."""
    config = source.config
    if config.mode == "fp8":
        model = build_quantized(spec, source, config, dtype)
        model.quant_gate = {"kind": "eager-quantized", "activations": "fp8 e4m3 per token, as the engine"}
        return model
    if getattr(source, "tied_head", False):  # the quantized lm_head is its own tensor: untie it here too
        spec = spec.replace(tie_word_embeddings=False)
    model = build_module(spec, source, dtype)
    level = getattr(config, "accuracy_level", 0)
    model.quant_gate = {"kind": "dequantized-weights", "accuracy_level": level, "activations": "fp32"}
    if level == 4:
        hooked = emulate_int8_activations(model, config.group_size, config.quantize_lm_head)
        model.quant_gate = {"kind": "emulated-int8-activations", "accuracy_level": level, **hooked,
                            "activations": "int8 per MatMulNBits / QMoE block (scale amax/127, round half to even: "
                                           "quant_format.quantize_activation_int8_blocks), emulated in torch"}
    return model


def emulate_int8_activations(model: Qwen3Decoder, group_size: int, lm_head: bool) -> dict[str, int]:
    """`model` computing what the engine's int4 ops compute at accuracy level 4:
    - forward pre-hooks on the quantized nn.Linear layers (attention q/k/v/o, dense MLP gate/up/down, the lm_head
      when quantized) quantize their input to int8 per block as MatMulNBits does, the block being the op's
      block_size for that weight (quant_format.nbits_block);
    - each MoE block's experts (QMoE, block_size quant_format.qmoe_block) quantize their input per token (gate_up,
      blocks along H) and their SwiGLU output per token and expert (down, blocks along I), each only when the
      block divides that K: otherwise QMoE dequantizes and runs fp32 activations (backends/onnx_quant.py
      set_accuracy_level). Returns {"linears": n, "expert_weights": n} hooked."""
    hooked = {"linears": 0, "expert_weights": 0}
    for name, module in model.named_modules():
        leaf = name.rpartition(".")[2]
        if isinstance(module, SparseMoeBlock):
            h, i = model.spec.hidden_size, model.spec.moe_intermediate_size
            block = qmoe_block([(group_size, k, -(-k // group_size)) for k in (h, i)])
            blocks = tuple(block if k % block == 0 else None for k in (h, i))
            module.forward = _emulated_moe(module, *blocks)
            hooked["expert_weights"] += sum(b is not None for b in blocks)
        quantized = leaf in QUANTIZED_PROJECTIONS or lm_head and name == "lm_head"
        if not isinstance(module, torch.nn.Linear) or not quantized:
            continue
        k = module.in_features
        block = nbits_block(group_size, k, -(-k // group_size))
        module.register_forward_pre_hook(
            lambda m, args, block=block: (quantize_activation_int8_blocks(args[0], block), *args[1:]))
        hooked["linears"] += 1
    return hooked


def _emulated_moe(block: SparseMoeBlock, fc1_block: int | None, fc2_block: int | None):
    """graphs/decoder.py SparseMoeBlock.forward (every expert on every token, combined by the dense top-k
    weights; routed from the unquantized input as QMoE routes from fp router logits) with the experts' inputs
    quantized per row as QMoE's int8 path does: a None block keeps that weight's input fp32."""
    def quantized(x: torch.Tensor, size: int | None) -> torch.Tensor:
        return x if size is None else quantize_activation_int8_blocks(x, size)

    def forward(x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        t = x.reshape(b * s, h)  # [T, H]
        top_w, top_i = router_topk(t, block.gate.weight, block.top_k, block.norm_topk_prob)
        dense_w = torch.zeros(t.shape[0], block.num_experts, dtype=t.dtype).scatter(1, top_i, top_w)  # [T, E]
        e, i = block.num_experts, block.inter
        gu = F.linear(quantized(t, fc1_block), block.experts.gate_up_proj.reshape(e * 2 * i, h)).view(-1, e, 2 * i)
        act = quantized(F.silu(gu[..., :i]) * gu[..., i:], fc2_block)  # [T, E, I]: one row per token and expert
        y = torch.matmul(act.transpose(0, 1), block.experts.down_proj.transpose(1, 2))  # [E, T, H]
        return (y * dense_w.t()[..., None]).sum(0).view(b, s, h)

    return forward


NOISE_FLOOR_DRAWS = 2  # perturbed runs of the reference; the floor is their worst
NOISE_FLOOR_FACTOR = 2.0  # the engine may be this many times the floor (parity.THRESHOLDS' int8_activations note)


def noise_floor(reference: Qwen3Decoder, ran: tuple, new_tokens: int = NEW_TOKENS,
                draws: int = NOISE_FLOOR_DRAWS) -> dict[str, Any]:
    """How far the emulating reference moves from itself under an fp32 rounding difference: the first layer's
    input norm weights each nudged by one ulp (random signs; seeds 1..draws), run through check_parity against
    `ran` (parity.reference_run of the unperturbed model) and restored. The worst over the draws of the median
    row, the worst row, top-1 agreement and greedy tokens matching. Chaotic int8 rounding (level 4) makes this
    percent-sized on real shapes; it is fp32-sized where no rounding flips (small models)."""
    weight = reference.model.layers[0].input_layernorm.weight
    original = weight.detach().clone()
    vocab = reference.spec.vocab_size
    runs = []
    try:
        for seed in range(1, draws + 1):
            up = torch.randint(0, 2, original.shape, generator=torch.Generator().manual_seed(seed)).bool()
            with torch.no_grad():
                weight.copy_(torch.where(up, torch.nextafter(original, original + 1),
                                         torch.nextafter(original, original - 1)))
            runs.append(check_parity(reference, reference.empty_cache(len(parity_prompts(2))), reference, None, vocab,
                                     "fp32", new_tokens, reference=ran))
    finally:
        with torch.no_grad():
            weight.copy_(original)
    finite = [r for r in runs if r["logits_scaled_err"] is not None]
    if len(finite) < len(runs):
        raise ParityError("the emulating reference produced NaN or Inf when one norm weight moved by one ulp; "
                          "report this with --debug output")
    return {"perturbation": "layer 0 input_layernorm weights +-1 ulp (random signs)", "draws": draws,
            "logits_scaled_median": max(r["logits_scaled_median"] for r in finite),
            "logits_scaled_err": max(r["logits_scaled_err"] for r in finite),
            "top1_agreement": min(r["top1_agreement"] for r in finite),
            "greedy_tokens_matching": min(r["greedy_tokens_matching"] for r in finite)}


def floor_thresholds(floor: dict[str, Any], new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """parity.THRESHOLDS["int8_activations"] raised to NOISE_FLOOR_FACTOR x `floor` (noise_floor): the median and
    worst rows; greedy tokens must match while the perturbed reference's did, else top-1 agreement must be no
    worse than the floor's less 0.05."""
    least = THRESHOLDS["int8_activations"]
    th: dict[str, Any] = {
        "logits_scaled": max(least["logits_scaled"], NOISE_FLOOR_FACTOR * floor["logits_scaled_err"]),
        "logits_scaled_median": max(least["logits_scaled_median"],
                                    NOISE_FLOOR_FACTOR * floor["logits_scaled_median"]),
        "greedy_match": floor["greedy_tokens_matching"] == new_tokens}
    if not th["greedy_match"]:
        th["top1_agreement"] = round(floor["top1_agreement"] - 0.05, 6)
    return th


def check_engine_parity(engine: Step, engine_cache: tuple, reference: Qwen3Decoder, dtype: str = "fp32",
                        new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """(a): parity.check_parity of the engine against `reference` (dequantized_reference), gated as any build;
    an fp32 engine whose reference emulates int8 activations is gated at floor_thresholds: the reference's own
    noise floor under a one-ulp perturbation (noise_floor) times NOISE_FLOOR_FACTOR, and never looser than
    parity.THRESHOLDS["int8_activations"]. The floor goes into the report (`noise_floor`)."""
    gate = getattr(reference, "quant_gate", {"kind": "dequantized-weights", "activations": "fp32"})
    emulated = gate["kind"] == "emulated-int8-activations" and dtype == "fp32"
    batch = len(parity_prompts(2))
    ran = reference_run(reference, reference.empty_cache(batch), reference.spec.vocab_size, new_tokens)
    floor = noise_floor(reference, ran, new_tokens) if emulated else None
    report = check_parity(engine, engine_cache, reference, None, reference.spec.vocab_size,
                          "int8_activations" if emulated else dtype, new_tokens, reference=ran,
                          thresholds=floor_thresholds(floor, new_tokens) if floor is not None else None)
    report["reference"] = "eager PyTorch (qwen3export.graphs.decoder) on the same dequantized weights"
    report["quant_gate"] = gate
    if gate["kind"] == "emulated-int8-activations":
        report["reference"] += ", int8 activations emulated per block as MatMulNBits accuracy level 4"
    if floor is not None:
        report["noise_floor"] = {**floor, "factor": NOISE_FLOOR_FACTOR}
    return report


class _Probe:
    """Forward hooks on a decoder: each layer's output hidden state [B, S, H] and each MoE block's input."""

    def __init__(self, model: Qwen3Decoder):
        self.hidden: dict[int, torch.Tensor] = {}
        self.moe_inputs: dict[int, torch.Tensor] = {}
        self.handles = []
        moe = set(model.spec.moe_layers)
        for i, layer in enumerate(model.model.layers):
            self.handles.append(layer.register_forward_hook(
                lambda m, args, out, i=i: self.hidden.__setitem__(i, out[0].detach())))
            if i in moe:
                self.handles.append(layer.mlp.register_forward_pre_hook(
                    lambda m, args, i=i: self.moe_inputs.__setitem__(i, args[0].detach())))

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@torch.no_grad()
def _teacher_forced(model: Qwen3Decoder, ids: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, _Probe]:
    probe = _Probe(model)
    try:
        logits, _ = model(ids, position_ids_from_mask(mask), mask, model.empty_cache(ids.shape[0]))
    finally:
        probe.close()
    return logits, probe


def _match_length(a: torch.Tensor, b: torch.Tensor) -> list[int]:
    """Leading tokens two greedy generations [B, N] share, per row."""
    return [int((a[i] == b[i]).long().cumprod(0).sum()) for i in range(a.shape[0])]


def _pass(model: Qwen3Decoder, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int,
          forced: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, _Probe, torch.Tensor]:
    """One model's share of the comparison: its greedy tokens [B, N], and teacher-forced over prompt + `forced`
    (its own greedy tokens when None) the logits, the layer probe and the real-position mask."""
    batch = ids.shape[0]
    tokens = greedy_generate(model, model.empty_cache(batch), ids, mask, new_tokens)[0]
    forced = tokens if forced is None else forced
    full = torch.cat((ids, forced), 1)  # [B, S + N]
    full_mask = torch.cat((mask, torch.ones_like(forced)), 1)
    logits, probe = _teacher_forced(model, full, full_mask)
    return tokens, logits, probe, full_mask.bool()


@torch.no_grad()
def compare_to_unquantized(quantized, unquantized, new_tokens: int = NEW_TOKENS,
                           seed: int = 0) -> dict[str, Any]:
    """(b): `quantized` (an eager model computing what the engine computes: dequantized_reference) against
    `unquantized` on the parity prompts. Greedy generation from each gives the match length; then both read
    the same tokens (prompt + the unquantized model's greedy continuation, teacher forcing), and at every real
    position: KL(P_unquantized || P_quantized) of the next-token distributions, top-1 agreement, the relative
    error ||h_q - h|| / ||h|| of each layer's output, and each MoE layer's routed expert sets (routing both from
    the same router weights: kernels/moe_routing.py, ties to the lowest id).

    Either model may be given as a function that builds it: the two are then held one at a time (a 2-layer
    Qwen3-30B-A3B is 7.4 GB in fp32), the unquantized one first."""
    model = unquantized() if callable(unquantized) and not isinstance(unquantized, torch.nn.Module) else unquantized
    spec = model.spec
    ids, mask = left_pad(parity_prompts(spec.vocab_size, seed))
    batch = ids.shape[0]
    ref_tokens, ref_logits, ref_probe, real = _pass(model, ids, mask, new_tokens, None)
    routers_w = {i: model.model.layers[i].mlp.gate.weight.detach().clone() for i in spec.moe_layers}
    del model
    model = quantized() if callable(quantized) and not isinstance(quantized, torch.nn.Module) else quantized
    q_tokens, q_logits, q_probe, _ = _pass(model, ids, mask, new_tokens, ref_tokens)
    del model
    lengths = _match_length(q_tokens, ref_tokens)
    ref_lp = F.log_softmax(ref_logits[real].double(), -1)  # [P, V]
    q_lp = F.log_softmax(q_logits[real].double(), -1)
    kl = (ref_lp.exp() * (ref_lp - q_lp)).sum(-1)  # [P]
    hidden = []
    for i in range(spec.num_hidden_layers):
        h, hq = ref_probe.hidden[i][real].double(), q_probe.hidden[i][real].double()
        hidden.append(((hq - h).norm() / h.norm().clamp_min(1e-30)).item())
    routers = {}
    for i in spec.moe_layers:
        router = routers_w[i]
        k = spec.num_experts_per_tok
        _, ref_ids = moe_routing_reference(ref_probe.moe_inputs[i][real], router, k, spec.norm_topk_prob)
        _, q_ids = moe_routing_reference(q_probe.moe_inputs[i][real], router, k, spec.norm_topk_prob)
        hits = (q_ids[:, :, None] == ref_ids[:, None, :]).any(-1)  # [P, k]: q's choice among the reference's
        routers[str(i)] = {"overlap": hits.double().mean().item(), "same_set": hits.all(-1).double().mean().item()}
    return {
        "reference": "unquantized eager PyTorch on the checkpoint's weights",
        "compared": "eager PyTorch computing the engine's quantized arithmetic",
        "gated": False,
        "batch": batch,
        "positions": int(real.sum()),
        "new_tokens": new_tokens,
        "logits_kl": {"mean": kl.mean().item(), "max": kl.max().item()},
        "top1_agreement": (q_lp.argmax(-1) == ref_lp.argmax(-1)).double().mean().item(),
        "greedy_match_length": {"per_prompt": lengths, "mean": sum(lengths) / len(lengths), "min": min(lengths),
                                "of": new_tokens},
        "hidden_state_rel_error": hidden,
        "router_topk_agreement": routers,
    }


def quant_parity(engine: Step, engine_cache: tuple, spec: ModelSpec, source: WeightSource, config: QuantConfig,
                 dtype: torch.dtype = torch.float32, parity_dtype: str = "fp32",
                 new_tokens: int = NEW_TOKENS) -> dict[str, Any]:
    """Both ways, for the manifest: {"engine": (a), "quantization": (b)}. `source` is the checkpoint's
    (unquantized) weights; the same RTN quantization the build used is recomputed from it."""
    qsource = QuantizedSource(source, spec, config)
    reference = dequantized_reference(spec, qsource, dtype)
    engine_report = check_engine_parity(engine, engine_cache, reference, parity_dtype, new_tokens)
    quality = compare_to_unquantized(reference, build_module(spec, source, dtype), new_tokens)
    quality["quantization"] = {"mode": config.mode, "group_size": config.group_size if config.mode == "int4" else None,
                               "quantize_lm_head": config.quantize_lm_head}
    return {"engine": engine_report, "quantization": quality}

