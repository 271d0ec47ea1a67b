"""Quantized weights whose group size does not divide K (the last group partial, quant.QuantizedWeight), shared by
the quantization tests of quant.py, the Triton kernels and the ONNX translations: int4 from quant.quantize_weight,
int8 in groups built here (quantize_weight's int8 is per channel; grouped int8 is what a GPTQ 8-bit checkpoint
holds), symmetric or with random zero points (AWQ / GPTQ style) on the same codes.
"""

from __future__ import annotations

import torch

from qwen3export.quant_format import QuantizedWeight, quantize_weight

# (K, group): the last group holds 32 of 96, 8 of 200, all 72 columns of a single 128-group, 7 of an odd 71
PARTIAL = [(96, 64), (200, 32), (72, 128), (71, 16)]


def partial_weight(lead: tuple[int, ...], n: int, k: int, mode: str, group: int, zero_points: bool = False,
                   seed: int = 0, scale_dtype: torch.dtype = torch.float32) -> QuantizedWeight:
    """A [*lead, n, k] weight ~ N(0, 1/k) quantized in groups of `group` along k (int4 or int8)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(*lead, n, k, generator=g) * k**-0.5
    if mode == "int4":
        qw = quantize_weight(w, "int4", group, scale_dtype=scale_dtype)
    else:  # absmax / 127 per group over its real columns; the padding of the last group holds code 128
        groups = -(-k // group)
        padded = torch.nn.functional.pad(w, (0, groups * group - k)).unflatten(-1, (groups, group))
        scales = (padded.abs().amax(-1) / 127).to(scale_dtype)
        codes = torch.round(padded / scales.float()[..., None]).clamp(-127, 127) + 128
        qw = QuantizedWeight("int8", codes.to(torch.uint8).flatten(-2), scales, None, group, k)
    if zero_points:
        zeros = (2 ** (qw.bits - 1) + torch.randint(-2, 3, qw.scales.shape, generator=g)).to(torch.uint8)
        qw = QuantizedWeight(qw.mode, qw.qweight, qw.scales, zeros, qw.group_size, qw.in_features)
    return qw


def cross_compile(kernel: str, config, dtype: str, shape: dict, cc: int = 80) -> list[dict]:
    """kernels/compile.py's measurement of every function `kernel`.compile_specs(config, dtype, shape) gives, in a
    clean interpreter (its `python -m` worker: one that imported Triton in interpreter mode cannot compile)."""
    import json
    import os
    import subprocess
    import sys

    from qwen3export.kernels.compile import kernel_module
    from qwen3export.kernels.launch import INTERPRET_ENV

    n = len(kernel_module(kernel).compile_specs(config, dtype, shape))
    jobs = [{"kernel": kernel, "config": config.to_dict(), "dtype": dtype, "shape": shape, "index": i, "cc": cc}
            for i in range(n)]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", INTERPRET_ENV)}
    done = subprocess.run([sys.executable, "-m", "qwen3export.kernels.compile"], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, check=True)
    return json.loads(done.stdout)
