"""kernels/ops.py quantized ops (wq_linear, wq_moe, fp8_linear): opcheck on both CPU paths (reference and
interpreted Triton), the two paths agree, and they export through torch.export with the weights as inputs."""

from __future__ import annotations

import pytest
import torch

from qwen3export.kernels import ops  # noqa: F401  (registers the ops)
from qwen3export.kernels.launch import INTERPRET_ENV
from qwen3export.quant_format import QuantizedWeight, dequantize, quantize_weight

OPS = torch.ops.qwen3export


def _linear_args(mode="int4", zero_points=False):
    g = torch.Generator().manual_seed(0)
    qw = quantize_weight(torch.randn(48, 64, generator=g) * 0.1, mode, 32, scale_dtype=torch.float32)
    zeros = (torch.full(qw.scales.shape, 2 ** (qw.bits - 1) - 1, dtype=torch.uint8) if zero_points else None)
    return (torch.randn(2, 3, 64, generator=g), qw.qweight, qw.scales, zeros, qw.bits, qw.group_size)


def _moe_args(mode="int4"):
    g = torch.Generator().manual_seed(1)
    gu = quantize_weight(torch.randn(8, 32, 32, generator=g) * 0.2, mode, 16, scale_dtype=torch.float32)
    dn = quantize_weight(torch.randn(8, 32, 16, generator=g) * 0.2, mode, 16, scale_dtype=torch.float32)
    return (torch.randn(2, 3, 32, generator=g), torch.randn(8, 32, generator=g), gu.qweight, gu.scales, None,
            dn.qweight, dn.scales, None, gu.bits, 2, True)


def _fp8_args():
    g = torch.Generator().manual_seed(2)
    qw = quantize_weight(torch.randn(40, 64, generator=g), "fp8")
    return (torch.randn(5, 64, generator=g), qw.qweight, qw.scales)


CASES = {
    "wq_linear_int4": (OPS.wq_linear.default, _linear_args),
    "wq_linear_int8_zp": (OPS.wq_linear.default, lambda: _linear_args("int8", True)),
    "wq_moe_int4": (OPS.wq_moe.default, _moe_args),
    "wq_moe_int8": (OPS.wq_moe.default, lambda: _moe_args("int8")),
    "fp8_linear": (OPS.fp8_linear.default, _fp8_args),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["reference", "interpreted"])
def test_opcheck(name, path, monkeypatch):
    if path == "interpreted":
        monkeypatch.setenv(INTERPRET_ENV, "1")
    op, make_args = CASES[name]
    # opcheck's test_schema compares inputs before/after with an op that has no CPU float8 kernel
    # ("mul_cpu_reduced_float" not implemented for 'Float8_e4m3fn'); the other checks run for fp8 too
    skip = ("test_schema",) if name.startswith("fp8") else ()
    utils = tuple(u for u in ("test_schema", "test_autograd_registration", "test_faketensor",
                              "test_aot_dispatch_dynamic") if u not in skip)
    torch.library.opcheck(op, make_args(), test_utils=utils)


@pytest.mark.parametrize("name", list(CASES))
def test_paths_agree(name, monkeypatch):
    op, make_args = CASES[name]
    reference = op(*make_args())
    monkeypatch.setenv(INTERPRET_ENV, "1")
    torch.testing.assert_close(op(*make_args()), reference, atol=1e-4, rtol=1e-4)


def test_wq_linear_is_the_dequantized_linear_and_exports():
    x, qweight, scales, zeros, bits, group = _linear_args()
    weight = dequantize(QuantizedWeight("int4", qweight, scales, zeros, group))
    torch.testing.assert_close(OPS.wq_linear(x, qweight, scales, zeros, bits, group), x @ weight.t())

    class Linear(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("qweight", qweight)
            self.register_buffer("scales", scales)

        def forward(self, x):
            return OPS.wq_linear(x, self.qweight, self.scales, None, bits, group)

    ep = torch.export.export(Linear(), (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert OPS.wq_linear.default in targets
    torch.testing.assert_close(ep.module()(x), x @ weight.t())
