"""The `kernels` backend: the cross-compiled Triton pack for a GPU arch, its loader and its checks.

The tuned configs it packs are compared with the shipped tables read independently (plain json), the
resources with a fresh cuobjdump of the packed cubins, and the model with the pack's configs runs through
Triton's interpreter against eager PyTorch. Launching the cubins needs a CUDA GPU of the arch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from qwen3export.autotune.tables import SHIPPED_DIR
from qwen3export.backends.kernel_pack import PACK_INDEX, emit_kernel_pack, load_kernel_pack, pack_dtype
from qwen3export.errors import TargetError
from qwen3export.kernels.config import KernelConfig
from qwen3export.model import ModelRef
from qwen3export.spec import preset
from qwen3export.targets import get_target
from qwen3export.verify import verify_kernel_pack


def _pack(spec, target: str, folder: Path):
    (folder / "kernels").mkdir(parents=True)
    return emit_kernel_pack(spec, get_target(target), "fp32", folder)


@pytest.fixture(scope="module")
def dense_pack(tmp_path_factory):
    """qwen3-0.6b's kernels for h100: every kernel has a shipped, modelled table."""
    folder = tmp_path_factory.mktemp("pack-0.6b")
    return folder, _pack(preset("qwen3-0.6b"), "h100", folder)


@pytest.fixture(scope="module")
def moe_pack(tmp_path_factory):
    """tiny-moe for a100: no table has tiny-moe's shapes, so every kernel runs its default config."""
    folder = tmp_path_factory.mktemp("pack-tiny-moe")
    return folder, _pack(preset("tiny-moe"), "a100", folder)


def test_pack_uses_the_shipped_tables_with_their_tags(dense_pack):
    folder, entry = dense_pack
    assert entry["arch"] == "sm_90" and entry["dtype"] == "bf16" and entry["sources"] == ["modelled"]
    index = json.loads((folder / PACK_INDEX).read_text())
    assert {e["kernel"] for e in index["selection"]} == {"rms_norm", "qk_norm_rope", "attention_prefill",
                                                        "attention_decode"}
    for e in index["selection"]:
        table = json.loads((SHIPPED_DIR / e["table"]).read_text())  # the table as tune wrote it
        assert sorted(e["configs"]) == sorted(table["entries"])
        for bucket, chosen in e["configs"].items():
            want = table["entries"][bucket]
            assert chosen["source"] == want["source"] == "modelled"
            config = KernelConfig.from_dict(chosen["config"])
            assert config.num_warps == want["num_warps"] and config.num_stages == want["num_stages"]
            assert all(want[k] == v for k, v in config.constexprs.items())
    packed = {(f["kernel"], f["config"]) for f in index["functions"]}
    for e in index["selection"]:  # every selected config is in the pack
        for chosen in e["configs"].values():
            assert (e["kernel"], KernelConfig.from_dict(chosen["config"]).label) in packed


