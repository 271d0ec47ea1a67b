"""kernels/moe_routing.py: router GEMM + softmax + top-k (interpreted on CPU) against the reference."""

from __future__ import annotations

import pytest
import torch

from qwen3export.graphs.decoder import router_topk as graph_routing
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.moe_routing import moe_routing, moe_routing_reference

# bf16 is absent: the router logits come from tl.dot, which returns garbage on bf16 operands in the
# Triton 3.9 interpreter (DESIGN.md §5); test_compile.py compiles the bf16 specialisation.
DTYPES = [(torch.float32, 1e-6, 1e-5), (torch.float16, 1e-3, 1e-3)]
# (T, H, E, k): one token, Qwen3's 128 experts / top-8, 60 experts (not a power of two), k = E, top-1
# hidden 80 / 136 / 72 with 6 experts (the hidden loop's last BLOCK_H step masked)
SHAPES = [(1, 64, 8, 2), (37, 96, 128, 8), (5, 32, 60, 4), (20, 48, 16, 16), (3, 16, 4, 1), (9, 80, 6, 2),
          (4, 136, 6, 2), (17, 72, 60, 4)]
SMALL = KernelConfig("moe_routing", {"BLOCK_T": 16, "BLOCK_H": 32}, num_warps=4, num_stages=1)


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", DTYPES)
def test_moe_routing_matches_reference(shape, dtype, atol, rtol, norm):
    t, h, e, k = shape
    g = torch.Generator().manual_seed(t + e)
    x = torch.randn(t, h, generator=g).to(dtype)
    router = (0.5 * torch.randn(e, h, generator=g)).to(dtype)
    weights, ids = moe_routing(x, router, k, norm, SMALL)
    ref_w, ref_i = moe_routing_reference(x, router, k, norm)
    assert ids.dtype == torch.int64 and weights.dtype == dtype
    torch.testing.assert_close(ids, ref_i, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_w, atol=atol, rtol=rtol)


def test_reference_is_the_graph_routing_without_ties():
    g = torch.Generator().manual_seed(1)
    x, router = torch.randn(50, 64, generator=g), torch.randn(128, 64, generator=g)
    for norm in (True, False):
        ours, graph = moe_routing_reference(x, router, 8, norm), graph_routing(x, router, 8, norm)
        torch.testing.assert_close(ours, graph, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_moe_routing_ties_go_to_the_lowest_expert_id(dtype):
    """Entries of x and the router are multiples of 1/2 with small sums, so every logit is exact whatever
    the summation order and duplicated router rows tie bit for bit in kernel and reference."""
    g = torch.Generator().manual_seed(2)
    e, h, k = 12, 32, 4
    router = torch.randint(-1, 2, (e, h), generator=g).float() * 0.5
    router[7] = router[2]  # experts 2, 7 and 9 always tie
    router[9] = router[2]
    router[4] = 0.0  # an all-zero row ties with every expert whose logit is 0
    x = torch.randint(-1, 2, (16, h), generator=g).float()
    x[0] = 0.0  # a zero token (padding): every logit 0, all 12 experts tie, ids must be 0..3
    x, router = x.to(dtype), router.to(dtype)
    weights, ids = moe_routing(x, router, k, True, SMALL)
    ref_w, ref_i = moe_routing_reference(x, router, k, True)
    torch.testing.assert_close(ids, ref_i, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_w, atol=1e-3, rtol=1e-3)
    assert ids[0].tolist() == [0, 1, 2, 3]
    assert any(2 in row and 7 in row and row.tolist().index(2) < row.tolist().index(7) for row in ids)


def test_moe_routing_default_config_many_tokens():
    g = torch.Generator().manual_seed(3)
    x, router = torch.randn(70, 128, generator=g), torch.randn(64, 128, generator=g)
    weights, ids = moe_routing(x, router, 8, False)
    ref_w, ref_i = moe_routing_reference(x, router, 8, False)
    torch.testing.assert_close(ids, ref_i, atol=0, rtol=0)
    torch.testing.assert_close(weights, ref_w, atol=1e-6, rtol=1e-5)
