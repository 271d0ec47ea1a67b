"""Weight quantization: the quantized-weight representation, round-to-nearest (RTN) symmetric quantization of
a checkpoint's linear weights (int8 / int4 weight-only, fp8 e4m3) and the eager dequantize reference.

Load stage: `QuantizedSource` wraps a WeightSource; kernels (kernels/wq_matmul.py, fused_moe_wq.py,
fp8_matmul.py) and the ONNX emitters (backends/onnx_quant.py) read `QuantizedWeight` as it is laid out here.
Pre-quantized AWQ / GPTQ checkpoints load into the same representation (qwen3export/prequantized.py).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InputError, WeightsError

QUANT_MODES = ("int8", "int4", "fp8")
BITS = {"int8": 8, "int4": 4, "fp8": 8}
# float8_e4m3fn's largest finite value (OCP 8-bit floating point spec, E4M3: S.1111.110 = 448)
FP8_MAX = 448.0
# the projections of nn.Linear layers that are quantized; the router (mlp.gate), embedding and norms are not
QUANTIZED_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _qmax(bits: int) -> int:
    """Largest symmetric code magnitude: 127 for int8, 7 for int4 (the code -2^(b-1) is never produced, so
    the grid is symmetric around zero and +-absmax are both exact)."""
    return 2 ** (bits - 1) - 1


@dataclass(frozen=True)
class QuantizedWeight:
    """A linear weight W [..., N, K] (out x in, as nn.Linear stores it) quantized along K in groups.

    int modes:  W[..., n, k] = (code[..., n, k] - zero[..., n, g]) * scale[..., n, g],  g = k // group_size
      G = ceil(K / group_size) groups; when group_size does not divide K the last group covers the K % group_size
      columns left. Codes are stored padded to whole groups, G * group_size columns, the padding holding the
      zero point (it dequantizes to 0; no consumer reads it against a real input): ONNX Runtime's MatMulNBits
      layout, whose B is [N, n_blocks, blob] with n_blocks = ceil(K / block_size) and the last block padded
      (ContribOperators.md, MatMulNBits; its quantizer pads the same way, quantization/matmul_nbits_quantizer.py).
      The group size is then padded width / G, which the stacked-expert op (qwen3export::wq_moe, given no
      group size) relies on; K itself is `in_features` (the consumers read it from their input's last dim).
      Codes are unsigned: int8 `qweight` uint8 [..., N, G*group]; int4 `qweight` uint8 [..., N, G*group/2] with
      two codes per byte, even k in the low nibble and odd k in the high one (so qweight.view(N, G,
      group*bits/8) is MatMulNBits' input B, scales its [N, G]: "packed uint8 tensor of shape (N, k_blocks,
      blob_size)", "the first 4 bits are stored in the lower 4 bits of a byte").
      zero_points: uint8 [..., N, G] (AWQ / GPTQ asymmetric checkpoints) or None = 2^(bits-1), i.e. 128 / 8,
      the symmetric RTN case and MatMulNBits' default zero point.
    fp8:  W[..., n, k] = float(qweight[..., n, k]) * scale[..., n, 0]; qweight float8_e4m3fn [..., N, K],
      scales float32 [..., N, 1] (per output channel), zero_points None, group_size = K.
    Leading dims (...) stack experts: [E, N, K] for an MoE layer's gate_up or down.
    in_features: K; None means the stored width (every group whole, as AWQ / GPTQ / int8 per channel).
    """

    mode: str
    qweight: torch.Tensor
    scales: torch.Tensor
    zero_points: torch.Tensor | None
    group_size: int
    in_features: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise InputError(f"unknown quantization mode {self.mode!r}; choose one of {', '.join(QUANT_MODES)}")
        lead, n = tuple(self.qweight.shape[:-2]), self.qweight.shape[-2]
        width = self.qweight.shape[-1] * (2 if self.mode == "int4" else 1)  # codes stored per row, padding included
        k = width if self.in_features is None else self.in_features
        object.__setattr__(self, "in_features", k)
        want = {"int8": torch.uint8, "int4": torch.uint8, "fp8": torch.float8_e4m3fn}[self.mode]
        problems = []
        if self.qweight.dtype != want:
            problems.append(f"qweight dtype {self.qweight.dtype} (want {want})")
        g = self.group_size
        if g <= 0 or width % g:
            problems.append(f"group size {g} does not divide the {width} stored columns")
        elif self.mode == "fp8" and (g != k or width != k):
            problems.append(f"fp8 is per output channel: group size {g} and {width} stored columns (want K={k})")
        elif not width - g < k <= width:
            problems.append(f"K={k} with {width} stored columns (want {width // g} groups of {g} to cover K, "
                            "the last one padded)")
        elif tuple(self.scales.shape) != (*lead, n, width // g):
            problems.append(f"scales {tuple(self.scales.shape)} (want {(*lead, n, width // g)})")
        if self.zero_points is not None and (self.mode == "fp8" or self.zero_points.dtype != torch.uint8
                                             or self.zero_points.shape != self.scales.shape):
            problems.append(f"zero_points {self.zero_points.dtype} {tuple(self.zero_points.shape)} "
                            "(want uint8 shaped like scales, and none for fp8)")
        if problems:
            raise WeightsError(f"inconsistent {self.mode} quantized weight: {'; '.join(problems)}")

    @property
    def bits(self) -> int:
        return BITS[self.mode]

    @property
    def shape(self) -> tuple[int, ...]:
        """The dequantized weight's shape [..., N, K]."""
        return (*self.qweight.shape[:-1], self.in_features)

    @property
    def n_groups(self) -> int:
        return self.scales.shape[-1]

    @property
    def padded(self) -> bool:
        """Whether the last group is partial (group_size does not divide K): codes stored past K."""
        return self.in_features != self.n_groups * self.group_size

    def codes(self, padded: bool = False) -> torch.Tensor:
        """Unsigned integer codes [..., N, K] (uint8), int4 unpacked; [..., N, n_groups * group_size] with the
        last group's padding when `padded`. int modes only."""
        if self.mode == "fp8":
            raise InputError("fp8 weights have no integer codes; use dequantize()")
        codes = self.qweight if self.mode == "int8" else torch.stack([self.qweight & 0xF, self.qweight >> 4],
                                                                     -1).flatten(-2)
        return codes if padded else codes[..., :self.in_features]

    def zeros(self) -> torch.Tensor:
        """Zero points [..., N, n_groups] as uint8, the symmetric default 2^(bits-1) filled in."""
        if self.zero_points is not None:
            return self.zero_points
        return torch.full(self.scales.shape, 2 ** (self.bits - 1), dtype=torch.uint8, device=self.scales.device)

    def nbytes(self) -> int:
        """Bytes stored: codes + scales + zero points (what decode reads per token for this weight)."""
        total = self.qweight.numel() * self.qweight.element_size() + self.scales.numel() * self.scales.element_size()
        return total + (self.zero_points.numel() if self.zero_points is not None else 0)

    def tensors(self, name: str) -> dict[str, torch.Tensor]:
        """The artifact's tensors for `name`: '….weight' -> '….qweight', '….scales', '….zero_points'."""
        base = name.removesuffix(".weight")
        out = {f"{base}.qweight": self.qweight, f"{base}.scales": self.scales}
        if self.zero_points is not None:
            out[f"{base}.zero_points"] = self.zero_points
        return out


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] in 0..15 (K even) -> uint8 [..., K/2], even k in the low nibble."""
    return codes[..., 0::2] | (codes[..., 1::2] << 4)


def check_group_size(group_size: int) -> None:
    """int4 groups: a power of two >= 16 (MatMulNBits' block_size rule). It need not divide in_features: the last
    group then covers what is left (QuantizedWeight), as MatMulNBits' last block does."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 or group_size & (
            group_size - 1):
        raise InputError(f"--group-size {group_size!r} must be a power of two >= 16 (16, 32, 64, 128, …)")


