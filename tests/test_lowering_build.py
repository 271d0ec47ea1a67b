"""`build` with the lowering stage (qwen3export/lowering.py): each flavour's ONNX engine carries the ops its
flavour maps the qwen3export:: ops to, the manifest records the sites each pass replaced, the parity gate
passes, and --no-lower / --onnx-ops behave. One build per (model, variant), shared by the tests."""

from __future__ import annotations

import functools
import json

import onnx
import pytest

import qwen3export
import qwen3export.options as options
import qwen3export.lowering as lowering
import qwen3export.verify as verify
from qwen3export.graph_capture import capture
from qwen3export.cli import main, onnx_op_counts
from qwen3export.graphs.passes import run_passes

SEED = 3
# variant -> extra `build` flags; "standard" builds for a GPU target, whose default flavour is standard,
# with the tensorrt backend beside onnx (always standard) from the same lowered program
VARIANTS = {
    "ort": ["--dump-ir", "{tmp}/ir"],  # the cpu target's default flavour
    "standard": ["--target", "a100", "--backend", "onnx,tensorrt"],
    "off": ["--no-lower", "--dump-ir", "{tmp}/ir"],
}


@functools.cache
def pass_sites(model: str) -> dict[str, int]:
    """What the passes themselves report on a fresh capture of the same model."""
    _, results = run_passes(capture(qwen3export.load_model(model, seed=SEED)))
    return {r.name: r.sites for r in results}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(model, variant) -> (artifact folder of the onnx engine, `build --json` payload), built on first use.

    The sampling graph's own parity check (128 rows x 6 steps over a 151,936-token vocabulary, ~1 min on
    this machine's 2 shared cores) runs at 8 rows x 2 steps here: lowering does not touch that graph, and
    tests/test_cli.py builds check it at full size."""
    real = verify.check_sampling_parity
    cache: dict = {}

    def get(model: str, variant: str):
        if (model, variant) not in cache:
            tmp = tmp_path_factory.mktemp(f"{model}-{variant}")
            flags = [f.format(tmp=tmp) for f in VARIANTS[variant]]
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(verify, "check_sampling_parity", lambda g, s: real(g, s, rows=8, steps=2))
                where = "--out" if variant == "standard" else "--artifact"  # standard: onnx + tensorrt under one parent
                argv = ["build", "--model", model, "--seed", str(SEED), where, str(tmp / "arts"), "--json", *flags]
                assert main(argv) in (0, 3)  # 3: TensorRT plan pending (no TensorRT here), all else verified
            cache[model, variant] = tmp
        tmp = cache[model, variant]
        target = "a100" if variant == "standard" else "cpu"
        folder = tmp / "arts" if variant != "standard" else tmp / "arts" / f"{model}-{target}-onnx"
        return tmp, folder

    return get


def manifest(folder) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def decoder_ops(folder) -> dict[str, int]:
    return onnx_op_counts(onnx.load(str(folder / "decoder.onnx"), load_external_data=False).graph)


@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_ort_flavour_engine_has_contrib_ops_and_the_pass_counts(built, model, capsys):
    tmp, folder = built(model, "ort")
    m = manifest(folder)
    assert m["lowering"] == {"enabled": True, "passes": pass_sites(model), "onnx_ops": "ort", "notes": []}
    assert m["parity"]["passed"] and m["parity"]["greedy_match"] and m["parity"]["logits_scaled_err"] <= 1e-4
    # the cut sampling check is what the manifest says was run, not the build's default size
    assert (m["parity"]["sampling"]["rows"], m["parity"]["sampling"]["steps"]) == (8, 2)
    sites, layers = m["lowering"]["passes"], m["model"]["spec"]["num_hidden_layers"]
    assert sites["attention"] == sites["qk_norm_rope"] == layers
    ops = decoder_ops(folder)
    assert ops["com.microsoft::GroupQueryAttention"] == sites["attention"]
    assert ops["com.microsoft::RotaryEmbedding"] == 2 * sites["qk_norm_rope"]
    assert ops["com.microsoft::SkipSimplifiedLayerNormalization"] == sites["add_rms_norm"]
    assert ops.get("com.microsoft::MoE", 0) == sites["moe"] == m["engine"]["baked_weights"]
    assert ops["SimplifiedLayerNormalization"] > 0 and "Softmax" not in ops and "TopK" not in ops
    assert "qwen3export.rms_norm" in (tmp / "ir" / "02-lower.txt").read_text()

    capsys.readouterr()  # the build's own output, when this test built it
    assert main(["inspect", str(folder), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["lowering"] == m["lowering"] and info["op_counts"]["decoder.onnx"] == dict(sorted(ops.items()))
    assert main(["inspect", str(folder)]) == 0
    text = capsys.readouterr().out
    assert "com.microsoft::GroupQueryAttention" in text and f"attention {layers}" in text and "(onnx ops ort)" in text


@pytest.mark.parametrize("model", ["tiny", "tiny-moe"])
def test_standard_flavour_for_gpu_targets_and_tensorrt_is_plain_onnx(built, model):
    tmp, folder = built(model, "standard")
    for backend in ("onnx", "tensorrt"):
        m = manifest(tmp / "arts" / f"{model}-a100-{backend}")
        assert m["lowering"] == {"enabled": True, "passes": pass_sites(model), "onnx_ops": "standard", "notes": []}
        assert m["parity"]["passed"] and m["parity"]["greedy_match"]
        ops = decoder_ops(tmp / "arts" / f"{model}-a100-{backend}")
        assert all("::" not in k and onnx.defs.has(k, m["engine"]["opset"]) for k in ops), ops
        assert ops["Softmax"] == m["lowering"]["passes"]["attention"] + m["lowering"]["passes"]["moe"]


def test_no_lower_emits_the_captured_graph(built):
    tmp, folder = built("tiny", "off")
    m = manifest(folder)
    assert m["lowering"] == {"enabled": False, "passes": {k: 0 for k in pass_sites("tiny")}, "onnx_ops": "ort",
                             "notes": []}
    assert m["parity"]["passed"]
    assert not [k for k in decoder_ops(folder) if "::" in k]  # nothing for the ort table to translate
    assert sorted(p.name for p in (tmp / "ir").iterdir()) == ["01-capture.txt"]


@pytest.mark.parametrize("argv,needles", [
    (["--target", "a100", "--backend", "tensorrt", "--onnx-ops", "ort"],
     ["--onnx-ops ort cannot go with --backend tensorrt", "--onnx-ops standard"]),
    (["--target", "a100", "--backend", "onnx,tensorrt", "--onnx-ops", "ort"], ["--onnx-ops ort cannot go"]),
    (["--onnx-ops", "contrib"], ["unknown --onnx-ops 'contrib'", "ort, standard"]),
])
def test_bad_onnx_ops_is_refused_before_loading(argv, needles, capsys, tmp_path):
    assert main(["build", "--model", "tiny", "--out", str(tmp_path / "o"), *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("qwen3export: error: ") and "Traceback" not in lines[0]
    assert all(n in lines[0] for n in needles), lines[0]
    assert not (tmp_path / "o").exists()


def test_unmatched_graph_stays_unlowered_with_a_note():
    """A pass that cannot prove a site leaves it in plain ops: the record carries its warning as a note."""
    from qwen3export.graphs.passes import PassResult

    def stubborn(ep):
        import warnings

        from qwen3export.graphs.passes import UnloweredSiteWarning

        warnings.warn("attention: 2 attention site(s) not lowered (...)", UnloweredSiteWarning)
        return PassResult("attention", ep, 0, ["attention: 2 attention site(s) not lowered (...)"])

    lines: list[str] = []
    ep = object()
    lowered, record = lowering.lower_program(ep, lines.append, passes=(stubborn,))
    assert lowered is ep
    assert record == {"enabled": True, "passes": {"attention": 0},
                      "notes": ["attention: 2 attention site(s) not lowered (...)"]}
    assert lines == ["lower: attention: 0 site(s)", "warning: attention: 2 attention site(s) not lowered (...)"]


@pytest.mark.parametrize("backend,target,requested,want", [
    ("onnx", "cpu", None, "ort"), ("onnx", "a100", None, "standard"), ("onnx", "h100", "ort", "ort"),
    ("onnx", "cpu", "standard", "standard"), ("tensorrt", "a100", None, "standard"),
    ("tensorrt", "a100", "standard", "standard"), ("aoti", "cpu", None, None), ("kernels", "a100", None, None),
])
def test_flavour_per_backend_and_target(backend, target, requested, want):
    from qwen3export.targets import get_target

    assert options.onnx_flavour(backend, get_target(target), requested) == want


def test_backends_without_the_lowered_program_say_why():
    for backend in ("aoti", "kernels"):
        record = lowering.unlowered_record(backend, requested=True)
        assert not record["enabled"] and set(record["passes"].values()) == {0} and len(record["notes"]) == 1
    assert lowering.unlowered_record("aoti", requested=False)["notes"] == []


@pytest.mark.parametrize("argv", [("--model", "tiny", "--seed", "1"),
                                  ("--model", "tiny-moe", "--quant", "int4", "--group-size", "32")])
def test_decoder_has_fused_projections_no_rope_transposes_and_passes_parity(built_artifact, argv):
    """graphs/passes/fuse_projections: one MatMul (MatMulNBits when int4) for q/k/v per layer and one for gate/up
    per dense layer, each followed by a Split; backends/onnx_plumbing: RotaryEmbedding reads and writes
    [B, S, N*D] (no Transposes around it), and no Reshape chain back to its own input is left. Parity as gated."""
    folder = built_artifact(*argv)
    m = manifest(folder)
    spec = m["model"]["spec"]
    layers = spec["num_hidden_layers"]
    dense = sum(1 for i in range(layers) if not spec["num_experts"] or i in spec["mlp_only_layers"]
                or (i + 1) % spec["decoder_sparse_step"])
    assert m["lowering"]["passes"]["projections"] == layers + dense
    ops = decoder_ops(folder)
    # per layer qkv and o_proj, per dense layer gate_up and down_proj, and the lm_head
    assert ops.get("MatMul", 0) + ops.get("com.microsoft::MatMulNBits", 0) == 2 * layers + 2 * dense + 1
    assert ops["Split"] == layers + dense
    assert ops["com.microsoft::RotaryEmbedding"] == 2 * layers
    model = onnx.load(str(folder / "decoder.onnx"), load_external_data=False)
    weights = {t.name for t in model.graph.initializer}  # a tied lm_head is the embedding transposed, folded at load
    assert not [n.name for n in model.graph.node if n.op_type == "Transpose" and n.input[0] not in weights]
    producers = {o: n for n in model.graph.node for o in n.output}
    rope_inputs = [producers.get(n.input[0]) for n in model.graph.node if n.op_type == "RotaryEmbedding"]
    assert all(p is not None and p.op_type == "Reshape" for p in rope_inputs)  # [B, S, N, D] normed -> [B, S, N*D]
    assert m["parity"]["passed"] and m["parity"]["greedy_match"]
