"""autotune/public_tables.py on the real vLLM fused_moe config files in ../shared/reference/vllm-fused-moe: every
file read with its figures and source, names parsed as the folder's README indexes them, configs mapped onto our
kept space, and measured-public entries made only for the twin shape on the same GPU."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from qwen3export.autotune import search
from qwen3export.autotune.public_tables import (DEVICE_TARGETS, REPO, UNQUANTIZED, VLLM_KEYS, device_target,
                                                map_config, parse_name, public_entries, read_public_table,
                                                read_public_tables)
from qwen3export.autotune.tables import read_table, table_entry, validate_table, write_table
from qwen3export.errors import ConfigError, InputError
from qwen3export.targets import get_target

PUBLIC = Path(__file__).resolve().parents[3] / "shared" / "reference" / "vllm-fused-moe"  # ../shared beside the checkout
needs_public = pytest.mark.skipif(not PUBLIC.is_dir(), reason=f"vLLM's fused_moe configs are not at {PUBLIC} "
                                                              "(CI and the developers' machines have ../shared)")
QWEN3_30B = {"E": 128, "H": 2048, "I": 768, "K": 8}
BUCKETS = tuple({"M": m} for m in (1, 4, 16, 64, 256, 1024, 4096))


def readme_index() -> dict[str, dict[str, str]]:
    """The README's index rows: file -> {device, dtype, block_shape, N, commit}, read here independently."""
    rows = {}
    for line in (PUBLIC / "README.md").read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 8 and cells[0].startswith("`E="):
            rows[cells[0].strip("`")] = {"device": cells[1], "dtype": cells[2], "block_shape": cells[3],
                                         "N": cells[4], "commit": cells[7].strip("`")}
    return rows


@needs_public
def test_every_file_is_read_with_its_figures_and_source():
    tables = read_public_tables(PUBLIC)
    files = sorted(p.name for p in PUBLIC.glob("E=*.json"))
    assert [t.file for t in tables] == files and len(files) > 40
    index = readme_index()
    for table in tables:
        raw = json.loads((PUBLIC / table.file).read_text())
        assert table.entries == {int(k): {f: v[f] for f in VLLM_KEYS} for k, v in raw.items() if k != "triton_version"}
        assert table.triton_version == raw.get("triton_version")
        assert re.fullmatch(r"[0-9a-f]{40}", table.commit) and table.commit == index[table.file]["commit"]
        assert table.source["repo"] == REPO and table.source["path"].endswith("/fused_moe/configs/" + table.file)
        row = index[table.file]
        assert (table.device_name, str(table.n)) == (row["device"], row["N"])
        assert (table.quant == UNQUANTIZED) == row["dtype"].startswith("none")
        assert (table.block_shape is None) == (row["block_shape"] == "-")


@needs_public
def test_extra_fields_are_dropped_and_bad_files_refused(tmp_path):
    split_k = read_public_table(PUBLIC / "E=128,N=192,device_name=NVIDIA_H200,dtype=fp8_w8a8.json")
    assert all(set(e) == set(VLLM_KEYS) for e in split_k.entries.values())  # SPLIT_K: our kernel has none
    assert parse_name("E=128,N=384,device_name=NVIDIA_H100_PCIe,block_shape=[128,128].json")["block_shape"] == (128, 128)
    with pytest.raises(ConfigError, match="not a vLLM fused_moe config name"):
        parse_name("N=768,E=128.json")
    bad = tmp_path / "E=8,N=16,device_name=X.json"
    bad.write_text(json.dumps({"1": {"BLOCK_SIZE_M": 16}}))
    with pytest.raises(ConfigError, match="entry '1'"):
        read_public_table(bad)
    with pytest.raises(InputError, match="no folder"):
        read_public_tables(tmp_path / "absent")


def test_devices_map_to_our_specs_or_to_none():
    assert device_target("NVIDIA_H100_80GB_HBM3") is get_target("h100")
    pcie = device_target("NVIDIA_A100-PCIe-40GB")
    assert pcie.name != "a100" and pcie.sm_count == 108 and pcie.memory_bandwidth < get_target("a100").memory_bandwidth
    assert device_target("NVIDIA_A10").sm_count == 72 and device_target("NVIDIA_A10").arch == "sm_86"
    assert device_target("NVIDIA_H20") is None and device_target("NVIDIA_H100") is None  # which H100?
    assert set(DEVICE_TARGETS.values()) <= {t.name for t in (get_target(n) for n in DEVICE_TARGETS.values())}


