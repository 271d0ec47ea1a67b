"""Weight-only quantized GEMM (W8A16 / W4A16): y = x W^T with W dequantized in registers from int8 / packed int4
codes, group scales and optional zero points (qwen3export/quant.py's QuantizedWeight layout), fp32 accumulation.
The planned `qwen3export::wq_linear` op runs it for every quantized attention / MLP projection.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, aligned_args
from qwen3export.kernels.launch import launch
from qwen3export.kernels.tiles import grouped_tile
from qwen3export.quant_format import QuantizedWeight, dequantize


@triton.jit
def dequantize_tile(q_ptrs, s_ptrs, z_ptrs, shift, mask, n_ok, out_dtype: tl.constexpr, BITS: tl.constexpr,
                     HAS_ZP: tl.constexpr):
    """W tile [BLOCK_K, BLOCK_N] = (code - zero) * scale in fp32, rounded to out_dtype (the tl.dot operand).

    q_ptrs [BLOCK_K, BLOCK_N] point at the byte holding each code (int4: byte k // 2, nibble `shift` = 4 (k % 2),
    quant.py's low-nibble-first layout); s_ptrs / z_ptrs [BLOCK_N] at the tile's group. Without zero points the
    symmetric default 2^(BITS-1) applies (ONNX Runtime MatMulNBits' default zero point).
    """
    q = tl.load(q_ptrs, mask=mask, other=0)
    if BITS == 4:
        q = (q >> shift) & 0xF
    scale = tl.load(s_ptrs, mask=n_ok, other=0.0).to(tl.float32)
    if HAS_ZP:
        zero = tl.load(z_ptrs, mask=n_ok, other=0).to(tl.float32)
    else:
        zero = tl.full(scale.shape, 2 ** (BITS - 1), tl.float32)
    return ((q.to(tl.float32) - zero[None, :]) * scale[None, :]).to(out_dtype)


@triton.jit
def _wq_matmul_kernel(
    # pointers
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr,
    # dimensions
    M, N, K, group_size,
    # strides (elements; the K axis of x, qweight, scales and zeros is contiguous)
    stride_xm, stride_qn, stride_sn, stride_om,
    # meta
    BITS: tl.constexpr,
    HAS_ZP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """out[m, n] = sum_k x[m, k] * (code[n, k] - zero[n, k // g]) * scale[n, k // g].

    x [M, K] fp16/bf16/fp32; qweight uint8 [N, G*g] (BITS 8) or [N, G*g/2] (BITS 4, two codes per byte),
    G = ceil(K/g) whole groups (a partial last group is padded: quant.QuantizedWeight); scales [N, G]; zeros
    uint8 [N, G] when HAS_ZP; out [M, N] in x's dtype. Each K tile lies in one group (the launcher caps BLOCK_K
    at g unless there is a single group), so one scale / zero row per tile; k >= K is masked (x and W alike),
    so the padding is never read.
    The weight is dequantized in registers to x's dtype and multiplied with tl.dot into an fp32 accumulator
    (as Marlin / vLLM's AWQ Triton kernel do); tiles are visited in GROUP_SIZE_M groups along M for L2 reuse
    (Triton tutorial 03-matrix-multiplication).
    """
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_SIZE_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    x_ptrs = x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    q_ptrs = qweight_ptr + offs_n[None, :].to(tl.int64) * stride_qn + offs_k[:, None] // (8 // BITS)  # [BK, BN]
    shift = (offs_k[:, None] % 2) * 4  # int4 nibble of each k (unused for int8)
    dtype = out_ptr.dtype.element_ty
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(x_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        g = k0 // group_size
        w = dequantize_tile(q_ptrs, scales_ptr + offs_n * stride_sn + g, zeros_ptr + offs_n * stride_sn + g, shift,
                             k_ok[:, None] & n_ok[None, :], n_ok, dtype, BITS, HAS_ZP)
        acc = tl.dot(a, w, acc)
        x_ptrs += BLOCK_K
        q_ptrs += BLOCK_K // (8 // BITS)
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], acc.to(dtype),
             mask=m_ok[:, None] & n_ok[None, :])


def _weight(qweight, scales, zero_points, bits, group_size, in_features: int | None = None) -> QuantizedWeight:
    """The launcher's arguments as a QuantizedWeight: its __post_init__ checks every shape and dtype.
    in_features: K (x's last dim); None = the stored width."""
    if bits not in (4, 8):
        raise InputError(f"wq_matmul: bits={bits} must be 4 or 8")
    return QuantizedWeight("int4" if bits == 4 else "int8", qweight, scales, zero_points, group_size, in_features)


def _check_x(x: torch.Tensor, qw: QuantizedWeight, group_size: int) -> int:
    """K = x's last dim: floating point, and covered by the stored groups with the last one partial at most."""
    n, width = qw.shape
    k = x.shape[-1]
    if not x.is_floating_point() or not width - group_size < k <= width:
        raise InputError(f"wq_matmul: x {tuple(x.shape)} must be floating point [..., K] with K in "
                         f"{max(width - group_size + 1, 1)}..{width} for a weight [{n}, K] of {qw.n_groups} "
                         f"group(s) of {group_size}")
    return k


def block_k_for(config: KernelConfig, group_size: int, n_groups: int) -> int:
    """The config's BLOCK_K, capped at the group size when there are several groups (a K tile must not
    straddle two groups); group sizes below 16 cannot feed tl.dot."""
    block_k = config["BLOCK_K"]
    if n_groups > 1 and group_size % block_k:
        if group_size % 16:
            raise InputError(f"wq_matmul: group size {group_size} must be a multiple of 16")
        block_k = min(block_k, group_size & -group_size)
    return block_k


def wq_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zero_points: torch.Tensor | None,
              bits: int, group_size: int, config: KernelConfig | None = None) -> torch.Tensor:
    """x [..., K] @ W^T -> [..., N] in x's dtype, W [N, K] quantized as quant.QuantizedWeight, G = ceil(K/g)
    groups stored whole (bits 8: qweight uint8 [N, G*g]; bits 4: [N, G*g/2]; scales [N, G]; zero_points uint8
    [N, G] or None = 2^(bits-1)); K is x's last dim."""
    qw = _weight(qweight, scales, zero_points, bits, group_size)
    k = _check_x(x, qw, group_size)
    n = qw.shape[0]
    config = config or DEFAULT_CONFIG
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    qweight, scales = qweight.contiguous(), scales.contiguous()
    zeros = zero_points.contiguous() if zero_points is not None else qweight  # a uint8 dummy when absent
    m = x2.shape[0]
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    grid = (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),)
    launch(_wq_matmul_kernel, grid, x2, qweight, scales, zeros, out,
           m, n, k, group_size,
           x2.stride(0), qweight.stride(0), scales.stride(0), out.stride(0),
           device=x.device, num_warps=config.num_warps, num_stages=config.num_stages,
           BITS=bits, HAS_ZP=zero_points is not None, BLOCK_M=block_m, BLOCK_N=block_n,
           BLOCK_K=block_k_for(config, group_size, qw.n_groups), GROUP_SIZE_M=config["GROUP_SIZE_M"])
    return out.view(*x.shape[:-1], n)


def wq_matmul_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor,
                        zero_points: torch.Tensor | None, bits: int, group_size: int,
                        config: KernelConfig | None = None) -> torch.Tensor:
    """quant.dequantize (fp32) then an fp32 matmul, cast to x's dtype; `config` is ignored."""
    k = _check_x(x, _weight(qweight, scales, zero_points, bits, group_size), group_size)
    w = dequantize(_weight(qweight, scales, zero_points, bits, group_size, k))  # [N, K]
    return (x.float() @ w.t()).to(x.dtype)


CONFIG_SPACE = [KernelConfig("wq_matmul", {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                             num_stages=st, meta={"GROUP_SIZE_M": gm})
                for bm in (16, 32, 64, 128) for bn in (32, 64, 128) for bk in (32, 64, 128) for gm in (1, 8)
                for w in (4, 8) for st in (2, 3, 4)]
# decode-leaning default (M = batch, small): 16-row tiles waste least of the MMA on one token, 64 x 64 weight
# tiles keep one group's scale row per K step
DEFAULT_CONFIG = KernelConfig("wq_matmul", {"BLOCK_M": 16, "BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4,
                              num_stages=3, meta={"GROUP_SIZE_M": 8})

# Qwen3-8B's q_proj / o_proj (hidden 4096): int4 g128 symmetric (our RTN), int4 g128 with zero points
# (AWQ / GPTQ asymmetric), int8 per channel
COMPILE_SHAPES = ({"bits": 4, "K": 4096, "N": 4096, "group": 128, "zero_points": 0},
                  {"bits": 4, "K": 4096, "N": 4096, "group": 128, "zero_points": 1},
                  {"bits": 8, "K": 4096, "N": 4096, "group": 4096, "zero_points": 0})


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """One fp32 [BLOCK_M, BLOCK_N] accumulator (<= 128 registers a thread) and, per stage, an x tile of 2-byte
    elements plus the dequantized weight tile; enough work per thread to fill the warps."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    shared = config.num_stages * (2 * bm * bk + 2 * bk * bn)
    return bm * bn // config.threads <= 128 and shared <= arch.max_shared_per_block and bn * bk >= 8 * config.threads


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    k, n, group = shape["K"], shape["N"], shape["group"]
    n_groups = -(-k // group)
    row_bytes = n_groups * group * shape["bits"] // 8  # qweight's row: whole groups, the last one padded
    block_k = block_k_for(config, group, n_groups)
    return [CompileSpec(
        _wq_matmul_kernel,
        pointers={"x_ptr": dtype, "qweight_ptr": "u8", "scales_ptr": dtype, "zeros_ptr": "u8", "out_ptr": dtype},
        constexprs=config.constexprs | {"BLOCK_K": block_k, "BITS": shape["bits"],
                                        "HAS_ZP": bool(shape["zero_points"])},
        aligned=aligned_args({"N": n, "K": k, "group_size": group, "stride_xm": k, "stride_qn": row_bytes,
                              "stride_om": n}),
        num_warps=config.num_warps, num_stages=config.num_stages,
        shape=",".join(f"{k}={v}" for k, v in shape.items()))]
