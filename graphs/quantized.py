"""The quantized decoder: Qwen3Decoder with its linear layers and MoE experts holding quantized weights
(qwen3export/quant.py layout) and calling the qwen3export:: quantized ops (kernels/ops.py).

Load stage, for `build --quant`: attention q/k/v/o, dense-MLP gate/up/down (and lm_head when asked) become
`QuantizedLinear` (qwen3export::wq_linear for int4 / int8, qwen3export::fp8_linear for fp8); each MoE block
becomes `QuantizedSparseMoeBlock` (qwen3export::wq_moe: fp router, routing inside the op, int4 / int8 experts).
Embedding, norms and the router stay in the model dtype. Buffers are named after the weight they replace
(`….q_proj.qweight`, `….scales`, `….zero_points`; `….experts.gate_up_proj.qweight` …), as
QuantizedWeight.tensors names them. For int4 / int8 the eager result is the plain Qwen3Decoder running
quant.dequantize's weights (QuantizedSource.get); fp8 also quantizes activations per token, so it is not.
"""

from __future__ import annotations

import torch
from torch import nn

from qwen3export.errors import InputError
from qwen3export.quant_format import QuantizedWeight, cat_rows, stack

from .decoder import MLP, Attention, Qwen3Decoder, SparseMoeBlock

LINEARS = {Attention: ("q_proj", "k_proj", "v_proj", "o_proj"), MLP: ("gate_proj", "up_proj", "down_proj")}


class QuantizedTensor(nn.Module):
    """One QuantizedWeight as buffers: qweight, scales and zero_points (None when symmetric); qweight holds
    whole groups (quant.py), so with a partial last group it is wider than in_features, which the ops read
    from their input.

    int scales are stored in the model's dtype (the kernels read them as the activations' type and
    MatMulNBits wants A's type); the cast must be exact, i.e. the quantizer rounded them to that dtype or a
    narrower one (QuantConfig.scale_dtype fp16 -> fp32 is exact; fp16 -> bf16 is not, and is refused)."""

    def __init__(self, qw: QuantizedWeight, dtype: torch.dtype, name: str = "weight"):
        super().__init__()
        self.mode, self.bits, self.group_size = qw.mode, qw.bits, qw.group_size
        # K: the stored codes cover whole groups, so a partial last group leaves K short of their width
        self.in_features = qw.in_features
        scales = qw.scales
        if qw.mode != "fp8":  # fp8 scales stay fp32 (fp8_linear's contract)
            scales = qw.scales.to(dtype)
            if not torch.equal(scales.to(qw.scales.dtype), qw.scales):
                raise InputError(f"{name}: {qw.scales.dtype} scales do not convert exactly to the model's {dtype}; "
                                 f"quantize with QuantConfig(scale_dtype={dtype})")
        self.register_buffer("qweight", qw.qweight)
        self.register_buffer("scales", scales)
        self.register_buffer("zero_points", qw.zero_points)

    def quantized_weight(self) -> QuantizedWeight:
        return QuantizedWeight(self.mode, self.qweight, self.scales, self.zero_points, self.group_size,
                               self.in_features)

    def extra_repr(self) -> str:
        shape = list(self.quantized_weight().shape)
        group = f", group_size={self.group_size}" if self.mode == "int4" else ""
        return f"{self.mode}, shape={shape}{group}, zero_points={self.zero_points is not None}"