@torch.no_grad()
def quantize_weight(weight: torch.Tensor, mode: str, group_size: int = 128,
                    scale_dtype: torch.dtype = torch.float16, name: str = "weight") -> QuantizedWeight:
    """Round-to-nearest symmetric quantization of W [..., N, K] along K.

    int8: one scale per output channel, scale = absmax / 127, codes round(W / scale) + 128.
    int4: one scale per group of `group_size` along K, scale = absmax / 7, codes round(W / scale) + 8; when
      group_size does not divide K the last group's absmax is over its K % group_size real columns, and the
      codes are padded to whole groups with the zero point 8 (W padded with zeros, as ONNX Runtime's quantizer).
    fp8:  one fp32 scale per output channel, scale = absmax / 448, codes float8_e4m3fn(W / scale).
    The scale is rounded to `scale_dtype` (pass the engine's activation dtype: MatMulNBits wants A's dtype)
    before the codes are computed, so dequantize() is exactly what an engine computes. torch.round rounds
    half to even. An all-zero group gets scale 0 and dequantizes to zeros.
    """
    if mode not in QUANT_MODES:
        raise InputError(f"unknown --quant {mode!r}; choose one of none, {', '.join(QUANT_MODES)}")
    if weight.dim() < 2 or not weight.is_floating_point():
        raise WeightsError(f"{name}: only floating-point matrices [..., N, K] are quantized, got "
                           f"{weight.dtype} {tuple(weight.shape)}")
    w = weight.float()
    if not torch.isfinite(w).all():
        raise WeightsError(f"{name} holds inf or NaN; the checkpoint is corrupt")
    k = w.shape[-1]
    if mode == "int4":
        check_group_size(group_size)
    group = group_size if mode == "int4" else k
    n_groups = -(-k // group)
    if n_groups * group != k:  # zeros past K: they leave the last group's absmax alone and quantize to code 8
        w = torch.nn.functional.pad(w, (0, n_groups * group - k))
    grouped = w.unflatten(-1, (n_groups, group))  # [..., N, G, group]
    absmax = grouped.abs().amax(-1)  # [..., N, G]
    if mode == "fp8":
        scales = absmax / FP8_MAX
        safe = torch.where(scales > 0, scales, torch.ones_like(scales))
        codes = (grouped / safe[..., None]).clamp(-FP8_MAX, FP8_MAX).flatten(-2).to(torch.float8_e4m3fn)
        return QuantizedWeight("fp8", codes, scales, None, k)
    qmax = _qmax(BITS[mode])
    scales = (absmax / qmax).to(scale_dtype)
    safe = torch.where(scales > 0, scales.float(), torch.ones_like(absmax))
    q = torch.round(grouped / safe[..., None]).clamp(-qmax, qmax)
    codes = (q + 2 ** (BITS[mode] - 1)).to(torch.uint8).flatten(-2)  # [..., N, G * group]
    return QuantizedWeight(mode, pack_int4(codes) if mode == "int4" else codes, scales, None, group, k)


def dequantize(qw: QuantizedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The eager reference: W [..., N, K] computed in fp32 from codes, zero points and scales, cast to `dtype`
    (a partial last group's padding is not part of it)."""
    k = qw.in_features
    scales = qw.scales.float().repeat_interleave(qw.group_size, -1)[..., :k]  # [..., N, K]
    if qw.mode == "fp8":
        return (qw.qweight.float() * scales).to(dtype)
    zeros = qw.zeros().float().repeat_interleave(qw.group_size, -1)[..., :k]
    return ((qw.codes().float() - zeros) * scales).to(dtype)


MATMUL_NBITS_MAX_BLOCK = 256  # blocks above this gain nothing; MLAS's CPU kernels take 16..256 (2^k)
# MatMulNBits accuracy levels this project builds and verifies (ContribOperators.md, MatMulNBits): 0 = A kept in
# its own dtype (fp32 here), 4 = A quantized to int8 per block inside the op (MLAS CompInt8; emulated in the
# parity reference by quantize_activation_int8_blocks). 1..3 (fp32 / fp16 / bf16 compute) are not offered.
ACCURACY_LEVELS = (0, 4)


def nbits_block(group_size: int, k: int, n_groups: int) -> int:
    """MatMulNBits' / QMoE's block_size for a weight of `n_groups` groups over K: its group size when that is a
    power of two in 16..256, else the largest power of two <= 256 dividing it (an int8 per-channel weight with
    K = 3072 -> 256), the group's scale (and zero point) repeated over its blocks, which dequantizes to the same
    values. A single group (int8 per channel, or K <= group size) takes any block, the last one partial: the
    largest power of two in 16..256 not above K when its group size has none (K = 72 per channel -> 64).
    At accuracy level 4 this is also the block over which MatMulNBits quantizes its input A."""
    block = min(group_size & -group_size, MATMUL_NBITS_MAX_BLOCK)
    if block < 16 and n_groups == 1:
        block = min(MATMUL_NBITS_MAX_BLOCK, max(16, 1 << (k.bit_length() - 1)))
    if block < 16:
        raise InputError(f"MatMulNBits / QMoE need blocks of >= 16 (a power of two); group size {group_size} has "
                         "none")
    return block


def qmoe_block(weights: list[tuple[int, int, int]]) -> int:
    """One QMoE block_size for weights given as (group size, K, groups): nbits_block of the most constraining
    one. A weight of several groups needs blocks inside its groups (a power of two dividing the group); one of a
    single group takes any block, so it only constrains when no weight has several."""
    several = [nbits_block(g, k, n) for g, k, n in weights if n > 1]
    return min(several) if several else min(nbits_block(g, k, n) for g, k, n in weights)


def quantize_activation_int8_blocks(x: torch.Tensor, block: int) -> torch.Tensor:
    """What MatMulNBits at accuracy level 4 does to its input A on CPU, dequantized back: x [..., K] in blocks of
    `block` along K (the op's block_size; the last one partial), per block scale = amax / 127 and codes
    round-half-even(x * (127 / amax)) in int8 (0 for an all-zero block), returned as codes * scale in x's dtype.
    Read from ONNX Runtime's MLAS, QuantizeARow_CompInt8_avx512 / _avx2 (sqnbitgemm_kernel_avx512.cpp, avx2.cpp):
    `scale = maxScalar / 127.f`, `inverse_scale = 127.f / maxScalar`, `_mm512_roundscale_ps(v * inverse_scale,
    _MM_ROUND_NEAREST)`; the kernel then sums integer products per block times both scales (and the zero-point
    term as scale * sum(codes)), which is x_deq @ W_deq^T up to fp32 summation order. All in fp32 as MLAS does."""
    k = x.shape[-1]
    n_blocks = -(-k // block)
    xf = torch.nn.functional.pad(x.float(), (0, n_blocks * block - k)).unflatten(-1, (n_blocks, block))
    amax = xf.abs().amax(-1, keepdim=True)  # [..., blocks, 1]
    scale = amax / 127.0
    inverse = torch.where(amax != 0, torch.tensor(127.0) / amax, torch.zeros_like(amax))
    codes = torch.round(xf * inverse)  # half to even, |codes| <= 127
    return (codes * scale).flatten(-2)[..., :k].to(x.dtype)


def quantize_activation_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token fp8: x [..., K] -> (float8_e4m3fn [..., K], fp32 scale [..., 1]), x ≈ codes * scale.
    A zero row gets scale 1 (its codes are zeros). kernels/fp8_matmul.py computes the same in its kernel."""
    xf = x.float()
    scale = xf.abs().amax(-1, keepdim=True) / FP8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), scale


def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Concatenate along N (gate rows then up rows -> an expert's gate_up); mode and group size must agree."""
    return _join(parts, lambda ts: torch.cat(ts, -2))


def stack(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack along a new leading dim (experts -> [E, N, K])."""
    return _join(parts, lambda ts: torch.stack(ts, 0))


def _join(parts: list[QuantizedWeight], join) -> QuantizedWeight:
    first = parts[0]
    if any((p.mode, p.group_size, p.in_features) != (first.mode, first.group_size, first.in_features) for p in parts):
        raise WeightsError("cannot join quantized weights of different modes, group sizes or in_features: "
                           f"{sorted({(p.mode, p.group_size, p.in_features) for p in parts})}")
    zeros = None if all(p.zero_points is None for p in parts) else join([p.zeros() for p in parts])
    return QuantizedWeight(first.mode, join([p.qweight for p in parts]), join([p.scales for p in parts]), zeros,
                           first.group_size, first.in_features)


# ------------------------------------------------------------------ which tensors, and a quantizing source
@dataclass(frozen=True)
class QuantConfig:
    """What `build --quant` asks for. group_size applies to int4 (int8 / fp8 are per output channel);
    scale_dtype is the dtype int scales are stored in (the engine's activation dtype; fp8 scales are fp32)."""

    mode: str
    group_size: int = 128
    quantize_lm_head: bool = False
    scale_dtype: torch.dtype = torch.float16
    scheme: str = "rtn"  # how the weights were quantized: "rtn" (here, from the checkpoint) | "awq" | "gptq"
    # MatMulNBits accuracy_level of the int4 linears (ACCURACY_LEVELS): 4 quantizes their activations to int8 per
    # block inside the op (CPU's fast path), 0 keeps them fp32. int8 / fp8 builds keep 0.
    accuracy_level: int = 0

    def __post_init__(self) -> None:
        if self.mode not in QUANT_MODES:
            raise InputError(f"unknown --quant {self.mode!r}; choose one of none, {', '.join(QUANT_MODES)}")
        if self.scheme not in ("rtn", "awq", "gptq"):
            raise InputError(f"unknown quantization scheme {self.scheme!r}; rtn, awq or gptq")
        # a pre-quantized checkpoint may be per channel (group_size -1 in its quantization_config)
        if self.mode == "int4" and not (self.scheme != "rtn" and self.group_size == -1):
            check_group_size(self.group_size)
        if self.accuracy_level not in ACCURACY_LEVELS or (self.accuracy_level and self.mode != "int4"):
            raise InputError(f"MatMulNBits accuracy level {self.accuracy_level!r} for --quant {self.mode}: use "
                             f"{' or '.join(map(str, ACCURACY_LEVELS))}, and 4 with --quant int4 only")

    def to_dict(self) -> dict:
        """The manifest's view (group size only where it means something: int4, or a checkpoint's own)."""
        group = self.group_size if self.mode == "int4" or self.scheme != "rtn" else None
        return {"mode": self.mode, "group_size": group, "quantize_lm_head": self.quantize_lm_head,
                "scheme": self.scheme, "accuracy_level": self.accuracy_level}
        if self.scale_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise InputError(f"quantization scales must be fp16, bf16 or fp32, got {self.scale_dtype}")


def is_quantized(name: str, quantize_lm_head: bool = False) -> bool:
    """Whether a Hugging Face tensor name is a quantized linear weight: attention q/k/v/o and MLP / expert
    gate/up/down projections; lm_head when asked. Embedding, norms and the MoE router (mlp.gate) are not."""
    if name == "lm_head.weight":
        return quantize_lm_head
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in QUANTIZED_PROJECTIONS


TIED_HEAD = "lm_head.weight"  # with tied embeddings (Qwen3-0.6B) a quantized lm_head is quantized from
EMBEDDING = "model.embed_tokens.weight"  # the embedding, which itself stays fp (the gather reads one row)