@needs_public
@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_mapping_lands_in_the_kept_space_and_keeps_block_m(arch):
    space = search.kept_space("fused_moe", arch)
    for table in read_public_tables(PUBLIC):
        for vllm in table.entries.values():
            config, notes = map_config(vllm, space)
            assert config in space
            have = config.constexprs | {"num_warps": config.num_warps, "num_stages": config.num_stages}
            changed = {n.split()[0] for n in notes}
            ours = {"BLOCK_SIZE_M": "BLOCK_M", "BLOCK_SIZE_N": "BLOCK_N", "BLOCK_SIZE_K": "BLOCK_K"}
            assert changed == {ours.get(k, k) for k, v in vllm.items() if have[ours.get(k, k)] != v}
            if vllm["BLOCK_SIZE_M"] in {c["BLOCK_M"] for c in space}:
                assert config["BLOCK_M"] == vllm["BLOCK_SIZE_M"]


@needs_public
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_public_entries_only_for_the_twin_shape_on_the_same_gpu(dtype):
    tables = read_public_tables(PUBLIC)
    raw = json.loads((PUBLIC / "E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json").read_text())
    entries, notes = public_entries(tables, get_target("h100"), dtype, QWEN3_30B, BUCKETS, lambda c: None)
    assert sorted(entries) == sorted(f"M={b['M']}" for b in BUCKETS) and not notes
    for bucket, entry in entries.items():
        m = bucket.split("=")[1]
        assert entry["source"] == "measured-public" and entry["objective_us"] is None and entry["trials"] == 0
        assert entry["BLOCK_M"] == min(raw[m]["BLOCK_SIZE_M"], 128)
        assert entry["evidence"]["vllm_config"] == {k: raw[m][k] for k in VLLM_KEYS}
        assert entry["evidence"]["path"].endswith("E=128,N=768,device_name=NVIDIA_H100_80GB_HBM3.json")
        assert "not a measurement of this kernel" in entry["evidence"]["why"]
    # no twin: an A100 (only N=192 measured), the 235B shape (no NVIDIA N=1536 table), fp32 weights, L40S (fp8 only)
    assert public_entries(tables, get_target("a100"), dtype, QWEN3_30B, BUCKETS, lambda c: None)[0] == {}
    assert public_entries(tables, get_target("h100"), dtype, QWEN3_30B | {"I": 1536, "H": 4096}, BUCKETS,
                          lambda c: None)[0] == {}
    assert public_entries(tables, get_target("h100"), "fp32", QWEN3_30B, BUCKETS, lambda c: None)[0] == {}
    assert public_entries(tables, get_target("l40s"), dtype, QWEN3_30B, BUCKETS, lambda c: None)[0] == {}


@needs_public
def test_a_config_our_kernel_cannot_run_is_left_to_the_model(tmp_path):
    tables = read_public_tables(PUBLIC)
    entries, notes = public_entries(tables, get_target("h200"), "bf16", QWEN3_30B, BUCKETS,
                                    lambda c: "spills 8 B" if c["BLOCK_M"] == 128 else None)
    assert "M=4096" not in entries and "M=1" in entries and any("spills" in n for n in notes)
    path = write_table(tmp_path, get_target("h200"), "fused_moe", "bf16", QWEN3_30B, entries)
    h200 = next(t for t in tables if t.file == "E=128,N=768,device_name=NVIDIA_H200.json")
    assert read_table(path)["entries"]["M=1"]["evidence"]["commit"] == h200.commit
    data = json.loads(path.read_text())
    del data["entries"]["M=1"]["evidence"]["commit"]
    with pytest.raises(ConfigError, match="without its source"):
        validate_table(data, "edited")


def test_measured_public_entries_carry_no_timing():
    config = search.kept_space("fused_moe", "sm_90")[0]
    with pytest.raises(ConfigError, match="objective_us"):
        table_entry(config, "measured-public", 3.0, 0, {"repo": REPO, "path": "p", "commit": "c"})
    with pytest.raises(ConfigError, match="objective_us"):
        table_entry(config, "modelled", None, 4)