class QuantizedLinear(QuantizedTensor):
    """nn.Linear without bias (Qwen3 has none) over a quantized weight [N, K]: x [..., K] -> [..., N]."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "fp8":
            return torch.ops.qwen3export.fp8_linear(x, self.qweight, self.scales)
        return torch.ops.qwen3export.wq_linear(x, self.qweight, self.scales, self.zero_points, self.bits,
                                               self.group_size)


class QuantizedExperts(nn.Module):
    def __init__(self, gate_up: QuantizedWeight, down: QuantizedWeight, dtype: torch.dtype, name: str):
        super().__init__()
        self.gate_up_proj = QuantizedTensor(gate_up, dtype, f"{name}.gate_up_proj")  # [E, 2I, H]: gate rows, up rows
        self.down_proj = QuantizedTensor(down, dtype, f"{name}.down_proj")  # [E, H, I]


class QuantizedSparseMoeBlock(nn.Module):
    """SparseMoeBlock with int4 / int8 experts: one qwen3export::wq_moe (router softmax in fp32, top-k, ties to
    the lowest expert id, renormalised when norm_topk_prob; then the routed experts only)."""

    def __init__(self, block: SparseMoeBlock, experts: QuantizedExperts):
        super().__init__()
        self.top_k, self.norm_topk_prob = block.top_k, block.norm_topk_prob
        self.gate = block.gate
        self.experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu, dn = self.experts.gate_up_proj, self.experts.down_proj
        return torch.ops.qwen3export.wq_moe(x, self.gate.weight, gu.qweight, gu.scales, gu.zero_points, dn.qweight,
                                            dn.scales, dn.zero_points, gu.bits, self.top_k, self.norm_topk_prob)


def _expert_weights(source, prefix: str, n_experts: int) -> tuple[QuantizedWeight, QuantizedWeight]:
    """A layer's stacked experts, quantized one expert at a time: gate_up [E, 2I, H] (gate rows then up rows,
    graphs/decoder.py Experts) and down [E, H, I]."""
    gate_up = stack([cat_rows([source.quantized(f"{prefix}{e}.gate_proj.weight"),
                               source.quantized(f"{prefix}{e}.up_proj.weight")]) for e in range(n_experts)])
    down = stack([source.quantized(f"{prefix}{e}.down_proj.weight") for e in range(n_experts)])
    return gate_up, down


def quantize_decoder(module: Qwen3Decoder, source, dtype: torch.dtype | None = None) -> dict:
    """Swap `module`'s quantized linears and MoE experts (in place) for modules holding `source`'s quantized
    tensors (any object with `config`, `is_quantized(name)` and `quantized(name)`: quant.QuantizedSource or
    prequantized.PrequantizedSource), built tensor by tensor from the source. `module` may live on the meta device (build_quantized);
    the replaced submodules' fp weights are dropped. Returns what was replaced: {"linears", "moe_blocks",
    "quantized_bytes"}."""
    # lazy: registering the qwen3export:: ops loads Triton; the plain decoder (eager references, run) never needs it
    import qwen3export.kernels.ops  # noqa: F401  (registers the qwen3export:: ops the new modules call)

    spec, mode = module.spec, source.config.mode
    dtype = dtype or module.dtype
    if mode == "fp8" and spec.moe_layers:
        raise InputError(f"--quant fp8 covers dense layers only and {spec.name} has MoE layers (the quantized MoE op "
                         "qwen3export::wq_moe takes int4 / int8 experts); use --quant int8 or int4")
    linears, blocks, nbytes = 0, 0, 0
    for li, layer in enumerate(module.model.layers):
        prefix = f"model.layers.{li}."
        for parent, attr in ((layer.self_attn, "self_attn"), (layer.mlp, "mlp")):
            for proj in LINEARS.get(type(parent), ()):
                name = f"{prefix}{attr}.{proj}.weight"
                if not source.is_quantized(name):  # a checkpoint's modules_to_not_convert: stays fp
                    continue
                qlinear = QuantizedLinear(source.quantized(name), dtype, name)
                setattr(parent, proj, qlinear)
                linears, nbytes = linears + 1, nbytes + qlinear.quantized_weight().nbytes()
        if isinstance(layer.mlp, SparseMoeBlock):
            name = f"{prefix}mlp.experts"
            experts = QuantizedExperts(*_expert_weights(source, f"{name}.", spec.num_experts), dtype, name)
            layer.mlp = QuantizedSparseMoeBlock(layer.mlp, experts)
            blocks += 1
            nbytes += sum(t.quantized_weight().nbytes() for t in (experts.gate_up_proj, experts.down_proj))
    if source.is_quantized("lm_head.weight"):
        module.lm_head = QuantizedLinear(source.quantized("lm_head.weight"), dtype, "lm_head.weight")
        linears, nbytes = linears + 1, nbytes + module.lm_head.quantized_weight().nbytes()
    return {**source.config.to_dict(), "linears": linears, "moe_blocks": blocks, "quantized_bytes": nbytes}


def quantized_tensors(module: nn.Module) -> dict[str, QuantizedWeight]:
    """Every quantized weight of a quantized decoder, by its module name (for artifacts and reports)."""
    return {name: m.quantized_weight() for name, m in module.named_modules() if isinstance(m, QuantizedTensor)}


