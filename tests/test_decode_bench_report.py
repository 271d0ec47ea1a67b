"""benchmarks/decode_cpu.py's reporting on a host whose bandwidth jumps between two levels: each round is
classed by the probes around it, ratios are taken within one level, and the roofline is judged per round.
Only the arithmetic is tested here (synthetic rounds); the timings themselves are the benchmark's job."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decode_cpu  # noqa: E402

GB = 1e9
NEW = 65  # 64 decode steps after the prefill token


def summary(decode_s, before, after, bytes_per_token=int(2e9)):
    """A Runner.summary for rounds of `decode_s` seconds bracketed by probes (GB/s)."""
    r = decode_cpu.Runner("x", None)
    r.rounds = [(0.1, d, b * GB) for d, b in zip(decode_s, before)]
    r.probes_after = [a * GB for a in after]
    return r.summary(NEW, bytes_per_token)


def test_rounds_are_classed_by_both_probes_and_mixed_ones_left_out():
    e = summary([4.0, 2.0, 3.0], before=[33, 60, 60], after=[34, 62, 33])
    modes = decode_cpu.by_bandwidth_mode(e, 62 * GB, NEW)
    assert modes["rounds"] == {"slow": 1, "fast": 1, "mixed": 1}
    assert modes["slow"] == pytest.approx(64 / 4.0, abs=1e-3)
    assert modes["fast"] == pytest.approx(64 / 2.0, abs=1e-3)


def test_round_bandwidth_fraction_uses_the_higher_probe_of_each_round():
    # 64 tokens x 2 GB in 4 s = 32 GB/s: against max(33, 40) = 40 GB/s -> 0.8; median over the three rounds
    e = summary([4.0, 4.0, 4.0], before=[33, 40, 32], after=[40, 33, 32])
    assert e["decode_fraction_of_round_bandwidth_median"] == pytest.approx(0.8, abs=1e-4)


def test_ratios_within_a_level_and_none_where_an_engine_had_no_round_there():
    ours = summary([2.0, 4.0], before=[60, 33], after=[61, 33])
    theirs = summary([3.0, 5.0, 5.0], before=[33, 33, 60], after=[33, 34, 33])
    ceiling = 62 * GB
    for e in (ours, theirs):
        e["decode_tokens_per_s_median_by_bandwidth_mode"] = decode_cpu.by_bandwidth_mode(e, ceiling, NEW)
    dense = {"engines": {"ours_fp32_as_run": ours, "peer_fp32": theirs,
                         "ours_int4_as_run": ours, "peer_int4": theirs}}
    r = decode_cpu.ratios_by_mode(dense, None)
    assert set(r) == {"fp32_as_run_vs_peer_decode", "int4_as_run_vs_peer_decode"}  # no MoE model given
    # slow: ours one 4.0 s round; theirs the 3.0 and 5.0 s rounds (the third is mixed), median of their tok/s;
    # fast: theirs has no fast round
    assert r["fp32_as_run_vs_peer_decode"]["slow"] == pytest.approx((64 / 4.0) / ((64 / 3.0 + 64 / 5.0) / 2),
                                                                    abs=1e-3)
    assert r["fp32_as_run_vs_peer_decode"]["fast"] is None


def test_ratio_ceiling_is_their_bytes_over_ours_over_their_bandwidth_fraction():
    theirs = summary([4.0], before=[40], after=[40], bytes_per_token=int(2e9))  # 32 of 40 GB/s: 0.8
    ours = summary([4.0], before=[40], after=[40], bytes_per_token=int(1e9))
    moe = {"engines": {"ours_moe_fp32_as_run": ours, "transformers_eager": theirs}}
    ceilings = decode_cpu.ratio_ceilings(None, moe)
    assert ceilings == {"moe_as_run_vs_transformers_decode": pytest.approx(2 / 0.8, abs=1e-3)}


def test_moe_presets_skip_the_peer():
    assert decode_cpu.is_moe("qwen3-30b-a3b:num_hidden_layers=2")
    assert decode_cpu.is_moe("qwen3-235b-a22b")
    assert decode_cpu.is_moe("tiny-moe")
    assert not decode_cpu.is_moe("qwen3-0.6b")
