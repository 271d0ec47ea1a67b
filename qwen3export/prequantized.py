"""Pre-quantized Hugging Face checkpoints (AWQ GEMM, GPTQ) loaded into qwen3export's QuantizedWeight.

Load stage, beside weights.py: `PrequantizedSource` presents an AWQ / GPTQ folder under the plain checkpoint's
tensor names (so check_names / load_into work unchanged, with dequantized weights) and hands the packed
weights over as QuantizedWeight (asymmetric zero points kept). Formats, as their writers define them:
- AWQ GEMM (AutoAWQ awq/modules/linear/gemm.py WQLinear_GEMM.from_linear; transformers AwqConfig):
  qweight int32 [K, N/8], qzeros int32 [K/g, N/8], scales fp16 [K/g, N]; nibble i (bits 4i..4i+3) of packed
  column j holds output column 8j + AWQ_ORDER[i]; W[k, n] = (q - z) * s, y = x @ W.
- GPTQ (AutoGPTQ / GPTQModel; danieldk.eu/GPTQ-Checkpoint-Format): qweight int32 [K*b/32, N] packed along
  K in order (row r, field i = input 32r/b + i), qzeros int32 [K/g, N*b/32] packed along N in order,
  scales [K/g, N], g_idx int32 [K]. checkpoint_format "gptq" (v1) stores zero - 1, "gptq_v2" the zero itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .errors import ConfigError, WeightsError
from .quant_format import QuantConfig, QuantizedWeight, dequantize, pack_int4
from .spec import ModelSpec, read_config, spec_from_hf_config
from .weights import SafetensorsSource, WeightSource

# AutoAWQ's GEMM packing order: nibble i of each int32 holds column 8j + AWQ_ORDER[i]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
_PARTS = (".qweight", ".qzeros", ".scales", ".g_idx")
_SUPPORTED = "AWQ (GEMM, 4-bit, zero_point) and GPTQ (4/8-bit, desc_act false)"


@dataclass(frozen=True)
class CheckpointQuant:
    """A checkpoint's quantization_config, validated: method, bits, group size (-1: per channel) and the offset
    added to stored zero points (1 for GPTQ v1)."""

    method: str  # "awq" | "gptq"
    bits: int
    group_size: int
    zero_offset: int = 0

    def group_for(self, in_features: int) -> int:
        return in_features if self.group_size == -1 else self.group_size


def parse_quantization_config(qc: Any) -> CheckpointQuant:
    """config.json's quantization_config -> CheckpointQuant; any scheme we cannot load exactly is refused."""
    if not isinstance(qc, dict):
        raise ConfigError("config.json's quantization_config must be an object")
    method = str(qc.get("quant_method", "?")).lower()
    bits, group = qc.get("bits", qc.get("w_bit")), qc.get("group_size", qc.get("q_group_size", 128))
    if method not in ("awq", "gptq"):
        raise ConfigError(f"quantization_config quant_method {method!r} is not supported; qwen3export loads "
                          f"{_SUPPORTED}, or quantizes a bf16/fp16 checkpoint itself with --quant")
    if not isinstance(group, int) or isinstance(group, bool) or not (group == -1 or group > 0):
        raise ConfigError(f"{method} quantization_config group_size {group!r} must be a positive int or -1")
    if method == "awq":
        version = str(qc.get("version", qc.get("format", "gemm"))).lower()
        if bits != 4 or version != "gemm" or not qc.get("zero_point", True):
            raise ConfigError(f"AWQ checkpoint with bits={bits!r}, version {version!r}, zero_point="
                              f"{qc.get('zero_point', True)!r} is not supported; qwen3export loads AWQ GEMM "
                              "4-bit with zero points (AutoAWQ's default)")
        return CheckpointQuant("awq", 4, group)
    fmt = str(qc.get("checkpoint_format", qc.get("format", "gptq"))).lower()
    if qc.get("desc_act"):
        raise ConfigError("GPTQ checkpoint with desc_act=true (act-order) is not supported; use one quantized "
                          "with desc_act=false")
    if bits not in (4, 8):
        raise ConfigError(f"GPTQ checkpoint with bits={bits!r} is not supported; qwen3export loads 4- and 8-bit")
    if fmt not in ("gptq", "gptq_v2"):
        raise ConfigError(f"GPTQ checkpoint_format {fmt!r} is not supported; qwen3export loads 'gptq' and 'gptq_v2'")
    return CheckpointQuant("gptq", bits, group, zero_offset=1 if fmt == "gptq" else 0)


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words -> their 32/bits fields, lowest bits first, expanded in place along `dim` (int16)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    dim = dim % packed.dim()
    view = [1] * (packed.dim() + 1)
    view[dim + 1] = shifts.numel()
    fields = (packed.unsqueeze(dim + 1) >> shifts.view(view)) & (2**bits - 1)
    return fields.flatten(dim, dim + 1).to(torch.int16)


