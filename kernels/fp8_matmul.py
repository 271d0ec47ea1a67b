"""fp8 e4m3 GEMM for sm_89 / sm_90: activations quantized per token at run time, weights per output channel
(qwen3export/quant.py's fp8 QuantizedWeight), fp32 accumulation, output in the activations' dtype.
The planned `qwen3export::fp8_linear` op runs it; targets before sm_89 (no fp8 tensor cores) refuse it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3export.errors import InputError, TargetError
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, aligned_args
from qwen3export.kernels.launch import launch
from qwen3export.kernels.tiles import grouped_tile
from qwen3export.quant_format import FP8_MAX, quantize_activation_fp8

# fp8 (e4m3 / e5m2) tensor-core MMA exists from compute capability 8.9 (Ada) and 9.0 (Hopper) (CUDA C++
# Programming Guide, "Compute Capabilities"; PTX ISA mma .e4m3 requires sm_89); Triton's float8e4nv dot
# lowers only there.
ARCHS = ("sm_89", "sm_90")
MIN_CAPABILITY = (8, 9)
FP8_E4M3_MAX: tl.constexpr = tl.constexpr(FP8_MAX)  # a global a kernel reads must be a constexpr


@triton.jit
def _round_to_e4m3(v):
    """fp32 v (|v| <= 448) rounded half-to-even onto the e4m3 grid (3 mantissa bits; step 2^(e-3) for 2^e <= |v|,
    2^-9 below 2^-6, the subnormals), so the fp8 cast that follows is exact. Hardware cvt.rn.satfinite rounds the
    same way; the Triton 3.9 interpreter's cast does not (triton/runtime/interpreter.py _convert_float adds the
    round-up bit without carrying it into the exponent: 125.9 -> 64), hence rounding here, on every path.
    rint by the 1.5 * 2^23 trick: adding and subtracting it leaves the nearest-even integer for |y| < 2^22."""
    e = ((v.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127  # floor(log2 |v|) for normal fp32
    e = tl.maximum(e, -6)
    inv_step = ((127 + 3 - e) << 23).to(tl.float32, bitcast=True)  # 2^(3 - e), exact
    step = ((127 - 3 + e) << 23).to(tl.float32, bitcast=True)  # 2^(e - 3)
    y = v * inv_step
    return ((y + 12582912.0) - 12582912.0) * step


@triton.jit
def _fp8_quantize_rows_kernel(
    # pointers
    x_ptr, codes_ptr, scales_ptr,
    # dimensions
    K,
    # strides (elements; K is contiguous)
    stride_xm, stride_cm,
    # meta
    BLOCK_K: tl.constexpr,
):
    """codes[m] = fp8(x[m] / s[m]), s[m] = max(|x[m]|) / 448 (1 for an all-zero row): quant.quantize_activation_fp8.

    x [M, K] fp16/bf16/fp32; codes float8_e4m3fn [M, K]; scales fp32 [M]. One program per row, two passes.
    """
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK_K)
    absmax = tl.zeros([BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=offs < K - k0, other=0.0).to(tl.float32)
        absmax = tl.maximum(absmax, tl.abs(x))
    scale = tl.max(absmax, 0) / FP8_E4M3_MAX
    scale = tl.where(scale > 0, scale, 1.0)
    tl.store(scales_ptr + row, scale)
    for k0 in range(0, K, BLOCK_K):
        mask = offs < K - k0
        x = tl.load(x_ptr + row * stride_xm + k0 + offs, mask=mask, other=0.0).to(tl.float32)
        q = _round_to_e4m3(tl.minimum(tl.maximum(x / scale, -FP8_E4M3_MAX), FP8_E4M3_MAX))
        tl.store(codes_ptr + row * stride_cm + k0 + offs, q.to(tl.float8e4nv), mask=mask)


@triton.jit
def _fp8_matmul_kernel(
    # pointers
    a_ptr, b_ptr, a_scales_ptr, b_scales_ptr, out_ptr,
    # dimensions
    M, N, K,
    # strides (elements; K is contiguous in a and b)
    stride_am, stride_bn, stride_om,
    # meta
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_SIZE_M: tl.constexpr,
):
    """out[m, n] = (sum_k a[m, k] b[n, k]) * sa[m] * sb[n], a / b float8_e4m3fn, fp32 accumulation.

    a [M, K] (per-token codes), b [N, K] (the weight's codes, nn.Linear layout), sa fp32 [M], sb fp32 [N],
    out [M, N] fp16/bf16/fp32. Both scales factor out of the K sum, so they are applied once in the epilogue
    (as vLLM's / torch._scaled_mm's rowwise-scaled fp8 GEMM). Grouped tile order as Triton tutorial 03.
    """
    pid = tl.program_id(0)
    n_tiles_m = tl.cdiv(M, BLOCK_M)
    n_tiles_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_SIZE_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok, n_ok = offs_m < M, offs_n < N
    a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_am + offs_k[None, :]  # [BLOCK_M, BLOCK_K]
    b_ptrs = b_ptr + offs_n[None, :].to(tl.int64) * stride_bn + offs_k[:, None]  # [BLOCK_K, BLOCK_N]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = offs_k < K - k0
        a = tl.load(a_ptrs, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_ptrs, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K
    sa = tl.load(a_scales_ptr + offs_m, mask=m_ok, other=0.0)
    sb = tl.load(b_scales_ptr + offs_n, mask=n_ok, other=0.0)
    out = acc * sa[:, None] * sb[None, :]
    tl.store(out_ptr + offs_m[:, None].to(tl.int64) * stride_om + offs_n[None, :], out.to(out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def check_device(device: torch.device) -> None:
    """fp8 GEMM needs sm_89+; the interpreter (CPU tensors) runs anywhere."""
    if device.type == "cuda" and torch.cuda.get_device_capability(device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(device)
        raise TargetError(f"fp8_matmul needs an sm_89 or sm_90 GPU (fp8 tensor cores); this one is sm_{major}{minor}: "
                          "use --quant int8 or int4")


def _check(x, weight, weight_scales):
    if weight.dim() != 2 or weight.dtype != torch.float8_e4m3fn:
        raise InputError(f"fp8_matmul: weight must be float8_e4m3fn [N, K], got {weight.dtype} {tuple(weight.shape)}")
    n, k = weight.shape
    if x.shape[-1] != k or not x.is_floating_point():
        raise InputError(f"fp8_matmul: x {tuple(x.shape)} must be floating point [..., {k}]")
    if weight_scales.numel() != n:
        raise InputError(f"fp8_matmul: weight_scales {tuple(weight_scales.shape)} must hold one scale per output "
                         f"channel ({n})")


def quantize_rows_fp8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] (K contiguous) -> (float8_e4m3fn codes [M, K], fp32 scales [M]): the kernel form of
    quant.quantize_activation_fp8."""
    m, k = x.shape
    codes = torch.empty(m, k, dtype=torch.float8_e4m3fn, device=x.device)
    scales = torch.empty(m, dtype=torch.float32, device=x.device)
    launch(_fp8_quantize_rows_kernel, (m,), x, codes, scales, k, x.stride(0), codes.stride(0),
           device=x.device, num_warps=QUANTIZE_WARPS, num_stages=1, BLOCK_K=QUANTIZE_BLOCK_K)
    return codes, scales


def fp8_matmul(x: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor,
               config: KernelConfig | None = None) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32) @ W^T -> [..., N] in x's dtype; W = weight (float8_e4m3fn [N, K]) * weight_scales
    ([N] or [N, 1], fp32); x is quantized per token to fp8 first (quant.quantize_activation_fp8)."""
    _check(x, weight, weight_scales)
    check_device(x.device)
    config = config or DEFAULT_CONFIG
    n, k = weight.shape
    x2 = x.reshape(-1, k)
    x2 = x2 if x2.stride(-1) == 1 else x2.contiguous()
    m = x2.shape[0]
    codes, a_scales = quantize_rows_fp8(x2)
    weight = weight.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    block_m, block_n = config["BLOCK_M"], config["BLOCK_N"]
    launch(_fp8_matmul_kernel, (triton.cdiv(m, block_m) * triton.cdiv(n, block_n),),
           codes, weight, a_scales, weight_scales.reshape(n).float().contiguous(), out,
           m, n, k, codes.stride(0), weight.stride(0), out.stride(0),
           device=x.device, num_warps=config.num_warps, num_stages=config.num_stages,
           BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=config["BLOCK_K"], GROUP_SIZE_M=config["GROUP_SIZE_M"])
    return out.view(*x.shape[:-1], n)


def fp8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, weight_scales: torch.Tensor,
                         config: KernelConfig | None = None) -> torch.Tensor:
    """quant.quantize_activation_fp8, then the fp32 product of the codes scaled per token and per channel."""
    _check(x, weight, weight_scales)
    codes, scales = quantize_activation_fp8(x)  # [..., K], [..., 1]
    out = (codes.float() @ weight.float().t()) * scales * weight_scales.reshape(-1).float()
    return out.to(x.dtype)


QUANTIZE_BLOCK_K = 1024  # one row of Qwen3's hidden sizes (1024-5120) in 1-5 chunks
QUANTIZE_WARPS = 4
# fp8 MMA takes K tiles of 32 bytes per k-step: BLOCK_K >= 32 (64 / 128 keep one 128-byte line per row)
CONFIG_SPACE = [KernelConfig("fp8_matmul", {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w,
                             num_stages=st, meta={"GROUP_SIZE_M": gm})
                for bm in (16, 32, 64, 128) for bn in (64, 128, 256) for bk in (64, 128) for gm in (1, 8)
                for w in (4, 8) for st in (2, 3, 4)]
DEFAULT_CONFIG = KernelConfig("fp8_matmul", {"BLOCK_M": 64, "BLOCK_N": 128, "BLOCK_K": 128}, num_warps=4,
                              num_stages=3, meta={"GROUP_SIZE_M": 8})

COMPILE_SHAPES = ({"K": 4096, "N": 4096},)  # Qwen3-8B q_proj / o_proj


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """Only sm_89 / sm_90; one fp32 accumulator (<= 128 registers a thread) and 1-byte a / b tiles per stage."""
    bm, bn, bk = config["BLOCK_M"], config["BLOCK_N"], config["BLOCK_K"]
    shared = config.num_stages * (bm * bk + bk * bn)
    return (arch.arch in ARCHS and bm * bn // config.threads <= 128 and shared <= arch.max_shared_per_block
            and bm * bn >= 8 * config.threads)


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    """The row quantizer and the GEMM for one (K, N): the divisibility hint only on what is a multiple of 16."""
    k, n = shape["K"], shape["N"]
    label = f"K={k},N={n}"
    return [
        CompileSpec(_fp8_quantize_rows_kernel, pointers={"x_ptr": dtype, "codes_ptr": "fp8e4nv", "scales_ptr": "fp32"},
                    constexprs={"BLOCK_K": QUANTIZE_BLOCK_K},
                    aligned=aligned_args(dict.fromkeys(("K", "stride_xm", "stride_cm"), k)),
                    num_warps=QUANTIZE_WARPS, num_stages=1, shape=label),
        CompileSpec(_fp8_matmul_kernel,
                    pointers={"a_ptr": "fp8e4nv", "b_ptr": "fp8e4nv", "a_scales_ptr": "fp32", "b_scales_ptr": "fp32",
                              "out_ptr": dtype},
                    constexprs=config.constexprs,
                    aligned=aligned_args({"N": n, "K": k, "stride_am": k, "stride_bn": k, "stride_om": n}),
                    num_warps=config.num_warps, num_stages=config.num_stages, shape=label),
    ]
