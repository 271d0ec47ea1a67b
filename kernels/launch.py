"""How launchers start a Triton kernel: compiled on a CUDA device, or through Triton's interpreter on CPU
tensors, a choice made once per process before triton is imported (see INTERPRETER MODE below).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import torch
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from qwen3export.errors import TargetError

# INTERPRETER MODE. Triton 3.9 picks compiler or interpreter when `@triton.jit` decorates a function
# (reading TRITON_INTERPRET then), and its own library (tl.max, tl.sum, tl.sigmoid, tl.cumsum…) is
# decorated when triton.language is imported. An interpreted kernel calling a library helper decorated
# for the compiler fails ("Cannot call @triton.jit'd outside of the scope of a kernel"), and a process
# that imported triton in interpreter mode cannot cross-compile ("'value' object has no attribute
# 'dtype'"). So TRITON_INTERPRET=1, or QWEN3EXPORT_TRITON_INTERPRET=1 set before qwen3export.kernels is
# imported (kernels/__init__.py), must be in the environment before triton's first import, and
# kernels/compile.py compiles in clean subprocesses when this process interprets.
INTERPRET_ENV = "QWEN3EXPORT_TRITON_INTERPRET"


def is_interpreted(kernel: Any) -> bool:
    """True when `kernel` (a `@triton.jit` result) runs through the interpreter in this process."""
    return isinstance(kernel, InterpretedFunction)


def as_jit(kernel: Any) -> JITFunction:
    """The compilable JITFunction of a kernel, whichever mode decorated it."""
    return kernel if isinstance(kernel, JITFunction) else JITFunction(kernel.fn)


def ops_run_triton(tensor: torch.Tensor) -> bool:
    """Whether a custom op runs its Triton launcher (CUDA, or CPU with the interpreter asked for)
    instead of its pure-torch reference."""
    return tensor.is_cuda or os.environ.get(INTERPRET_ENV) == "1"


def launch(kernel: Any, grid: tuple[int, ...] | Callable, *args: Any, device: torch.device,
           num_warps: int, num_stages: int, **constexprs: Any) -> None:
    """kernel[grid](*args, **constexprs) with the config's warps/stages (the interpreter ignores them)."""
    if device.type != "cuda" and not is_interpreted(kernel):
        raise TargetError(f"Triton kernel {kernel.__name__} got {device.type} tensors but this process compiles "
                          f"for CUDA; set {INTERPRET_ENV}=1 (or TRITON_INTERPRET=1) before importing triton")
    kernel[grid](*args, num_warps=num_warps, num_stages=num_stages, **constexprs)
