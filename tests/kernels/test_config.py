"""kernels/config.py: KernelConfig normalisation and JSON round-trip, the arch limits table, and every
kernel's config space against it."""

from __future__ import annotations

import pytest

from qwen3export.errors import ConfigError, TargetError
from qwen3export.kernels.compile import KERNELS, kernel_module, supports
from qwen3export.kernels.config import ARCH_LIMITS, KernelConfig, arch_limits, divisibility_hints


def test_kernel_config_sorts_round_trips_and_hashes():
    a = KernelConfig("fused_moe", {"BLOCK_N": 64, "BLOCK_M": 16}, num_warps=4, num_stages=3, meta={"GROUP_SIZE_M": 8})
    b = KernelConfig.from_json(a.to_json())
    assert a == b and hash(a) == hash(b)
    assert a.blocks == (("BLOCK_M", 16), ("BLOCK_N", 64)) and a["GROUP_SIZE_M"] == 8
    assert a.label == "BLOCK_M=16,BLOCK_N=64,GROUP_SIZE_M=8,w4,s3"
    assert KernelConfig.from_dict(a.to_dict()) == a


@pytest.mark.parametrize("bad", [dict(num_warps=3), dict(num_stages=0), dict(blocks={"BLOCK_M": 0}),
                                 dict(blocks={"X": 1}, meta={"X": 2}), dict(blocks={"BLOCK_M": True})])
def test_kernel_config_rejects_nonsense(bad):
    with pytest.raises(ConfigError):
        KernelConfig("rms_norm", **bad)


def test_kernel_config_missing_key_names_what_it_has():
    with pytest.raises(ConfigError, match="BLOCK_ROWS"):
        KernelConfig("rms_norm", {"BLOCK_ROWS": 1})["BLOCK_M"]


def test_arch_limits_spellings_and_table():
    assert arch_limits("sm_86") is arch_limits(86) is arch_limits("8.6") is arch_limits("sm86")
    assert arch_limits(80).max_shared_per_block == 163 * 1024 and arch_limits(90).max_shared_per_block == 227 * 1024
    assert arch_limits("sm_89").max_shared_per_block == 99 * 1024
    # 255 registers x 256 threads rounds to 8 warps x 8192 = 65536: exactly the block limit
    assert arch_limits(80).block_registers(255, 8) == 65536
    with pytest.raises(TargetError):
        arch_limits("sm_75")


@pytest.mark.parametrize("name", KERNELS)
def test_config_space_keeps_the_default_on_every_arch(name):
    module = kernel_module(name)
    assert module.DEFAULT_CONFIG in module.CONFIG_SPACE
    assert all(c.kernel == name for c in module.CONFIG_SPACE)
    assert len(set(module.CONFIG_SPACE)) == len(module.CONFIG_SPACE)
    for limits in ARCH_LIMITS.values():
        assert module.keep(module.DEFAULT_CONFIG, limits) == supports(name, limits)


def test_divisibility_hints_promise_only_what_the_value_is():
    """16 for multiples of 16 (and 0, a broadcast stride), else the largest power of two 2..8 dividing it."""
    hints = divisibility_hints({"a": 4096, "b": 72, "c": 24, "d": 20, "e": 10, "f": 7, "g": 0, "h": 136})
    assert hints == {"aligned": ("a", "g"), "divisible": {"b": 8, "c": 8, "d": 4, "e": 2, "h": 8}}
