"""AOTInductor backend: the captured decoder and the sampling graph compiled ahead of time into `.pt2`
packages (torch._inductor.aoti_compile_and_package), loaded with torch._inductor.aoti_load_package.

For target `cpu` this builds and runs here. CUDA packages need a CUDA toolchain *and* device at build
time (Inductor autotunes its Triton kernels on the device), so GPU targets report the step as needing one.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import torch
from torch._inductor import aoti_load_package
from torch.export import ExportedProgram

from qwen3export.errors import TargetError

DECODER_FILE = "decoder.pt2"
SAMPLING_FILE = "sampling.pt2"


def check_can_build(target) -> None:
    if target.kind != "cpu" and not torch.cuda.is_available():
        raise TargetError(f"--backend aoti for GPU target {target.name} needs a CUDA GPU at build time (Inductor "
                          "tunes its kernels on the device); build it on a machine with one, or use --target cpu")


def _compile(ep: ExportedProgram, path: Path) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        logging.getLogger("torch._inductor").setLevel(logging.ERROR)
        torch._inductor.aoti_compile_and_package(ep, package_path=str(path))


def emit(decoder: ExportedProgram, sampling: ExportedProgram, folder: Path) -> dict[str, Any]:
    """Write decoder.pt2 and sampling.pt2 into `folder`; return the manifest's engine entry."""
    _compile(decoder, folder / DECODER_FILE)
    _compile(sampling, folder / SAMPLING_FILE)
    return {"file": DECODER_FILE, "sampling_file": SAMPLING_FILE, "device": "cpu",
            "torch": torch.__version__}


class AotiEngine:
    """The decoder package behind the same step signature as the ONNX engine."""

    def __init__(self, artifact, spec):
        self.spec = spec
        self.providers = ["AOTInductor (cpu)"]
        self.model = aoti_load_package(str(artifact.file(artifact.manifest["engine"]["file"])))
        self.sampler = aoti_load_package(str(artifact.file(artifact.manifest["engine"]["sampling_file"])))

    def empty_cache(self, batch: int) -> tuple:
        s = self.spec
        z = torch.zeros(batch, s.num_key_value_heads, 0, s.head_dim)
        return tuple((z, z) for _ in range(s.num_hidden_layers))

    def __call__(self, input_ids, position_ids, attention_mask, past):
        # the package was compiled for contiguous inputs (it does not check strides: a strided cache gives
        # wrong numbers, which the parity gate caught), and its outputs may live in buffers it reuses on
        # the next call: hand it contiguous tensors and keep our own contiguous copies of what it returns
        own = lambda t: t.contiguous() if not t.is_contiguous() else t  # noqa: E731
        with torch.no_grad():
            logits, present = self.model(own(input_ids), own(position_ids), own(attention_mask),
                                         tuple((own(k), own(v)) for k, v in past))
        copy = lambda t: t.clone(memory_format=torch.contiguous_format)  # noqa: E731
        return copy(logits), tuple((copy(k), copy(v)) for k, v in present)
