"""Tile order shared by the GEMM-shaped kernels (wq_matmul, fp8_matmul, fused_moe, fused_moe_wq)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, n_tiles_m, n_tiles_n, GROUP_SIZE_M: tl.constexpr):
    """Program `pid` -> its (row tile, column tile), visiting tiles in groups of GROUP_SIZE_M row tiles so
    consecutive programs share column tiles of the weight in L2 (Triton tutorial 03-matrix-multiplication)."""
    tiles_per_group = GROUP_SIZE_M * n_tiles_n
    first_m = (pid // tiles_per_group) * GROUP_SIZE_M
    group_rows = tl.minimum(n_tiles_m - first_m, GROUP_SIZE_M)
    pid_m = first_m + (pid % tiles_per_group) % group_rows
    pid_n = (pid % tiles_per_group) // group_rows
    return pid_m, pid_n
