"""RMSNorm and the fused residual-add + RMSNorm of every Qwen3 decoder layer (`qwen3export::rms_norm`,
`qwen3export::add_rms_norm`); the graph's reference is graphs/decoder.py `rms_norm_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qwen3export.errors import InputError
from qwen3export.graphs.functional import rms_norm_reference as _graph_rms_norm
from qwen3export.kernels.config import ArchLimits, CompileSpec, KernelConfig, divisibility_hints
from qwen3export.kernels.launch import launch


@triton.jit
def _rms_norm_kernel(
    # pointers
    x_ptr, residual_ptr, weight_ptr, out_ptr, sum_ptr,
    # dimensions
    n_rows, n_cols, eps,
    # strides (elements; the last dimension is contiguous)
    stride_x_row, stride_residual_row, stride_out_row, stride_sum_row,
    # meta
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_ROWS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """out = w * cast(s / sqrt(mean(s^2) + eps)), s = x (+ residual, rounded to x's dtype and stored).

    x, residual, sum [n_rows, n_cols]; weight [n_cols]; out [n_rows, n_cols] in the weight's dtype.
    Each program normalises BLOCK_ROWS rows held whole in registers (BLOCK_N = next_pow2(n_cols)); columns
    >= n_cols load 0, so they add nothing to the sum of squares, which is divided by the real n_cols.
    The normalised value is cast to the weight's dtype before the weight multiply (graphs/decoder.py
    rms_norm_reference: transformers' Qwen3RMSNorm casts to the input's dtype, which is the weight's
    everywhere but in an fp16 decoder's fp32 residual stream); the sum of squares is fp32 because Qwen3
    is trained in bf16 and fp16 squares overflow.
    """
    rows = tl.program_id(0).to(tl.int64) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BLOCK_ROWS]
    cols = tl.arange(0, BLOCK_N)  # [BLOCK_N]
    mask = (rows[:, None] < n_rows) & (cols[None, :] < n_cols)  # [BLOCK_ROWS, BLOCK_N]
    x = tl.load(x_ptr + rows[:, None] * stride_x_row + cols[None, :], mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(residual_ptr + rows[:, None] * stride_residual_row + cols[None, :], mask=mask, other=0.0)
        x = (x.to(tl.float32) + r.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(sum_ptr + rows[:, None] * stride_sum_row + cols[None, :], x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)  # [BLOCK_ROWS]
    normed = (xf * rstd[:, None]).to(weight_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(weight_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    out = (normed * w[None, :]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows[:, None] * stride_out_row + cols[None, :], out, mask=mask)


def _check(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if weight.dim() != 1 or x.shape[-1] != weight.shape[0]:
        raise InputError(f"rms_norm: x {tuple(x.shape)} and weight {tuple(weight.shape)} disagree on the last dim")
    if residual is not None and residual.shape != x.shape:
        raise InputError(f"add_rms_norm: residual {tuple(residual.shape)} must have x's shape {tuple(x.shape)}")
    if not x.is_floating_point() or x.device != weight.device:
        raise InputError("rms_norm: x must be floating point and on weight's device")


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.stride(-1) == 1 else t.contiguous().reshape(-1, t.shape[-1])


def _launch(x, residual, weight, eps, config):
    config = config or DEFAULT_CONFIG
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=weight.dtype, device=x.device)
    total = torch.empty_like(x2) if residual is not None else out
    n_rows, n_cols = x2.shape
    block_rows = config["BLOCK_ROWS"]
    launch(_rms_norm_kernel, (triton.cdiv(n_rows, block_rows),),
           x2, r2, weight.contiguous(), out, total,
           n_rows, n_cols, eps,
           x2.stride(0), r2.stride(0), out.stride(0), total.stride(0),
           device=x.device, num_warps=config.num_warps, num_stages=config.num_stages,
           HAS_RESIDUAL=residual is not None, BLOCK_ROWS=block_rows, BLOCK_N=triton.next_power_of_2(n_cols))
    return out.view(x.shape), total.view(x.shape)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             config: KernelConfig | None = None) -> torch.Tensor:
    """RMSNorm over the last dim: x [..., N], weight [N] -> [..., N] in weight.dtype."""
    _check(x, weight, None)
    return _launch(x, None, weight, eps, config)[0]


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual): x, residual [..., N], weight [N]; the sum is in x's dtype."""
    _check(x, weight, residual)
    return _launch(x, residual, weight, eps, config)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float,
                       config: KernelConfig | None = None) -> torch.Tensor:
    """The graph's RMSNorm (graphs/decoder.py); `config` is accepted and ignored."""
    return _graph_rms_norm(x, weight, eps)


def add_rms_norm_reference(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                           config: KernelConfig | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The decoder layer's `x = x + a` followed by the next RMSNorm, in plain torch."""
    total = x + residual
    return _graph_rms_norm(total, weight, eps), total


CONFIG_SPACE = [KernelConfig("rms_norm", {"BLOCK_ROWS": rows}, num_warps=warps, num_stages=1)
                for rows in (1, 2, 4) for warps in (1, 2, 4, 8, 16)]
DEFAULT_CONFIG = KernelConfig("rms_norm", {"BLOCK_ROWS": 1}, num_warps=8, num_stages=1)

# Qwen3 hidden sizes run 1024 (0.6B) to 5120 (32B): 4096 rows (8B, 235B-A22B) are the common large case.
COMPILE_SHAPES = ({"hidden": 4096},)


def keep(config: KernelConfig, arch: ArchLimits) -> bool:
    """Configs worth compiling: whole rows in registers leave no shared-memory or stage choice to prune."""
    return config.threads <= arch.max_threads_per_block


def compile_specs(config: KernelConfig, dtype: str, shape: dict) -> list[CompileSpec]:
    """The plain and the residual specialisation of the kernel for `shape`."""
    block_n = triton.next_power_of_2(shape["hidden"])
    # the row strides are multiples of hidden: hinted 16 only when hidden is (72 and 136 are multiples of 8)
    hints = divisibility_hints(dict.fromkeys(("n_cols", "stride_x_row", "stride_residual_row", "stride_out_row",
                                              "stride_sum_row"), shape["hidden"]))
    specs = []
    for has_residual in (False, True):
        specs.append(CompileSpec(
            _rms_norm_kernel,
            pointers={"x_ptr": dtype, "residual_ptr": dtype, "weight_ptr": dtype, "out_ptr": dtype, "sum_ptr": dtype},
            constexprs={"HAS_RESIDUAL": has_residual, "BLOCK_N": block_n} | config.constexprs,
            **hints,
            scalars={"eps": "fp32"},
            num_warps=config.num_warps, num_stages=config.num_stages,
            shape=f"hidden={shape['hidden']}" + (",residual" if has_residual else "")))
    return specs
