"""`qwen3export plan`: weight/KV/workspace figures per rank from the spec alone, and bad parallelism."""

from __future__ import annotations

import json

import pytest

from qwen3export.cli import main
from qwen3export.errors import InputError
from qwen3export.memory_plan import PlanOptions, memory_plan
from qwen3export.spec import preset

GiB = 1024**3


@pytest.mark.parametrize("name", ["qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-235b-a22b"])
def test_unsharded_unquantized_weights_equal_parameter_bytes(name):
    spec = preset(name)
    p = memory_plan(spec, 80 * GiB, PlanOptions(dtype="bf16"))
    assert p["per_rank"]["weight_bytes"] == 2 * spec.param_count()


def test_kv_cache_bytes_match_the_cache_tensors():
    spec = preset("qwen3-8b")  # 36 layers, 8 KV heads, head_dim 128
    p = memory_plan(spec, 80 * GiB, PlanOptions(dtype="bf16", max_batch=4, max_seq=32768))
    assert p["per_rank"]["kv_cache_bytes_per_token"] == 2 * 36 * 8 * 128 * 2
    assert p["per_rank"]["kv_cache_bytes"] == 4 * 32768 * 2 * 36 * 8 * 128 * 2


def test_235b_bf16_does_not_fit_one_80gb_gpu_and_int4_tp4_shards():
    spec = preset("qwen3-235b-a22b")
    one = memory_plan(spec, 80 * 10**9, PlanOptions(dtype="bf16", max_seq=32768))
    assert not one["fits"] and one["headroom_bytes"] < -370 * GiB  # 470 GB of weights vs 72 GB usable
    four = memory_plan(spec, 80 * 10**9, PlanOptions(dtype="bf16", quant="int4", tp=4, max_seq=32768))
    assert four["ranks"] == 4
    # int4 weights are ~1/4 of bf16, split 4 ways: ~1/16 of the unsharded bf16 bytes, plus scales and
    # the unquantized embedding/lm_head
    ratio = four["per_rank"]["weight_bytes"] / one["per_rank"]["weight_bytes"]
    assert 1 / 16 < ratio < 1 / 12
    assert four["per_rank"]["kv_cache_bytes_per_token"] * 4 == one["per_rank"]["kv_cache_bytes_per_token"]


def test_expert_parallel_divides_experts_only():
    spec = preset("qwen3-30b-a3b")
    base = memory_plan(spec, 80 * GiB, PlanOptions())["per_rank"]["weight_bytes"]
    ep4 = memory_plan(spec, 80 * GiB, PlanOptions(ep=4))["per_rank"]["weight_bytes"]
    expert_bytes = 48 * 128 * 3 * 2048 * 768 * 2
    assert base - ep4 == expert_bytes * 3 // 4


@pytest.mark.parametrize("opts,needle", [
    (PlanOptions(tp=3), "--tp 3 does not divide num_attention_heads"),
    (PlanOptions(tp=8), "--tp 8 does not divide num_key_value_heads (4)"),
    (PlanOptions(ep=5), "--ep 5 does not divide num_experts (128)"),
    (PlanOptions(quant="int3"), "unknown --quant 'int3'"),
    (PlanOptions(max_seq=10**6), "--max-seq 1000000 must be in 1..40960"),
])
def test_bad_plan_options(opts, needle):
    with pytest.raises(InputError) as e:
        memory_plan(preset("qwen3-30b-a3b"), 80 * GiB, opts)
    assert needle in str(e.value)


def test_cli_plan_json_and_errors(capsys):
    assert main(["plan", "--model", "qwen3-235b-a22b", "--target", "cpu", "--quant", "int4", "--tp", "4",
                 "--json"]) == 0
    p = json.loads(capsys.readouterr().out)
    assert p["ranks"] == 4 and p["per_rank"]["weight_bytes"] > 0 and "modelled" in p["assumptions"]
    assert main(["plan", "--model", "qwen3-0.6b", "--ep", "2"]) == 2
    assert "needs a mixture-of-experts model" in capsys.readouterr().err
