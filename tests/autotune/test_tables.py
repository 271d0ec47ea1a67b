"""autotune/tables.py: one naming function, sorted-key JSON with provenance, nearest-bucket lookup, loud failure
for a missing table, and the shipped tables cover every GPU target x the four Qwen3 shapes, small."""

from __future__ import annotations

import json

import pytest

from qwen3export.autotune import search
from qwen3export.autotune.tables import (SHIPPED_DIR, MissingTableError, config_for, config_from_params,
                                         nearest_bucket, read_table, select_configs, table_entry, table_filename,
                                         write_table)
from qwen3export.errors import ConfigError
from qwen3export.kernels.config import KernelConfig
from qwen3export.kernels.fused_moe import DEFAULT_CONFIG as MOE_DEFAULT
from qwen3export.spec import preset
from qwen3export.targets import get_target, gpu_targets

MODELS = ["qwen3-0.6b", "qwen3-8b", "qwen3-30b-a3b", "qwen3-235b-a22b"]
MOE_SHAPE = {"E": 128, "H": 2048, "I": 768, "K": 8}


def test_table_filename():
    assert table_filename("a100", "fused_moe", "bf16", {"K": 8, "E": 128, "I": 768, "H": 2048}) == \
        "a100/fused_moe,E=128,H=2048,I=768,K=8,dtype=bf16.json"


def test_write_read_round_trip_sorted_and_merged(tmp_path):
    a100 = get_target("a100")
    small = table_entry(MOE_DEFAULT, "modelled", 12.3456, 24)
    path = write_table(tmp_path, a100, "fused_moe", "bf16", MOE_SHAPE, {"M=16": small})
    write_table(tmp_path, a100, "fused_moe", "bf16", MOE_SHAPE, {"M=1024": table_entry(MOE_DEFAULT, "measured", 99, 8)})
    text = path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=1, sort_keys=True) + "\n"  # stable diffs
    assert sorted(data["entries"]) == ["M=1024", "M=16"] and data["bucket_keys"] == ["M"]
    entry = data["entries"]["M=16"]
    assert entry["source"] == "modelled" and entry["objective_us"] == 12.346 and entry["trials"] == 24
    assert {"triton", "qwen3export"} <= set(entry) and entry["BLOCK_M"] == 64 and entry["GROUP_SIZE_M"] == 8
    assert config_from_params("fused_moe", entry) == MOE_DEFAULT
    assert read_table(path) == data


def test_nearest_bucket():
    keys = ["M=1", "M=16", "M=256", "M=4096"]
    assert nearest_bucket(keys, {"M": 1}) == "M=1"
    assert nearest_bucket(keys, {"M": 3}) == "M=1"
    assert nearest_bucket(keys, {"M": 5}) == "M=16"
    assert nearest_bucket(keys, {"M": 100000}) == "M=4096"
    assert nearest_bucket(["B=1,L=1024", "B=8,L=32768", "B=32,L=8192"], {"B": 6, "L": 30000}) == "B=8,L=32768"


def test_config_for_uses_the_nearest_bucket(tmp_path):
    a100 = get_target("a100")
    other = search.kept_space("fused_moe", "sm_80")[0]
    write_table(tmp_path, a100, "fused_moe", "bf16", MOE_SHAPE,
                {"M=1": table_entry(other, "modelled", 1, 1), "M=256": table_entry(MOE_DEFAULT, "measured", 2, 1)})
    config, entry = config_for("a100", "fused_moe", "bf16", MOE_SHAPE | {"M": 200}, dirs=[tmp_path])
    assert config == MOE_DEFAULT and entry["source"] == "measured"
    assert config_for("a100", "fused_moe", "bf16", MOE_SHAPE | {"M": 2}, dirs=[tmp_path])[0] == other


def test_missing_table_fails_loudly_with_the_tune_command(tmp_path):
    with pytest.raises(MissingTableError) as err:
        config_for("a100", "fused_moe", "fp32", MOE_SHAPE | {"M": 4}, dirs=[tmp_path])
    msg = str(err.value)
    assert "a100/fused_moe,E=128,H=2048,I=768,K=8,dtype=fp32.json" in msg
    assert "qwen3export tune --target a100 --kernel fused_moe" in msg and "--dtype fp32" in msg
    with pytest.raises(MissingTableError, match="--model qwen3-30b-a3b"):
        select_configs("a100", preset("qwen3-30b-a3b"), "fp32", dirs=[tmp_path])


def test_malformed_table_is_rejected(tmp_path):
    path = write_table(tmp_path, get_target("l4"), "fused_moe", "bf16", MOE_SHAPE,
                       {"M=1": table_entry(MOE_DEFAULT, "modelled", 1, 1)})
    data = json.loads(path.read_text())
    del data["entries"]["M=1"]["source"]
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="source"):
        read_table(path)
    data["entries"]["M=1"] |= {"source": "guessed"}
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="source"):
        read_table(path)


def test_user_tables_take_precedence_over_shipped(tmp_path):
    spec = preset("qwen3-0.6b")
    shipped = select_configs("h100", spec, "bf16", dirs=[])
    assert all(item["shipped"] for item in shipped)
    write_table(tmp_path, get_target("h100"), "rms_norm", "bf16", {"N": 1024},
                {"M=16": table_entry(search.kept_space("rms_norm", "sm_90")[0], "measured", 1.0, 3)})
    mine = {item["kernel"]: item for item in select_configs("h100", spec, "bf16", dirs=[tmp_path])}
    assert not mine["rms_norm"]["shipped"] and mine["rms_norm"]["sources"] == ["measured"]
    assert mine["qk_norm_rope"]["shipped"]


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("target", [t.name for t in gpu_targets()])
def test_shipped_tables_cover_every_gpu_target_and_model(target, dtype):
    tgt = get_target(target)
    for model in MODELS:
        spec = preset(model)
        items = select_configs(target, spec, dtype, dirs=[])
        assert {i["kernel"] for i in items} >= {"rms_norm", "qk_norm_rope", "attention_prefill", "attention_decode"}
        assert spec.is_moe == ("fused_moe" in {i["kernel"] for i in items})
        for item in items:
            space = {c.label for c in search.kept_space(item["kernel"], tgt.arch)}
            for bucket, entry in item["configs"].items():
                assert entry["source"] == "modelled" and entry["objective_us"] > 0, (item["table"], bucket)
                label = KernelConfig.from_dict(entry["config"]).label
                assert label in space, (item["table"], bucket, label)


def test_shipped_tables_are_small():
    files = list(SHIPPED_DIR.rglob("*.json"))
    assert len(files) == 7 * 20 * 2  # targets x (kernel, model shape) x (bf16, fp16)
    assert sum(f.stat().st_size for f in files) < 2 * 1024 * 1024
    assert not list(SHIPPED_DIR.rglob("*.png")) and not list(SHIPPED_DIR.rglob("*.db"))
