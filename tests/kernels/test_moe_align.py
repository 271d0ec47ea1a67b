"""kernels/moe_align.py: grouping (token, expert) pairs by expert with tile padding, against the reference."""

from __future__ import annotations

import pytest
import torch

from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.moe_align import moe_align, moe_align_reference

SMALL = KernelConfig("moe_align", {"BLOCK_PAIRS": 16}, num_warps=2, num_stages=1)


def _random_ids(t, k, e, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randperm(e, generator=g)[:k] for _ in range(t)])  # distinct experts per token


def _check(ids, e, block_m, config):
    got = moe_align(ids, e, block_m, config)
    ref = moe_align_reference(ids, e, block_m)
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, atol=0, rtol=0)
    sorted_ids, expert_ids, n_padded = got
    n = int(n_padded)
    assert n % block_m == 0
    real = sorted_ids[:n][sorted_ids[:n] < ids.numel()].long()
    assert sorted(real.tolist()) == list(range(ids.numel()))  # every pair exactly once
    tile_expert = expert_ids[: n // block_m].repeat_interleave(block_m)
    flat = ids.reshape(-1)
    assert (flat[real] == tile_expert[sorted_ids[:n] < ids.numel()]).all()  # each pair in its expert's tiles


@pytest.mark.parametrize("config", [SMALL, None], ids=["16 pairs", "default"])
@pytest.mark.parametrize("t,k,e,block_m", [(1, 2, 8, 16), (37, 8, 128, 16), (5, 4, 60, 64), (200, 8, 128, 64),
                                           (3, 1, 2, 16)])
def test_moe_align_matches_reference(t, k, e, block_m, config):
    _check(_random_ids(t, k, e, seed=t), e, block_m, config)


def test_moe_align_every_token_on_one_expert_and_empty_experts():
    ids = torch.zeros(45, 2, dtype=torch.int64)
    ids[:, 0] = 5  # expert 5 gets every token, expert 9 every second slot... the rest none
    ids[:, 1] = 9
    _check(ids, 16, 16, SMALL)
    _, expert_ids, n_padded = moe_align(ids, 16, 16, SMALL)
    assert int(n_padded) == 2 * 48 and expert_ids[:6].tolist() == [5, 5, 5, 9, 9, 9]
    assert (expert_ids[6:] == -1).all()


def test_moe_align_int32_ids_and_exact_tile_multiples():
    ids = torch.arange(64, dtype=torch.int32).reshape(32, 2) % 4  # 16 pairs per expert: no padding at all
    _check(ids, 4, 16, None)
    assert int(moe_align(ids, 4, 16)[2]) == 64