def test_packed_cubins_are_what_the_index_says(dense_pack):
    import subprocess

    from qwen3export.kernels.compile import cuobjdump_path, parse_resource_usage

    folder, _ = dense_pack
    index = json.loads((folder / PACK_INDEX).read_text())
    pack = load_kernel_pack(folder)
    assert len(pack.compiled) == len(index["functions"])
    for f in index["functions"]:
        compiled = pack.compiled[(f["kernel"], f["config"], f["variant"])]
        cubin = folder / next(p for p in f["files"] if p.endswith(".cubin"))
        assert compiled.asm["cubin"] == cubin.read_bytes()
        assert compiled.metadata.target.arch == 90 and compiled.metadata.num_warps == f["num_warps"]
        assert compiled.metadata.num_warps == f["config_dict"]["num_warps"] or f["kernel"] == "attention_decode"
        out = subprocess.run([cuobjdump_path(), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                             check=True).stdout
        usage = parse_resource_usage(out)[f["name"]]
        assert usage["registers"] == f["registers"] and usage["stack"] == f["spill_bytes"] == 0
        assert f["valid"] and f["registers"] <= 255
        assert any(p.endswith(".ptx") for p in f["files"]) and any(p.endswith(".json") for p in f["files"])


def test_model_constants_are_compiled_in(dense_pack):
    """The pack is specialised to the model: attention's BLOCK_D is qwen3-0.6b's head_dim, not a default."""
    folder, _ = dense_pack
    index = json.loads((folder / PACK_INDEX).read_text())
    decode = [f for f in index["functions"] if f["kernel"] == "attention_decode" and "split" in f["name"]]
    consts = {s["name"]: s.get("value") for s in decode[0]["signature"] if s["kind"] == "constexpr"}
    spec = preset("qwen3-0.6b")
    assert consts["BLOCK_D"] == spec.head_dim
    assert consts["BLOCK_H"] >= spec.num_attention_heads // spec.num_key_value_heads


def test_untuned_model_gets_defaults_tagged_default_and_passes_the_interpreter(moe_pack):
    folder, entry = moe_pack
    assert entry["sources"] == ["default"]
    index = json.loads((folder / PACK_INDEX).read_text())
    assert all(e["tune"].startswith("qwen3export tune --target a100") for e in index["selection"])
    assert {e["kernel"] for e in index["selection"]} >= {"moe_routing", "moe_align", "fused_moe"}
    manifest = {"model": {"ref": ModelRef("preset", "tiny-moe").to_dict(), "spec": preset("tiny-moe").to_dict()},
                "dtype": "fp32"}
    report = verify_kernel_pack(folder, manifest)
    assert report["passed"], report["failures"]
    assert report["interpreter"]["passed"] and report["interpreter"]["greedy_tokens_matching"] == \
        report["interpreter"]["new_tokens"]


def test_a_tampered_cubin_fails_verification(moe_pack, tmp_path):
    import shutil

    folder, _ = moe_pack
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)
    index = json.loads((copy / PACK_INDEX).read_text())
    f = index["functions"][0]
    f["registers"] += 1  # the report no longer matches the cubin
    (copy / PACK_INDEX).write_text(json.dumps(index))
    manifest = {"model": {"ref": ModelRef("preset", "qwen3-0.6b").to_dict(), "spec": preset("qwen3-0.6b").to_dict()}}
    report = verify_kernel_pack(copy, manifest)  # 0.6b: too big for the interpreter check, structural only
    assert not report["passed"] and "cubin resources differ" in report["failures"][0]
    assert report["interpreter"]["passed"] is None and "not_run" in report["interpreter"]


def test_cpu_target_and_launch_without_gpu_are_refused(moe_pack, tmp_path):
    with pytest.raises(TargetError, match="GPU arch"):
        emit_kernel_pack(preset("tiny"), get_target("cpu"), "fp32", tmp_path)
    assert pack_dtype(get_target("a100"), "fp32") == "bf16" and pack_dtype(get_target("a100"), "fp16") == "fp16"
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: the refusal below is for machines without one")
    pack = load_kernel_pack(moe_pack[0])
    kernel, label, variant = next(iter(pack.compiled))
    with pytest.raises(TargetError, match="needs a CUDA GPU"):
        pack.launch(kernel, label, variant, (1, 1, 1))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="launching packed cubins needs a CUDA GPU")
def test_packed_rms_norm_launches_on_the_gpu(tmp_path):  # pragma: no cover - GPU only
    from qwen3export.kernels.rms_norm import rms_norm_reference

    cc = "%d%d" % torch.cuda.get_device_capability()
    target = next((t for t in ("a100", "a10g", "l4", "h100") if get_target(t).arch == f"sm_{cc}"), None)
    if target is None:
        pytest.skip(f"no target has this GPU's arch sm_{cc}")
    spec = preset("tiny")
    _pack(spec, target, tmp_path)
    pack = load_kernel_pack(tmp_path)
    f = next(f for f in pack.index["functions"] if f["kernel"] == "rms_norm" and f["index"] == 0)
    rows, n = 5, spec.hidden_size
    x = torch.randn(rows, n, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    out = torch.empty_like(x)
    given = {"x_ptr": x, "residual_ptr": x, "weight_ptr": w, "out_ptr": out, "sum_ptr": out, "n_rows": rows,
             "n_cols": n, "eps": 1e-6, "stride_x_row": n, "stride_residual_row": n, "stride_out_row": n,
             "stride_sum_row": n}
    args = [given[s["name"]] if s["kind"] != "constexpr" else s["value"] for s in f["signature"]]
    block_rows = KernelConfig.from_dict(f["config_dict"])["BLOCK_ROWS"]
    pack.launch("rms_norm", f["config"], f["variant"], ((rows + block_rows - 1) // block_rows, 1, 1), *args)
    torch.cuda.synchronize()
    want = rms_norm_reference(x, w, 1e-6)
    assert (out.float() - want.float()).abs().max().item() <= 2e-2
