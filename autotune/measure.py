"""The measured objective: run a config on the target's GPU, check it against the kernel's reference, then time
it with triton.testing.do_bench. Used by tune only when a CUDA device of the target's compute capability is
present; check_config also runs on CPU tensors under Triton's interpreter (tests).
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import triton.testing

from qwen3export.kernels import (attention_decode, attention_prefill, fused_moe, moe_align, moe_routing, qk_norm_rope,
                                 rms_norm)
from qwen3export.kernels.config import KernelConfig
from qwen3export.targets import Target

TORCH_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
TOLERANCE = {"fp32": (1e-4, 1e-4), "fp16": (2e-2, 2e-2), "bf16": (6e-2, 6e-2)}  # (atol, rtol) vs the fp32-ish references
EPS = 1e-6  # Qwen3 rms_norm_eps


def device_matches(target: Target) -> bool:
    """A CUDA device whose compute capability is the target's (measurements elsewhere would mislead)."""
    if not torch.cuda.is_available() or target.compute_capability is None:
        return False
    major, minor = torch.cuda.get_device_capability()
    return 10 * major + minor == target.compute_capability


def make_case(kernel: str, shape: dict, dtype: str, device: str, seed: int = 0
              ) -> tuple[Callable[[KernelConfig | None], Any], Callable[[], Any]]:
    """(run(config), reference()) closures over random inputs of `shape` for `kernel`'s launcher."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    dt = TORCH_DTYPES[dtype]

    def randn(*size, scale=1.0):
        return (torch.randn(*size, generator=gen) * scale).to(device=device, dtype=dt)

    if kernel == "rms_norm":
        x, res, w = randn(shape["M"], shape["N"]), randn(shape["M"], shape["N"]), randn(shape["N"])
        return (lambda c: rms_norm.add_rms_norm(x, res, w, EPS, config=c),
                lambda: rms_norm.add_rms_norm_reference(x, res, w, EPS))
    if kernel == "qk_norm_rope":
        m, hq, hkv, d = shape["M"], shape["Hq"], shape["Hkv"], shape["D"]
        q, k = randn(1, m, hq, d), randn(1, m, hkv, d)
        qw, kw = randn(d, scale=0.1) + 1, randn(d, scale=0.1) + 1
        angle = torch.rand(1, m, d, generator=gen).to(device) * 6.28
        cos, sin = angle.cos().to(dt), angle.sin().to(dt)
        return (lambda c: qk_norm_rope.qk_norm_rope(q, k, qw, kw, cos, sin, EPS, config=c),
                lambda: qk_norm_rope.qk_norm_rope_reference(q, k, qw, kw, cos, sin, EPS))
    if kernel in ("attention_prefill", "attention_decode"):
        b, hq, hkv, d = shape.get("B", 1), shape["Hq"], shape["Hkv"], shape["D"]
        s = shape["S"] if kernel == "attention_prefill" else 1
        length = shape.get("L", s)
        q, k, v = randn(b, hq, s, d), randn(b, hkv, length, d), randn(b, hkv, length, d)
        module = attention_prefill if kernel == "attention_prefill" else attention_decode
        launcher, reference = getattr(module, kernel), getattr(module, f"{kernel}_reference")
        return lambda c: launcher(q, k, v, config=c), lambda: reference(q, k, v)
    if kernel == "moe_routing":
        x, router = randn(shape["M"], shape["H"]), randn(shape["E"], shape["H"], scale=0.05)
        return (lambda c: moe_routing.moe_routing(x, router, shape["K"], True, config=c),
                lambda: moe_routing.moe_routing_reference(x, router, shape["K"], True))
    m, n_exp, top_k = shape["M"], shape["E"], shape["K"]
    ids = torch.rand(m, n_exp, generator=gen).argsort(dim=1)[:, :top_k].to(device)  # distinct experts per token
    if kernel == "moe_align":
        block_m = 64
        return (lambda c: moe_align.moe_align(ids, n_exp, block_m, config=c),
                lambda: moe_align.moe_align_reference(ids, n_exp, block_m))
    if kernel == "fused_moe":
        h, inter = shape["H"], shape["I"]
        x = randn(m, h)
        gate_up, down = randn(n_exp, 2 * inter, h, scale=h ** -0.5), randn(n_exp, h, inter, scale=inter ** -0.5)
        weights = torch.softmax(torch.randn(m, top_k, generator=gen), dim=-1).to(device=device, dtype=dt)
        return (lambda c: fused_moe.fused_moe(x, gate_up, down, weights, ids, config=c),
                lambda: fused_moe.fused_moe_reference(x, gate_up, down, weights, ids))
    raise ValueError(f"no measurement case for kernel {kernel!r}")


def _mismatch(kernel: str, got: Any, want: Any, dtype: str) -> str | None:
    """None when the outputs agree; else what differs. Routing ids may differ only where weights tie."""
    got = got if isinstance(got, tuple) else (got,)
    want = want if isinstance(want, tuple) else (want,)
    atol, rtol = TOLERANCE[dtype]
    for index, (a, b) in enumerate(zip(got, want)):
        if kernel == "moe_routing" and index == 1:
            if (a != b).float().mean().item() > 0.01:
                return "routing ids differ from the reference on more than 1% of slots"
            continue
        if not a.is_floating_point():
            if not torch.equal(a.cpu(), b.to(a.dtype).cpu()):
                return f"output {index} differs from the reference"
            continue
        if not torch.allclose(a.float(), b.float(), atol=atol, rtol=rtol):
            return f"output {index} max abs error {(a.float() - b.float()).abs().max().item():.3g} > {atol}"
    return None


def check_config(kernel: str, shape: dict, dtype: str, config: KernelConfig, device: str = "cuda") -> str | None:
    """Run `config` once and compare with the reference: None if correct, else the reason it is invalid."""
    run, reference = make_case(kernel, shape, dtype, device)
    try:
        got = run(config)
    except Exception as exc:  # triton OutOfResources, compile errors: the config is invalid here
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
    return _mismatch(kernel, got, reference(), dtype)


def measured_objective(target: Target, kernel: str, shape: dict, dtype: str
                       ) -> Callable[[KernelConfig], tuple[float | None, str]]:
    """Objective for search.trial_objective: inputs made once, each config checked then timed (median us)."""
    run, reference = make_case(kernel, shape, dtype, "cuda")
    expected = reference()

    def evaluate(config: KernelConfig) -> tuple[float | None, str]:
        try:
            got = run(config)
            torch.cuda.synchronize()
        except Exception as exc:
            return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        wrong = _mismatch(kernel, got, expected, dtype)
        if wrong:
            return None, wrong
        return triton.testing.do_bench(lambda: run(config), warmup=25, rep=100, return_mode="median") * 1e3, "ok"

    return evaluate
