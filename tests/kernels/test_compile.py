"""kernels/compile.py: every kernel's DEFAULT_CONFIG cross-compiles for sm_80/86/89/90 (fp16 and bf16) with
no spills and within the arch's limits, and a config that spills or overflows shared memory is rejected.

No GPU is needed: triton.compile targets GPUTarget("cuda", cc, 32) and the bundled cuobjdump reads the cubin.
Measured on 2 shared cores: 106 specialisations, 1-2 s each, ~95 s with 2 compile workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from qwen3export.errors import TargetError
from qwen3export.kernels.compile import (KERNELS, ast_source, compile_report, kernel_module, kernels_for_arch,
                                         parse_resource_usage, compile_summary, valid_configs, verdict)
from qwen3export.kernels.config import ARCH_LIMITS, KernelConfig
from qwen3export.kernels.launch import INTERPRET_ENV

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
    table = compile_summary(records)
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


# The failing Qwen3-MoE checkpoint's head_dim 24 and a hidden size of 72 (a multiple of 8, not 16), as the kernel
# pack compiles them (qwen3export/backends/kernel_pack.py compile_shape): (kernel, shape, padded blocks)
ODD_SHAPES = [("attention_prefill", {"head_dim": 24}, {"BLOCK_D": 32}),
              ("attention_decode", {"head_dim": 24, "group": 2}, {"BLOCK_D": 32, "BLOCK_H": 16}),
              ("qk_norm_rope", {"head_dim": 24}, {"BLOCK_HALF": 16}),
              ("rms_norm", {"hidden": 72}, {"BLOCK_N": 128}),
              ("moe_routing", {"hidden": 72, "experts": 6, "top_k": 2, "normalize": True}, {"BLOCK_E": 16}),
              ("fused_moe", {"hidden": 72, "inter": 40}, {})]


def _odd_specs():
    return [(kernel, shape, index, spec) for kernel, shape, _ in ODD_SHAPES
            for index, spec in enumerate(kernel_module(kernel).compile_specs(kernel_module(kernel).DEFAULT_CONFIG,
                                                                             "bf16", shape))]


def test_odd_shapes_get_padded_blocks_and_only_true_divisibility_hints():
    """BLOCK_D / BLOCK_N are the launchers' next power of two (tl.arange needs one), and no argument is hinted
    a multiple of 16 that is not: 24 and 72 and every stride made of them are hinted 8."""
    blocks = {kernel: expected for kernel, _, expected in ODD_SHAPES}
    specs = _odd_specs()
    for kernel, expected in blocks.items():  # each padded block in every function of the kernel that takes it
        compiled = [{k: v for k, v in spec.constexprs.items() if k in expected} for name, _, _, spec in specs
                    if name == kernel]
        assert all(c.items() <= expected.items() for c in compiled)
        assert {k for c in compiled for k in c} == set(expected)
    for kernel, shape, _, spec in specs:
        hinted = set(spec.aligned) | set(spec.divisible)
        if kernel == "fused_moe":  # act's padded rows (act_row_stride) and the weights' expert strides are
            assert {"stride_ap", "stride_ge"} & hinted <= set(spec.aligned)  # multiples of 16 here
            assert {k: v for k, v in spec.divisible.items() if k in ("hidden", "inter")} == {"hidden": 8, "inter": 8}
        else:
            assert not spec.aligned and set(spec.divisible.values()) == {8}, (kernel, spec.aligned, spec.divisible)
        attrs = ast_source(spec).attrs
        assert [["tt.divisibility", 8]] in attrs.values() and all(v[0][1] in (8, 16) for v in attrs.values())


def test_odd_shapes_cross_compile_for_sm80_without_spills():
    """The odd-shape specialisations compile for sm_80 (bf16, default configs) within the arch's limits: before
    padded blocks this failed with "arange's range must be a power of 2"; with 16-hints withheld and nothing
    in their place fused_moe's gate/up kernel spilled 3256 B at hidden 72."""
    specs = _odd_specs()
    jobs = [{"kernel": kernel, "config": kernel_module(kernel).DEFAULT_CONFIG.to_dict(), "dtype": "bf16",
             "shape": shape, "index": index, "cc": 80} for kernel, shape, index, _ in specs]
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", INTERPRET_ENV)}
    done = subprocess.run([sys.executable, "-m", "qwen3export.kernels.compile"], input=json.dumps(jobs), env=env,
                          capture_output=True, text=True, check=True)
    for (kernel, shape, _, spec), measured in zip(specs, json.loads(done.stdout)):
        valid, reason = verdict(measured, spec.num_warps, ARCH_LIMITS["sm_80"])
        assert valid, (kernel, shape, reason)
