"""Write AWQ / GPTQ checkpoints by quantizing a real (fp) Hugging Face folder: round-to-nearest asymmetric
int4 per group, packed with the independent packers of tests/test_prequantized.py. Gives pre-quantized
folders with the source's statistics (test_prequantized's own folders hold random codes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from qwen3export.quant_format import is_quantized
from qwen3export.weights import SafetensorsSource

from test_prequantized import awq_pack, gptq_pack_cols, gptq_pack_rows


def rtn_asymmetric(w: torch.Tensor, group: int, bits: int = 4, min_zero: int = 0):
    """W [N, K] -> codes [K, N], zero points [K/group, N] (ints), fp16 scales [K/group, N]: min/max per group.
    `min_zero` 1 for GPTQ's v1 format, which stores zero points minus one (so 0 cannot be stored)."""
    n, k = w.shape
    g = w.float().reshape(n, k // group, group)
    lo, hi = g.amin(-1).clamp(max=0), g.amax(-1).clamp(min=0)
    qmax = 2 ** bits - 1
    span = (hi - lo) / qmax
    scales = torch.where(span > 0, span, torch.ones_like(span)).half()  # an all-zero group (a zeroed row): scale 1
    zeros = torch.round(-lo / scales.float()).clamp(min_zero, qmax)
    codes = torch.round(g / scales.float()[..., None] + zeros[..., None]).clamp(0, qmax)
    return (codes.reshape(n, k).t().numpy().astype(np.int64), zeros.t().numpy().astype(np.int64),
            scales.t().contiguous())


def write_quantized_from(src: Path, dst: Path, method: str, group: int = 32) -> Path:
    """`src` (config.json + safetensors) -> `dst` as an AWQ (GEMM) or GPTQ (v1 format) int4 checkpoint."""
    dst.mkdir(parents=True)
    source = SafetensorsSource(src)
    tensors = {}
    for name in sorted(source.names()):
        w = source.get(name)
        if not is_quantized(name):
            tensors[name] = w.contiguous()
            continue
        codes, zeros, scales = rtn_asymmetric(w, group, min_zero=0 if method == "awq" else 1)
        base = name.removesuffix(".weight")
        if method == "awq":
            tensors.update({base + ".qweight": awq_pack(codes), base + ".qzeros": awq_pack(zeros),
                            base + ".scales": scales})
        else:  # checkpoint_format "gptq": zero points stored minus one
            tensors.update({base + ".qweight": gptq_pack_rows(codes, 4), base + ".qzeros": gptq_pack_cols(zeros - 1, 4),
                            base + ".scales": scales,
                            base + ".g_idx": torch.arange(w.shape[1], dtype=torch.int32) // group})
    save_file(tensors, str(dst / "model.safetensors"))
    qc = ({"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
          if method == "awq" else {"quant_method": "gptq", "bits": 4, "group_size": group, "desc_act": False,
                                   "sym": False})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps({**cfg, "quantization_config": qc}))
    for extra in ("generation_config.json",):
        if (src / extra).is_file():
            shutil.copy(src / extra, dst / extra)
    return dst
