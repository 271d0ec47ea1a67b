"""kernels/selected_configs.py: the tuned configs a build activates reach the custom ops' launchers, by nearest bucket."""

from __future__ import annotations

import torch

import qwen3export
from qwen3export.kernels.selected_configs import selected_config, use_selected_configs
from qwen3export.kernels.config import KernelConfig


def _rms(rows: int) -> KernelConfig:
    return KernelConfig("rms_norm", {"BLOCK_ROWS": rows}, num_warps=2, num_stages=1)


def test_nearest_bucket_and_default():
    selection = {"rms_norm": {"M=1": _rms(1), "M=64": _rms(2), "M=4096": _rms(4)}}
    assert selected_config("rms_norm", M=3) is None  # nothing active: the kernel's default
    with use_selected_configs(selection):
        assert selected_config("rms_norm", M=1) == _rms(1)
        assert selected_config("rms_norm", M=40) == _rms(2)
        assert selected_config("rms_norm", M=100_000) == _rms(4)
        assert selected_config("fused_moe", M=8) is None  # not selected
        with use_selected_configs({"rms_norm": {"*": _rms(4)}}):
            assert selected_config("rms_norm", M=1) == _rms(4)
        assert selected_config("rms_norm", M=1) == _rms(1)
    assert selected_config("rms_norm", M=1) is None


def test_ops_launch_with_the_active_configs(monkeypatch):
    import qwen3export.kernels.ops as ops

    seen = []
    real = ops.rms_norm
    real_add = ops.add_rms_norm

    def spy(x, w, eps, config=None):
        seen.append(config)
        return real(x, w, eps, config)

    def spy_add(x, r, w, eps, config=None):
        seen.append(config)
        return real_add(x, r, w, eps, config)

    monkeypatch.setattr(ops, "rms_norm", spy)
    monkeypatch.setattr(ops, "add_rms_norm", spy_add)
    monkeypatch.setenv("QWEN3EXPORT_TRITON_INTERPRET", "1")
    model = qwen3export.load_model("tiny").use_custom_ops()
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        base = model(ids, torch.arange(5)[None], torch.ones_like(ids), model.empty_cache(1))[0]
        assert seen and all(c is None for c in seen)
        seen.clear()
        with use_selected_configs({"rms_norm": {"M=1": _rms(1), "M=4": _rms(4)}}):
            tuned = model(ids, torch.arange(5)[None], torch.ones_like(ids), model.empty_cache(1))[0]
    assert seen and all(c == _rms(4) for c in seen)  # 5 tokens: bucket M=4
    assert (tuned - base).abs().max().item() <= 1e-5
