"""kernels/ops.py: the qwen3export:: custom ops pass opcheck on both CPU paths (reference and interpreted
Triton), agree with each other, export through torch.export, and the moe op is the graph's MoE block."""

from __future__ import annotations

import pytest
import torch

from qwen3export.graphs.decoder import SparseMoeBlock
from qwen3export.kernels import ops  # noqa: F401  (registers the ops)
from qwen3export.kernels.launch import INTERPRET_ENV
from qwen3export.spec import preset

OPS = torch.ops.qwen3export


def _attention_args(s, length, mask=True, lens=False):
    g = torch.Generator().manual_seed(s)
    q = torch.randn(2, 4, s, 64, generator=g)
    k, v = torch.randn(2, 2, length, 64, generator=g), torch.randn(2, 2, length, 64, generator=g)
    attention_mask = torch.ones(2, length, dtype=torch.int64)
    attention_mask[1, :3] = 0
    kv_lens = torch.tensor([length, length - 2]) if lens else None
    return (q, k, v, attention_mask if mask else None, kv_lens, 0.125)


def _moe_args(t=6, h=32, i=16, e=8):
    g = torch.Generator().manual_seed(t)
    return (torch.randn(2, t // 2, h, generator=g), torch.randn(e, h, generator=g),
            torch.randn(e, 2 * i, h, generator=g) * 0.2, torch.randn(e, h, i, generator=g) * 0.2, 2, True)


def _qk_args():
    g = torch.Generator().manual_seed(0)
    cos, sin = torch.rand(2, 3, 64, generator=g), torch.rand(2, 3, 64, generator=g)
    return (torch.randn(2, 3, 4, 64, generator=g), torch.randn(2, 3, 2, 64, generator=g), torch.rand(64) + 0.5,
            torch.rand(64) + 0.5, cos, sin, 1e-6)


CASES = {
    "rms_norm": (OPS.rms_norm.default, lambda: (torch.randn(3, 5, 48), torch.rand(48) + 0.5, 1e-6)),
    "add_rms_norm": (OPS.add_rms_norm.default,
                     lambda: (torch.randn(3, 48), torch.randn(3, 48), torch.rand(48) + 0.5, 1e-6)),
    "qk_norm_rope": (OPS.qk_norm_rope.default, _qk_args),
    "attention_prefill": (OPS.attention.default, lambda: _attention_args(5, 9)),
    "attention_decode": (OPS.attention.default, lambda: _attention_args(1, 9, lens=True)),
    "attention_nomask": (OPS.attention.default, lambda: _attention_args(4, 4, mask=False)),
    "moe": (OPS.moe.default, _moe_args),
}


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("path", ["reference", "interpreted"])
def test_opcheck(name, path, monkeypatch):
    if path == "interpreted":
        monkeypatch.setenv(INTERPRET_ENV, "1")
    op, make_args = CASES[name]
    torch.library.opcheck(op, make_args())


@pytest.mark.parametrize("name", list(CASES))
def test_interpreted_triton_matches_reference(name, monkeypatch):
    op, make_args = CASES[name]
    args = make_args()
    reference = op(*args)
    monkeypatch.setenv(INTERPRET_ENV, "1")
    triton_out = op(*args)
    for r, t in zip(reference if isinstance(reference, tuple) else (reference,),
                    triton_out if isinstance(triton_out, tuple) else (triton_out,)):
        torch.testing.assert_close(t, r, atol=2e-5, rtol=2e-5)


def test_moe_op_is_the_graph_moe_block():
    spec = preset("tiny-moe")
    block = SparseMoeBlock(spec)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in block.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    x = torch.randn(2, 5, spec.hidden_size, generator=g)
    out = OPS.moe(x, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj, spec.num_experts_per_tok,
                  spec.norm_topk_prob)
    torch.testing.assert_close(out, block(x).detach(), atol=1e-5, rtol=1e-5)


def test_ops_survive_torch_export():
    class Layer(torch.nn.Module):
        def forward(self, x, residual, w, q, k, v, mask):
            normed, total = OPS.add_rms_norm(x, residual, w, 1e-6)
            return OPS.attention(q, k, v, mask, None, 0.125), OPS.rms_norm(normed, w, 1e-6), total

    x, residual, w = torch.randn(2, 3, 48), torch.randn(2, 3, 48), torch.rand(48)
    q, k, v, mask, _, _ = _attention_args(3, 7)
    args = (x, residual, w, q, k, v, mask)
    exported = torch.export.export(Layer(), args)
    targets = {str(n.target) for n in exported.graph.nodes if n.op == "call_function"}
    assert {"qwen3export.add_rms_norm.default", "qwen3export.attention.default",
            "qwen3export.rms_norm.default"} <= targets
    for got, want in zip(exported.module()(*args), Layer()(*args)):
        torch.testing.assert_close(got, want)
