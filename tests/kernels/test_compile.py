"""kernels/compile.py: every kernel's DEFAULT_CONFIG cross-compiles for sm_80/86/89/90 (fp16 and bf16) with
no spills and within the arch's limits, and a config that spills or overflows shared memory is rejected.

No GPU is needed: triton.compile targets GPUTarget("cuda", cc, 32) and the bundled cuobjdump reads the cubin.
Measured on 2 shared cores: 106 specialisations, 1-2 s each, ~95 s with 2 compile workers.
"""

from __future__ import annotations

import pytest

from qwen3export.errors import TargetError
from qwen3export.kernels.compile import (KERNELS, compile_report, kernels_for_arch, parse_resource_usage, summary,
                                         valid_configs)
from qwen3export.kernels.config import ARCH_LIMITS, KernelConfig

ARCHS = list(ARCH_LIMITS)


@pytest.fixture(scope="session")
def compile_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("kernel-compile")


def test_parse_resource_usage():
    text = ("\nResource usage:\n Common:\n  GLOBAL:0\n Function _mm:\n  REG:86 STACK:24 SHARED:0 LOCAL:8 "
            "CONSTANT[0]:408 TEXTURE:0 SURFACE:0 SAMPLER:0\n")
    assert parse_resource_usage(text) == {"_mm": {"registers": 86, "stack": 24, "shared": 0, "local": 8}}


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
@pytest.mark.parametrize("arch", ARCHS)
def test_default_configs_compile_without_spills(arch, dtype, compile_cache):
    records = compile_report(arch, dtype=dtype, configs="default", cache_dir=compile_cache, workers=2)
    assert {r["kernel"] for r in records} == set(kernels_for_arch(arch))
    bad = [(r["kernel"], r["function"], r["shape"], r["reason"]) for r in records if not r["valid"]]
    assert not bad, f"default configs rejected on {arch}: {bad}"
    assert all(r["spill_bytes"] == 0 and r["registers"] <= 255 for r in records)
    assert all(labels for labels in valid_configs(records).values())  # >= 1 valid config per kernel
    table = summary(records)
    assert all(row["valid"] == row["configs"] == 1 and row["default_records"] for row in table.values())


def test_oversized_config_is_rejected_and_cache_is_reused(compile_cache):
    huge = KernelConfig("attention_prefill", {"BLOCK_M": 128, "BLOCK_N": 128}, num_warps=4, num_stages=3)
    first = compile_report("sm_86", ["attention_prefill"], configs=[huge], cache_dir=compile_cache)
    head_128 = next(r for r in first if r["shape"].startswith("head_dim=128"))
    assert not head_128["valid"] and "spills" in head_128["reason"] and "shared" in head_128["reason"]
    again = compile_report("sm_86", ["attention_prefill"], configs=[huge], cache_dir=compile_cache)
    assert all(r["cached"] for r in again)
    assert [r["registers"] for r in again] == [r["registers"] for r in first]


def test_fp8_kernel_is_for_sm89_and_sm90_only():
    assert [a for a in ARCHS if "fp8_matmul" in kernels_for_arch(a)] == ["sm_89", "sm_90"]
    assert set(kernels_for_arch("sm_90")) == set(KERNELS)
    with pytest.raises(TargetError, match="fp8_matmul runs only on sm_89, sm_90, not sm_86"):
        compile_report("sm_86", ["fp8_matmul"], configs="default")