def _to_weight(codes_nk: torch.Tensor, zeros_ng: torch.Tensor, scales_ng: torch.Tensor, bits: int,
               group: int, name: str) -> QuantizedWeight:
    """Codes / zeros [N, K] / [N, G] (int16, already offset) -> QuantizedWeight; an all-default zero tensor
    (2^(bits-1) everywhere: symmetric checkpoints) is dropped so kernels take their symmetric path."""
    if int(zeros_ng.max()) >= 2**bits or int(zeros_ng.min()) < 0:
        raise WeightsError(f"{name} has zero points outside 0..{2**bits - 1} after the format's offset; "
                           "the checkpoint_format in config.json does not match its tensors")
    zeros = zeros_ng.to(torch.uint8)
    codes = codes_nk.to(torch.uint8)
    symmetric = bool((zeros == 2 ** (bits - 1)).all())
    return QuantizedWeight("int4" if bits == 4 else "int8", pack_int4(codes) if bits == 4 else codes,
                           scales_ng.contiguous(), None if symmetric else zeros.contiguous(), group)


def awq_to_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group: int,
                  name: str = "weight") -> QuantizedWeight:
    """AWQ GEMM tensors (qweight [K, N/8], qzeros [K/g, N/8], scales [K/g, N]) -> QuantizedWeight [N, K]."""
    inverse = torch.tensor([AWQ_ORDER.index(c) for c in range(8)])  # column c sits in nibble inverse[c]

    def columns(packed: torch.Tensor) -> torch.Tensor:
        fields = unpack_int32(packed, 4, -1).unflatten(-1, (-1, 8))  # [rows, N/8, 8] in nibble order
        return fields[..., inverse].flatten(-2)  # [rows, N] in column order

    return _to_weight(columns(qweight).t(), columns(qzeros).t(), scales.t(), 4, group, name)


def gptq_to_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                   bits: int, group: int, zero_offset: int, name: str = "weight") -> QuantizedWeight:
    """GPTQ tensors (qweight [K*b/32, N], qzeros [G, N*b/32], scales [G, N], g_idx [K]) -> QuantizedWeight [N, K].
    Only the act-order-free layout (g_idx[k] = k // group) has contiguous groups; any other g_idx is refused."""
    codes = unpack_int32(qweight, bits, 0)  # [K, N]
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(codes.shape[0]) // group):
        raise WeightsError(f"{name.removesuffix('.weight')}.g_idx is not k // group_size (an act-order "
                           "checkpoint): re-quantize with desc_act=false")
    zeros = unpack_int32(qzeros, bits, -1) + zero_offset  # [G, N]
    return _to_weight(codes.t(), zeros.t(), scales.t(), bits, group, name)


