"""Hostile-but-realistic input against the CLI (issue 16): each defect a new user found, as a regression test.

Every refusal is one line (`qwen3export: error: ...`), exit 2, and leaves nothing behind; nothing a user owns is
ever deleted; nothing an artifact carries is read from outside it.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import onnx
import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen3export import artifact as art
from qwen3export.cli import main
from qwen3export.spec import preset
from qwen3export.weights import RandomSource, save_hf_checkpoint

from artifact_copy import copy_of


def cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str, *needles: str, after_progress: bool = False) -> str:
    """The refusal: exit 2 and one line on stderr (with after_progress, the last line, after the progress
    lines of a build that failed midway)."""
    assert code == 2, (code, err)
    lines = [line for line in err.strip().splitlines() if line]
    if after_progress:
        assert "Traceback" not in err, err
        lines = lines[-1:]
    assert len(lines) == 1 and lines[0].startswith("qwen3export: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny preset's weights as a Hugging Face folder; tests edit copies of it."""
    spec = preset("tiny")
    return save_hf_checkpoint(spec, RandomSource(spec, seed=0), tmp_path_factory.mktemp("hf") / "tiny")


def edited(folder: Path, tmp_path: Path, config=None, tensors=None) -> Path:
    """A copy of `folder` with config.json's fields changed (`config`: dict of changes, or a whole JSON value
    under the key None) and tensors replaced (`tensors`: name -> tensor)."""
    import shutil

    dst = tmp_path / "ckpt"
    shutil.copytree(folder, dst)
    if config is not None:
        cfg = config[None] if None in config else {**json.loads((dst / "config.json").read_text()), **config}
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors:
        weights = load_file(str(dst / "model.safetensors"))
        weights.update(tensors)
        save_file(weights, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


# ---------------------------------------------------------------- 1. --force deletes only artifacts
def test_out_is_always_the_parent_and_force_replaces_only_the_artifact(built_artifact, tmp_path, capsys):
    """The reported loss: `build --out dist --force` replaced dist/ itself. --out is now always the parent; a
    rebuild with --force replaces dist/<model>-<target>-<backend> and nothing beside it."""
    dist = tmp_path / "dist"
    dist.mkdir()
    earlier = copy_of(built_artifact("--model", "tiny", "--seed", "1"), dist)
    earlier.rename(dist / "tiny-cpu-onnx")
    (dist / "notes.txt").write_text("the user's own file")
    (dist / "other-artifact").mkdir()
    before = json.loads((dist / "tiny-cpu-onnx" / "manifest.json").read_text())["created"]
    time.sleep(1.1)  # `created` has one-second resolution
    code, out, err = cli(capsys, "build", "--model", "tiny", "--seed", "2", "--out", dist, "--force")
    assert code == 0, err
    assert (dist / "notes.txt").read_text() == "the user's own file" and (dist / "other-artifact").is_dir()
    m = art.load_artifact(dist / "tiny-cpu-onnx").manifest
    assert m["created"] != before and m["model"]["ref"]["seed"] == 2
    assert sorted(p.name for p in dist.iterdir()) == ["notes.txt", "other-artifact", "tiny-cpu-onnx"]


@pytest.mark.parametrize("make", ["user_folder", "file", "foreign_manifest"])  # an empty folder may be replaced
def test_force_refuses_what_is_not_an_artifact(make, tmp_path, capsys):
    target = tmp_path / "victim"
    if make == "file":
        target.write_text("data")
    else:
        target.mkdir()
        if make == "user_folder":
            (target / "thesis.tex").write_text("years of work")
        if make == "foreign_manifest":
            (target / "manifest.json").write_text(json.dumps({"schema": "someone-else/1"}))
    snapshot = sorted(p.name for p in tmp_path.rglob("*"))
    t0 = time.monotonic()
    code, _, err = cli(capsys, "build", "--model", "tiny", "--artifact", target, "--force")
    one_line(code, err, "is not a qwen3export artifact", "--force replaces only an artifact")
    assert time.monotonic() - t0 < 20  # refused before the build, not after it
    assert sorted(p.name for p in tmp_path.rglob("*")) == snapshot


def test_artifact_flag_takes_one_backend_only(tmp_path, capsys):
    code, _, err = cli(capsys, "build", "--model", "tiny", "--target", "a100", "--backend", "onnx,kernels",
                       "--artifact", tmp_path / "a")
    one_line(code, err, "--artifact names one artifact folder", "--out DIR")
    code, _, err = cli(capsys, "build", "--model", "tiny", "--artifact", tmp_path / "a", "--out", tmp_path)
    one_line(code, err, "not both")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- 4. oversized configs, checked first
@pytest.mark.parametrize("changes,needles", [
    ({"num_hidden_layers": 1_000_000}, ["num_hidden_layers", "1,000,000", "outside 1..1,024"]),
    ({"vocab_size": 10**12}, ["vocab_size", "1,000,000,000,000"]),
    ({"num_hidden_layers": 3}, ["num_hidden_layers 3", "weights for 2 layers"]),
    ({"vocab_size": 160_000}, ["vocab_size 160000", "151936 rows"]),
])
def test_oversized_or_mismatched_config_is_refused_before_allocating(tiny_folder, tmp_path, capsys, changes,
                                                                     needles):
    folder = edited(tiny_folder, tmp_path, changes)
    t0 = time.monotonic()
    code, _, err = cli(capsys, "build", "--model", folder, "--out", tmp_path / "o")
    one_line(code, err, *needles)
    assert time.monotonic() - t0 < 30 and not (tmp_path / "o").exists()


def test_a_model_larger_than_memory_is_refused_before_loading(capsys, tmp_path):
    """qwen3-32b in fp32 (~122 GiB) in memory: refused from the plan with the way out (--stream), in seconds."""
    from qwen3export.options import check_load_memory
    from qwen3export.errors import InputError

    with pytest.raises(InputError, match="needs at least .* GiB to load in memory .* --stream"):
        check_load_memory(preset("tiny"), "none", available=1 << 20)
    check_load_memory(preset("tiny"), "none", available=1 << 40)
    t0 = time.monotonic()
    code, _, err = cli(capsys, "build", "--model", "qwen3-32b", "--out", tmp_path / "o")
    one_line(code, err, "qwen3-32b needs at least", "--stream")
    assert time.monotonic() - t0 < 30


# ---------------------------------------------------------------- 5. OSError at the CLI boundary: exit 2
def test_out_under_a_file_is_one_line_exit_2(tmp_path, capsys):
    (tmp_path / "plain").write_text("x")
    code, _, err = cli(capsys, "build", "--model", "tiny", "--out", tmp_path / "plain" / "sub")
    line = one_line(code, err, "plain", "errno")
    assert "Traceback" not in err and line


def test_disk_full_mid_build_is_exit_2_and_leaves_nothing(monkeypatch, tmp_path, capsys):
    real = art.seal

    def full_disk(folder, manifest):
        raise OSError(errno.ENOSPC, "No space left on device", str(Path(folder) / "decoder.onnx"))

    monkeypatch.setattr(art, "seal", full_disk)
    code, _, err = cli(capsys, "build", "--model", "tiny", "--artifact", tmp_path / "a")
    one_line(code, err, "No space left on device", f"errno {errno.ENOSPC}", after_progress=True)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(art, "seal", real)


# ---------------------------------------------------------------- 6. manifest paths stay inside the artifact
def _reseal_with(folder: Path, edit) -> None:
    """Edit the manifest and recompute its hash, as anyone can (no signature involved)."""
    m = json.loads((folder / "manifest.json").read_text())
    edit(m)
    art.write_manifest(folder, m)


@pytest.mark.parametrize("case", ["dotdot", "absolute", "engine_file_elsewhere", "symlink_out", "unlisted_file",
                                  "external_data_out"])
def test_manifest_paths_outside_the_artifact_are_refused(case, built_artifact, tmp_path, capsys):
    secret = tmp_path / "SECRET.txt"
    secret.write_text("private")
    a = copy_of(built_artifact("--model", "tiny", "--seed", "1"), tmp_path)
    entry = {"size": secret.stat().st_size, "sha256": art.sha256_file(secret)}
    if case == "dotdot":
        _reseal_with(a, lambda m: m["files"].update({"../SECRET.txt": entry}))
        needle = "not a plain relative path"
    elif case == "absolute":
        _reseal_with(a, lambda m: m["files"].update({str(secret): entry}))
        needle = "not a plain relative path"
    elif case == "engine_file_elsewhere":
        _reseal_with(a, lambda m: m["engine"].update({"file": "../SECRET.txt"}))
        needle = "not one of its listed files"
    elif case == "symlink_out":
        (a / "link.txt").symlink_to(secret)
        _reseal_with(a, lambda m: m["files"].update({"link.txt": entry}))
        needle = "symlink link.txt"
    elif case == "unlisted_file":
        (a / "payload.py").write_text("print('hi')")
        needle = "payload.py, which the manifest does not list"
    else:  # an ONNX file whose external data points at a file outside, re-hashed and resealed
        model = onnx.load(str(a / "decoder.onnx"))
        init = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        init.ClearField("raw_data")
        init.data_location = onnx.TensorProto.EXTERNAL
        for k, v in (("location", "../SECRET.txt"), ("offset", "0"), ("length", "4")):
            init.external_data.add(key=k, value=v)
        onnx.save(model, str(a / "decoder.onnx"))
        _reseal_with(a, lambda m: m["files"].update(
            {"decoder.onnx": {"size": (a / "decoder.onnx").stat().st_size,
                              "sha256": art.sha256_file(a / "decoder.onnx")}}))
        needle = "not a plain relative path"
    for command in (["run", a, "--prompt-ids", "1", "--max-new-tokens", "1"], ["verify", a], ["inspect", a]):
        code, _, err = cli(capsys, *command)
        one_line(code, err, needle)


# ---------------------------------------------------------------- 7. numbers past int64, ranges in argparse
@pytest.mark.parametrize("argv,needle", [
    (["run", "ART", "--prompt-ids", str(10**30)], "out of range"),
    (["run", "ART", "--prompt-ids", "1", "--top-k", str(10**20)], "argument --top-k"),
    (["run", "ART", "--prompt-ids", "1", "--thinking-budget", str(10**20)], "argument --thinking-budget"),
    (["run", "ART", "--prompt-ids", "1", "--seed", "-1"], "argument --seed"),
    (["run", "ART", "--prompt-ids", "1", "--temperature", "nan"], "argument --temperature"),
    (["run", "ART", "--prompt-ids", "1", "--max-new-tokens", "0"], "argument --max-new-tokens"),
    (["run", "ART", "--prompt-ids", "1", "--threads", "0"], "argument --threads"),
    (["build", "--seed", str(2**64)], "argument --seed"),
    (["build", "--max-seq", "0"], "argument --max-seq"),
    (["build", "--tp", "0"], "argument --tp"),
    (["build", "--max-batch", "0"], "argument --max-batch"),
    (["build", "--quant", "int8", "--group-size", "64"], "--group-size applies to --quant int4 only"),
    (["build", "--backend", "onnx,onnx"], "--backend names onnx more than once"),
])
def test_out_of_range_numbers_are_one_line(argv, needle, built_artifact, tmp_path, capsys):
    a = built_artifact("--model", "tiny", "--seed", "1")
    argv = [str(a) if x == "ART" else x for x in argv]
    if argv[0] == "build":
        argv += ["--out", str(tmp_path / "o")]
    t0 = time.monotonic()
    code, _, err = cli(capsys, *argv)
    one_line(code, err, needle)
    assert time.monotonic() - t0 < 20 and not (tmp_path / "o").exists()  # the duplicate backend: before the build


# ---------------------------------------------------------------- 8. config values of the wrong type
@pytest.mark.parametrize("config,needle", [
    ({None: [1, 2, 3]}, "must hold a JSON object, not a JSON list"),
    ({"eos_token_id": "151645"}, "config field 'eos_token_id' must be a token id"),
    ({"num_attention_heads": 4.5}, "config field 'num_attention_heads' must be an integer"),
    ({"tie_word_embeddings": "yes"}, "config field 'tie_word_embeddings' must be true or false"),
    ({"rope_scaling": [4.0]}, "config field 'rope_scaling' must be a JSON object"),
])
def test_config_of_the_wrong_type_is_one_line(config, needle, tiny_folder, tmp_path, capsys):
    code, _, err = cli(capsys, "build", "--model", edited(tiny_folder, tmp_path, config), "--out", tmp_path / "o")
    one_line(code, err, needle)


def test_integer_weights_are_refused(tiny_folder, tmp_path, capsys):
    name = "model.layers.0.mlp.down_proj.weight"
    w = load_file(str(tiny_folder / "model.safetensors"))[name]
    folder = edited(tiny_folder, tmp_path, tensors={name: (w * 100).to(torch.int32)})
    code, _, err = cli(capsys, "build", "--model", folder, "--out", tmp_path / "o")
    one_line(code, err, f"tensor {name}", "is I32, not a floating-point weight")  # from the header: before [1/6]


# ---------------------------------------------------------------- minor items
def test_stale_partials_of_killed_builds_are_removed(tmp_path):
    """A killed build leaves `.NAME.partial-PID`; the next build to that folder removes it (its PID is gone),
    and keeps one whose process is alive."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".art.partial-{dead.pid}"
    stale.mkdir()
    (stale / "decoder.onnx").write_bytes(b"half")
    live = tmp_path / f".art.partial-{os.getppid()}"
    live.mkdir()
    unrelated = tmp_path / ".art.partial-notapid"
    unrelated.mkdir()
    removed = art.remove_stale_partials(tmp_path / "art")
    assert removed == [stale] and not stale.exists() and live.is_dir() and unrelated.is_dir()


def test_a_second_build_to_the_same_folder_is_refused_while_the_first_runs(tmp_path, capsys):
    out = tmp_path / "art"
    holder = subprocess.Popen(  # another process holding the lock, as a running build does
        [sys.executable, "-c", "import sys, time; from pathlib import Path; from qwen3export import artifact as a\n"
         "with a.build_lock(Path(sys.argv[1])):\n    print('held', flush=True); time.sleep(120)", str(out)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.monotonic()
        code, _, err = cli(capsys, "build", "--model", "tiny", "--artifact", out)
        one_line(code, err, "another build is writing", "wait for it")
        assert time.monotonic() - t0 < 20  # refused before any work
    finally:
        holder.kill()
        holder.wait()
    assert not out.exists()


def test_commands_that_need_no_torch_do_not_import_it(built_artifact):
    a = built_artifact("--model", "tiny", "--seed", "1")
    code = ("import sys, time; t = time.perf_counter(); from qwen3export.cli import main; "
            "codes = [main(a) for a in (['--help'], ['targets'], ['build', '--help'], ['inspect', sys.argv[1]])]; "
            "assert codes == [0, 0, 0, 0], codes; "
            "heavy = sorted(m for m in ('torch', 'triton', 'optuna', 'transformers') if m in sys.modules); "
            "assert not heavy, heavy")
    run = subprocess.run([sys.executable, "-c", code, str(a)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]


# ---------------------------------------------------------------- 2. signed manifests at the CLI
@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    for who in ("builder", "stranger"):
        assert main(["keys", "--private", str(d / f"{who}.pem"), "--public", str(d / f"{who}.pub")]) == 0
    assert (d / "builder.pem").stat().st_mode & 0o777 == 0o600
    return d


@pytest.fixture(scope="module")
def signed(keys, tmp_path_factory):
    out = tmp_path_factory.mktemp("signed") / "art"
    assert main(["build", "--model", "tiny", "--seed", "1", "--artifact", str(out), "--sign",
                 str(keys / "builder.pem")]) == 0
    return out


def test_signed_build_runs_only_for_the_trusted_key(signed, keys, tmp_path, capsys):
    a = copy_of(signed, tmp_path)
    run = ["--prompt-ids", "1,2", "--max-new-tokens", "2", "--greedy", "--json"]
    code, out, err = cli(capsys, "run", a, *run, "--trust", keys / "builder.pub")
    assert code == 0 and len(json.loads(out)["tokens"]) == 2, err
    code, out, _ = cli(capsys, "inspect", a, "--trust", keys / "builder.pub", "--json")
    assert code == 0 and json.loads(out)["signature"]["checked"] is True
    code, out, _ = cli(capsys, "inspect", a)
    assert code == 0 and "signature ed25519 by key" in out and "not checked" in out
    code, _, err = cli(capsys, "run", a, *run, "--trust", keys / "stranger.pub")
    one_line(code, err, "is signed by key", "not by the trusted key")
    # verify leaves a signed manifest as it is (a rewrite would void the signature) ...
    before = (a / "manifest.json").read_bytes()
    code, _, err = cli(capsys, "verify", a, "--trust", keys / "builder.pub")
    assert code == 0 and "its manifest was not updated" in err and (a / "manifest.json").read_bytes() == before
    # ... and anyone can reseal a tampered manifest, but not re-sign it
    _reseal_with(a, lambda m: m["sampling"]["defaults"]["thinking"].update({"temperature": 5.0}))
    art.load_artifact(a)  # the hash matches again: only the signature can tell
    for command in ("run", "verify", "inspect"):
        extra = run if command == "run" else []
        code, _, err = cli(capsys, command, a, *extra, "--trust", keys / "builder.pub")
        one_line(code, err, "does not match its signature")


def test_trust_refuses_unsigned_artifacts_and_bad_keys(built_artifact, keys, tmp_path, capsys):
    a = built_artifact("--model", "tiny", "--seed", "1")
    code, _, err = cli(capsys, "run", a, "--prompt-ids", "1", "--trust", keys / "builder.pub")
    one_line(code, err, "is unsigned", "--sign KEY")
    (tmp_path / "junk.pem").write_text("not a key")
    code, _, err = cli(capsys, "build", "--model", "tiny", "--artifact", tmp_path / "x", "--sign",
                       tmp_path / "junk.pem")
    one_line(code, err, "junk.pem")
    assert not (tmp_path / "x").exists()


def test_resigning_needs_the_old_signature_checked(signed, keys, tmp_path, capsys):
    """verify/finish --sign vouch again: without --trust they would launder an artifact nobody checked."""
    a = copy_of(signed, tmp_path)
    code, _, err = cli(capsys, "verify", a, "--sign", keys / "stranger.pem")
    one_line(code, err, "--sign re-signs the artifact, so it needs --trust")
    code, _, err = cli(capsys, "verify", a, "--trust", keys / "stranger.pub", "--sign", keys / "stranger.pem")
    one_line(code, err, "is signed by key", "not by the trusted key")


# ---------------------------------------------------------------- resealed manifests of the wrong shape
@pytest.mark.parametrize("case,needle", [
    ("file_entry_string", "is not {size, sha256}"),
    ("file_entry_no_size", "is not {size, sha256}"),
    ("engine_file_list", "'engine.file' is not a path"),
    ("no_backend", "'backend' is not present (it must be a JSON string)"),
    ("backend_number", "'backend' is not a JSON string"),
    ("unknown_backend", "'backend' is not one of onnx, tensorrt, aoti, kernels, torch-export"),
    ("unknown_section", "'plugins' is not a field of this schema version"),
    ("stop_ids_strings", "'sampling.early_stop_ids[0]' is not a JSON integer"),
    ("passed_string", "'parity.passed' is not a JSON boolean"),
    ("engine_no_inputs", "'engine.inputs' is not present"),
    ("spec_list", "'model.spec' is not a JSON object"),
    ("target_string", "'target' is not a JSON object"),
    ("deep_json", "not a valid manifest"),
    ("nan", "not a valid manifest"),
    ("corrupt_onnx", "decoder.onnx is not a readable ONNX model"),
    # schema 2's ort decoder took seqlens_k / total_sequence_length: refused before ONNX Runtime sees it
    ("older_schema", "has schema 'qwen3export.artifact/2', expected 'qwen3export.artifact/3'; rebuild"),
])
def test_malformed_manifests_are_one_line(case, needle, built_artifact, tmp_path, capsys):
    a = copy_of(built_artifact("--model", "tiny", "--seed", "1"), tmp_path)
    edits = {"file_entry_string": lambda m: m["files"].update({"decoder.onnx": "x"}),
             "file_entry_no_size": lambda m: m["files"]["decoder.onnx"].pop("size"),
             "engine_file_list": lambda m: m["engine"].update({"file": ["decoder.onnx"]}),
             "no_backend": lambda m: m.pop("backend"),
             "backend_number": lambda m: m.update({"backend": 1}),
             "unknown_backend": lambda m: m.update({"backend": "onnx-custom"}),
             "unknown_section": lambda m: m.update({"plugins": {"exec": "payload.so"}}),
             "stop_ids_strings": lambda m: m["sampling"].update({"early_stop_ids": ["151668"]}),
             "passed_string": lambda m: m["parity"].update({"passed": "yes"}),
             "engine_no_inputs": lambda m: m["engine"].pop("inputs"),
             "spec_list": lambda m: m["model"].update({"spec": [1]}),
             "target_string": lambda m: m.update({"target": "cpu"}),
             "older_schema": lambda m: m.update({"schema": "qwen3export.artifact/2"})}
    if case in edits:
        _reseal_with(a, edits[case])
    elif case == "deep_json":
        (a / "manifest.json").write_text("[" * 200_000)
    elif case == "nan":
        (a / "manifest.json").write_text((a / "manifest.json").read_text().replace('"fp32"', "NaN", 1))
    else:
        (a / "decoder.onnx").write_bytes(b"\x08\x07garbage, not protobuf" * 10)
        _reseal_with(a, lambda m: m["files"].update({"decoder.onnx": {
            "size": (a / "decoder.onnx").stat().st_size, "sha256": art.sha256_file(a / "decoder.onnx")}}))
    for command in (["run", a, "--prompt-ids", "1", "--max-new-tokens", "1"], ["inspect", a]):
        code, _, err = cli(capsys, *command)
        one_line(code, err, needle)


def test_force_keeps_an_artifact_holding_user_files(built_artifact, tmp_path, capsys):
    a = copy_of(built_artifact("--model", "tiny", "--seed", "1"), tmp_path)
    (a / "notes.txt").write_text("mine")
    code, _, err = cli(capsys, "build", "--model", "tiny", "--artifact", a, "--force")
    one_line(code, err, "an artifact with other files in it", "notes.txt")
    assert (a / "notes.txt").read_text() == "mine"
    code, _, err = cli(capsys, "build", "--model", "tiny", "--artifact", ".", "--force")
    one_line(code, err, "is the current folder or one of its parents")


def test_tensorrt_settings_and_kernel_pack_index_stay_inside(tmp_path):
    """`finish` writes the plan and timing cache where tensorrt/build.json says, and the kernel pack loads the
    cubins its index names: both are refused when they point outside the artifact."""
    from qwen3export.backends.kernel_pack import PACK_INDEX, checked_index
    from qwen3export.backends.tensorrt import SETTINGS_FILE, settings_paths_checked
    from qwen3export.errors import ArtifactError

    (tmp_path / "tensorrt").mkdir()
    (tmp_path / "decoder.onnx").write_bytes(b"x")
    art.write_manifest(tmp_path, {"schema": art.SCHEMA, "backend": "tensorrt",  # type: ignore[typeddict-item]
                                  "files": art.file_entries(tmp_path)})
    good = {"onnx": "decoder.onnx", "plan": "tensorrt/decoder.plan", "timing_cache": "tensorrt/timing.cache"}
    for change, needle in [({}, None), ({"plan": "../../.bashrc"}, "not a plain relative path"),
                           ({"timing_cache": "/etc/passwd"}, "not a plain relative path"),
                           ({"plan": "decoder.onnx"}, "outside tensorrt/"),
                           ({"onnx": "tensorrt/other.onnx"}, "not a listed file")]:
        (tmp_path / SETTINGS_FILE).write_text(json.dumps({**good, **change}))
        if needle is None:
            assert settings_paths_checked(tmp_path)["plan"] == "tensorrt/decoder.plan"
        else:
            with pytest.raises(ArtifactError, match=needle):
                settings_paths_checked(tmp_path)
    (tmp_path / PACK_INDEX).parent.mkdir(exist_ok=True)
    fn = {"files": ["kernels/k.cubin", "kernels/k.json"], "name": "k"}
    for files, needle in [(fn["files"], None), (["../../k.cubin", "kernels/k.json"], "not a plain relative path"),
                          (["kernels/other.cubin"], "names no cubin")]:
        (tmp_path / PACK_INDEX).write_text(json.dumps({"functions": [{**fn, "files": files}]}))
        if needle is None:
            checked_index(tmp_path)
        else:
            with pytest.raises(ArtifactError, match=needle):
                checked_index(tmp_path)


def test_public_api_names_stay_what_they_are():
    """The lazy package attributes: `capture` stays the function after the driver imports its module."""
    code = ("import qwen3export; f = qwen3export.capture; import qwen3export.pipeline; "
            "from qwen3export import capture, preset, load_model, ModelSpec; "
            "assert capture is f and callable(capture) and not hasattr(capture, '__file__'); "
            "assert preset('tiny').name == 'tiny' and 'capture' in dir(qwen3export)")
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
