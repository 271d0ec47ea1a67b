"""Weight quantization: the quantized-weight representation, round-to-nearest (RTN) symmetric quantization of
a checkpoint's linear weights (int8 / int4 weight-only, fp8 e4m3) and the eager dequantize reference.

Load stage: `QuantizedSource` wraps a WeightSource; kernels (kernels/wq_matmul.py, fused_moe_wq.py,
fp8_matmul.py) and the ONNX emitters (backends/onnx_quant.py) read `QuantizedWeight` as it is laid out here.
Pre-quantized AWQ / GPTQ checkpoints load into the same representation (qwen3export/prequantized.py).
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from .errors import InputError, WeightsError
from .quant_format import (EMBEDDING, TIED_HEAD, QuantConfig, QuantizedWeight, check_group_size, dequantize,
                           is_quantized, quantize_weight)
from qwen3export.graphs.decoder import Qwen3Decoder
from qwen3export.graphs.quantized import QuantizedLinear, quantize_decoder

from .spec import ModelSpec
from .weights import WeightSource, check_names, expected_tensors, module_assignments


def quantized_names(spec: ModelSpec, quantize_lm_head: bool = False) -> list[str]:
    """Every tensor of `spec`'s checkpoint that `is_quantized`, in checkpoint order; a tied model's lm_head
    (not a checkpoint tensor) last when quantize_lm_head."""
    names = [n for n in expected_tensors(spec) if is_quantized(n, quantize_lm_head)]
    if quantize_lm_head and spec.tie_word_embeddings:
        names.append(TIED_HEAD)
    return names


def check_quantizable(spec: ModelSpec, config: QuantConfig) -> None:
    """int4's group size is one MatMulNBits takes (a power of two >= 16). It need not divide a weight's
    in_features: the last group is partial (QuantizedWeight), which every consumer runs exactly (MatMulNBits,
    DequantizeLinear-21, the Triton kernels; QMoE too while K is even, backends/onnx_quant.py qmoe)."""
    if config.mode == "int4":
        check_group_size(config.group_size)


class QuantizedSource:
    """A WeightSource whose linear weights are RTN-quantized: `quantized(name)` gives the QuantizedWeight,
    `get(name)` its dequantized fp32 tensor (so load_into() builds the eager model that runs the same
    dequantized weights as the engine: the tight half of issue 9's parity), other tensors pass through."""

    def __init__(self, source: WeightSource, spec: ModelSpec, config: QuantConfig):
        check_quantizable(spec, config)
        self.source, self.spec, self.config = source, spec, config
        self.description = f"{source.description}, {config.mode}" + (
            f" g{config.group_size}" if config.mode == "int4" else "")
        self._quantized = set(quantized_names(spec, config.quantize_lm_head))
        # a tied model with --quantize-lm-head: lm_head becomes its own (quantized) tensor, read from the embedding
        self.tied_head = config.quantize_lm_head and spec.tie_word_embeddings

    def _stored(self, name: str) -> str:
        return EMBEDDING if self.tied_head and name == TIED_HEAD else name

    def names(self) -> set[str]:
        return self.source.names() | ({TIED_HEAD} if self.tied_head else set())

    def shape(self, name: str) -> tuple[int, ...]:
        return self.source.shape(self._stored(name))

    def is_quantized(self, name: str) -> bool:
        return name in self._quantized

    def quantized(self, name: str) -> QuantizedWeight:
        if name not in self._quantized:
            raise WeightsError(f"tensor {name} is not quantized under --quant {self.config.mode}")
        scale_dtype = torch.float32 if self.config.mode == "fp8" else self.config.scale_dtype
        return quantize_weight(self.source.get(self._stored(name)), self.config.mode, self.config.group_size,
                               scale_dtype, name)

    def get(self, name: str) -> torch.Tensor:
        if name in self._quantized:
            return dequantize(self.quantized(name))
        return self.source.get(name)


@torch.no_grad()
def build_quantized(spec: ModelSpec, source: WeightSource, config: QuantConfig,
                    dtype: torch.dtype = torch.float32) -> Qwen3Decoder:
    """The quantized decoder in `dtype`, never holding the fp model: the decoder is laid out on the meta device,
    its linears and experts swapped for quantized modules (one source tensor at a time), then the parameters
    left (embedding, norms, routers, an unquantized lm_head) are loaded from the source.

    int scales are rounded to `config.scale_dtype` when that converts exactly to `dtype` (any of them to fp32),
    else to `dtype`. Pass a QuantizedSource to share its quantization with a reference (quant_parity.py)."""
    if config.mode != "fp8" and dtype not in (torch.float32, config.scale_dtype):
        config = replace(config, scale_dtype=dtype)  # e.g. fp16 scales would not convert exactly to bf16
    # a QuantizedSource, or a pre-quantized checkpoint (prequantized.PrequantizedSource), is used as it is
    qsource = source if hasattr(source, "quantized") else QuantizedSource(source, spec, config)
    check_names(spec, qsource)
    with torch.device("meta"):
        module = Qwen3Decoder(spec)
    module.quantization = quantize_decoder(module, qsource, dtype)
    params = dict(module.named_parameters(remove_duplicate=False))
    for pname, rows, stacked in module_assignments(spec):
        if pname not in params or stacked or qsource.is_quantized(rows[0][0]):
            continue  # replaced by a quantized module (or a tied lm_head: re-tied below)
        owner, _, leaf = pname.rpartition(".")
        value = nn.Parameter(qsource.get(rows[0][0]).to(dtype), requires_grad=False)
        setattr(module.get_submodule(owner), leaf, value)
    module.inv_freq = torch.empty(spec.head_dim // 2)
    module.reset_derived()  # RoPE frequencies; re-ties lm_head to the embedding
    if isinstance(module.lm_head, QuantizedLinear):  # a tied model's quantized lm_head: not re-tied
        module.lm_head._parameters.pop("weight", None)
    left = [n for n, t in (*module.named_parameters(), *module.named_buffers()) if t.is_meta]
    if left:
        raise InputError(f"quantized decoder: {left[0]} was never loaded (graphs/quantized.py and "
                         "weights.module_assignments disagree)")
    return module.eval()