class PrequantizedSource:
    """An AWQ / GPTQ folder as a WeightSource under the unquantized checkpoint's names ('….q_proj.weight'
    [N, K]): `get` dequantizes (fp32), `quantized` gives the QuantizedWeight, other tensors pass through."""

    def __init__(self, folder: str | Path, scheme: CheckpointQuant, raw: WeightSource | None = None):
        self.raw = raw or SafetensorsSource(folder)
        self.scheme = scheme
        self.description = f"{self.raw.description} ({scheme.method} {scheme.bits}-bit)"
        have = self.raw.names()
        self._bases = sorted(n.removesuffix(".qweight") for n in have if n.endswith(".qweight"))
        self._shapes = {n: tuple(self.raw.shape(n)) for n in have if not n.endswith(_PARTS)}
        for base in self._bases:
            self._shapes[base + ".weight"] = self._check_parts(base, have)

    def _check_parts(self, base: str, have: set[str]) -> tuple[int, int]:
        """The packed tensors of one linear are all there with consistent shapes; returns its [N, K]."""
        s, pack = self.scheme, 32 // self.scheme.bits
        needed = [".qweight", ".qzeros", ".scales"] + ([".g_idx"] if s.method == "gptq" else [])
        missing = [base + p for p in needed if base + p not in have]
        if missing:
            raise WeightsError(f"{missing[0]} is missing from {self.raw.description}; the {s.method} checkpoint "
                               "is incomplete")
        qw = tuple(self.raw.shape(base + ".qweight"))
        n, k = (qw[1] * pack, qw[0]) if s.method == "awq" else (qw[1], qw[0] * pack)
        group = s.group_for(k)
        groups = k // group
        want = {".qzeros": (groups, n // pack), ".scales": (groups, n)}
        if s.method == "gptq":
            want[".g_idx"] = (k,)
        for part, shape in want.items():
            got = tuple(self.raw.shape(base + part))
            if got != shape or k % group:
                raise WeightsError(f"{base}{part} has shape {list(got)} but qweight {list(qw)} and group_size "
                                   f"{group} imply {list(shape)}; the checkpoint does not match its config.json")
        return n, k

    @property
    def config(self):
        """The checkpoint's quantization as a QuantConfig (what quantize_decoder and the manifest read)."""

        return QuantConfig(f"int{self.scheme.bits}", self.scheme.group_size,
                           quantize_lm_head=self.is_quantized("lm_head.weight"), scheme=self.scheme.method)

    def names(self) -> set[str]:
        return set(self._shapes)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def quantized_names(self) -> list[str]:
        return [b + ".weight" for b in self._bases]

    def is_quantized(self, name: str) -> bool:
        return name.endswith(".weight") and name.removesuffix(".weight") in self._bases

    def quantized(self, name: str) -> QuantizedWeight:
        if not self.is_quantized(name):
            raise WeightsError(f"tensor {name} is not quantized in {self.raw.description}")
        base, s = name.removesuffix(".weight"), self.scheme
        qweight, qzeros, scales = (self.raw.get(base + p, integer_ok=True) for p in (".qweight", ".qzeros", ".scales"))
        group = s.group_for(self._shapes[name][1])
        if s.method == "awq":
            return awq_to_weight(qweight, qzeros, scales, group, name)
        return gptq_to_weight(qweight, qzeros, scales, self.raw.get(base + ".g_idx", integer_ok=True), s.bits, group,
                              s.zero_offset, name)

    def get(self, name: str) -> torch.Tensor:
        return dequantize(self.quantized(name)) if self.is_quantized(name) else self.raw.get(name)


def open_prequantized(folder: str | Path, think_ids: tuple[int | None, int | None] | None = None
                      ) -> tuple[ModelSpec, PrequantizedSource]:
    """A pre-quantized folder -> (ModelSpec without quantization_config, PrequantizedSource); a folder
    without quantization_config is an error (load it with SafetensorsSource)."""
    path = Path(folder)
    cfg = read_config(path)
    if not cfg.get("quantization_config"):
        raise ConfigError(f"{path / 'config.json'} has no quantization_config: it is not a pre-quantized checkpoint")
    scheme = parse_quantization_config(cfg["quantization_config"])
    plain = {k: v for k, v in cfg.items() if k != "quantization_config"}
    spec = spec_from_hf_config(plain, name=path.resolve().name, think_ids=think_ids)
    return spec, PrequantizedSource(path, scheme)
