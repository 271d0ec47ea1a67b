"""`build --quant` end to end (issue 9): the quantized decoder captured, lowered and emitted as ONNX (MatMulNBits /
QMoE for the ort flavour, DequantizeLinear-21 + MatMul for standard), run by ONNX Runtime and gated against eager
PyTorch on the same dequantized weights; the quantized-vs-unquantized comparison reported in the manifest; AWQ
folders built as they are; every refusal one line, exit 2, nothing written. tiny / tiny-moe only (seconds each).
"""

from __future__ import annotations

import json
from collections import Counter

import onnx
import pytest
import torch

from qwen3export.artifact import load_artifact
from qwen3export.cli import main
from qwen3export.generation import greedy_generate, left_pad
from qwen3export.quant import build_quantized
from qwen3export.model import resolve
from qwen3export.parity import THRESHOLDS
from qwen3export.verify import verify_artifact
from qwen3export.quant_format import QuantConfig
from qwen3export.quant import QuantizedSource
from qwen3export.quant_parity import dequantized_reference
from qwen3export.references import artifact_quant_config
from qwen3export.runner import open_engine
from qwen3export.spec import preset

from test_prequantized import _write_checkpoint
from test_quant_parity import BOUNDS, violated


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def op_counts(artifact) -> Counter:
    model = onnx.load(str(artifact.file("decoder.onnx")), load_external_data=False)
    return Counter(f"{n.domain}::{n.op_type}" for n in model.graph.node)


@pytest.fixture(scope="module")
def int4_tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("q") / "tiny-int4"
    assert main(["build", "--model", "tiny", "--quant", "int4", "--group-size", "32", "--quantize-lm-head",
                 "--int4-accuracy", "4", "--artifact", str(out)]) == 0
    return load_artifact(out)


def test_int4_build_manifest_and_engine(int4_tiny):
    m = int4_tiny.manifest
    spec = preset("tiny")
    q = m["quantization"]
    assert (q["mode"], q["group_size"], q["quantize_lm_head"], q["scheme"]) == ("int4", 32, True, "rtn")
    # tiny ties its embeddings: the lm_head is quantized from the embedding, which stays fp for the gather
    assert spec.tie_word_embeddings
    assert q["linears"] == 7 * spec.num_hidden_layers + 1 and q["moe_blocks"] == 0
    # int4 codes (half a byte) plus one fp32 scale per 32 weights: 0.625 bytes a weight
    quantized_params = sum(n * k for _, (n, k) in _linear_shapes(spec)) + spec.vocab_size * spec.hidden_size
    assert q["quantized_bytes"] == quantized_params // 2 + quantized_params // 32 * 4
    # stored: the quantized tensors plus the fp32 ones left; the tied embedding stays (the gather reads it), so
    # with tiny's embedding-heavy shapes the artifact is larger than fp32, while decode reads far fewer bytes
    assert q["weight_bytes"] == q["fp_weight_bytes"] + q["quantized_bytes"]
    assert q["fp_weight_bytes"] >= 4 * spec.vocab_size * spec.hidden_size
    assert m["engine"]["opset"] == 21  # DequantizeLinear-21 (blocked, INT4); tiny weights are folded, not baked
    ops = op_counts(int4_tiny)
    assert ops["com.microsoft::MatMulNBits"] in linear_nodes(spec, 1)  # lm_head too
    assert ops["::MatMul"] == 0
    # MatMulNBits at accuracy level 4 (int8 activations), recorded in the quantization section
    assert q["accuracy_level"] == 4 and set(accuracy_levels(int4_tiny)) == {4}
    # gated: the engine against eager on the dequantized weights with the int8 activations emulated (the median
    # row at the fp32 bound, rounding flips allowed in a few: parity.THRESHOLDS); the parity says which reference ran
    p = m["parity"]
    assert p["passed"] and p["greedy_match"] and p["logits_scaled_median"] < 1e-4
    assert p["thresholds"] == THRESHOLDS["int8_activations"]
    assert "dequantized" in p["reference"] and "emulated" in p["reference"]
    gate = p["quant_gate"]
    assert (gate["kind"], gate["accuracy_level"], gate["linears"]) == ("emulated-int8-activations", 4,
                                                                        7 * spec.num_hidden_layers + 1)
    # reported, not gated: what int4 g32 costs against the unquantized model, in a plausible range
    quality = p["quantization"]
    assert quality["gated"] is False and quality["quantization"]["mode"] == "int4"
    # the bounds that correct int4 passes and wrong weights fail (tests/test_quant_parity.py's negative control)
    assert quality["logits_kl"]["mean"] > 0 and all(e > 0 for e in quality["hidden_state_rel_error"])
    assert violated(quality, BOUNDS["int4"]) == []


def linear_nodes(spec, extra: int = 0) -> set[int]:
    """How many ONNX nodes the quantized linears take: 7 per dense layer and 4 (attention) per MoE layer, or, with
    q/k/v and gate/up fused into one weight each (the lowering's projection fusion), 4 and 2; plus `extra`."""
    dense, moe = spec.num_hidden_layers - len(spec.moe_layers), len(spec.moe_layers)
    return {7 * dense + 4 * moe + extra, 4 * dense + 2 * moe + extra}


def accuracy_levels(artifact) -> list[int]:
    """accuracy_level of every MatMulNBits / QMoE node of the artifact's decoder."""
    model = onnx.load(str(artifact.file("decoder.onnx")), load_external_data=False)
    return [next(a.i for a in n.attribute if a.name == "accuracy_level") for n in model.graph.node
            if n.op_type in ("MatMulNBits", "QMoE")]


def _linear_shapes(spec):
    from qwen3export.quant import quantized_names
    from qwen3export.weights import expected_tensors

    shapes = expected_tensors(spec)
    return [(n, shapes[n]) for n in quantized_names(spec)]


def test_int4_engine_runs_like_eager_on_the_dequantized_weights(int4_tiny, capsys):
    spec, source, _ = resolve("tiny")
    config = QuantConfig("int4", 32, quantize_lm_head=True, accuracy_level=4)
    reference = dequantized_reference(spec, QuantizedSource(source, spec, config))
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12]])
    want = greedy_generate(reference, reference.empty_cache(2), ids, mask, 6)[0]
    engine = open_engine(int4_tiny)
    got = greedy_generate(engine, engine.empty_cache(2), ids, mask, 6)[0]
    assert torch.equal(got, want)
    # the quantized decoder computes what the fp32-activation reference does (graphs/quantized.py)
    fp_config = QuantConfig("int4", 32, quantize_lm_head=True)
    fp_reference = dequantized_reference(spec, QuantizedSource(source, spec, fp_config))
    qmodel = build_quantized(spec, source, fp_config)
    assert torch.equal(greedy_generate(qmodel, qmodel.empty_cache(2), ids, mask, 6)[0],
                       greedy_generate(fp_reference, fp_reference.empty_cache(2), ids, mask, 6)[0])
    # `run` and `verify` on the artifact
    code, out, _ = cli(capsys, "run", int4_tiny.path, "--prompt-ids", "5,6,7,8,9,10", "--max-new-tokens", "6",
                          "--greedy", "--json")
    assert code == 0 and json.loads(out)["tokens"] == want[0].tolist()
    report = verify_artifact(int4_tiny)
    assert report["passed"] and report["quantization"]["top1_agreement"] == \
        int4_tiny.manifest["parity"]["quantization"]["top1_agreement"]
    code, out, _ = cli(capsys, "inspect", int4_tiny.path)
    assert code == 0 and "int4 g32 (rtn), lm_head quantized" in out and "quantized vs unquantized" in out


def _greedy_against_the_dequantized_model(artifact, model, config: QuantConfig, **overrides):
    """The engine's greedy tokens equal eager PyTorch's on quant.dequantize's weights (the parity gate's reference,
    rebuilt here from the model and config, not read from the artifact)."""
    spec, source, _ = resolve(model, **overrides)
    reference = dequantized_reference(spec, QuantizedSource(source, spec, config))
    ids, mask = left_pad([[5, 6, 7, 8, 9, 10], [11, 12]])
    want = greedy_generate(reference, reference.empty_cache(2), ids, mask, 8)[0]
    engine = open_engine(artifact)
    assert torch.equal(greedy_generate(engine, engine.empty_cache(2), ids, mask, 8)[0], want)


def test_int4_build_of_a_checkpoint_whose_hidden_size_is_off_the_group(tmp_path, capsys):
    """`build --model FOLDER --quant int4 --group-size 32` on a Hugging Face folder with hidden_size 72 (= 2 x 32 +
    8): q/k/v/gate/up and the lm_head get a partial last group (MatMulNBits' padded last block) instead of a
    refusal; the engine passes its parity gate and greedy-decodes like the dequantized model."""
    from qwen3export.weights import save_hf_checkpoint

    spec, source, _ = resolve("tiny", hidden_size=72)
    folder = save_hf_checkpoint(spec, source, tmp_path / "tiny-h72")
    code, _, err = cli(capsys, "build", "--model", folder, "--quant", "int4", "--group-size", "32",
                       "--int4-accuracy", "4", "--artifact", tmp_path / "a")  # the lm_head quantized: int4's default
    assert code == 0, err
    a = load_artifact(tmp_path / "a")
    q, p = a.manifest["quantization"], a.manifest["parity"]
    assert (q["mode"], q["group_size"], q["linears"]) == ("int4", 32, 7 * spec.num_hidden_layers + 1)
    assert p["passed"] and p["greedy_match"] and p["logits_scaled_median"] < 1e-4
    nbits = [n for n in onnx.load(str(a.file("decoder.onnx")), load_external_data=False).graph.node
             if n.op_type == "MatMulNBits"]
    assert len(nbits) in linear_nodes(spec, 1) and {72, 128} <= {
        next(at.i for at in n.attribute if at.name == "K") for n in nbits}
    # 72 = 2 x 32 + 8: MatMulNBits quantizes the partial last block of A over its 8 real columns
    _greedy_against_the_dequantized_model(a, folder, QuantConfig("int4", 32, quantize_lm_head=True, accuracy_level=4))


@pytest.mark.parametrize("onnx_ops", ["ort", "standard"])
def test_int4_moe_build_with_partial_groups(onnx_ops, tmp_path):
    """tiny-moe with hidden 72 and moe_intermediate 40 under int4 g32 (pipeline.build with preset overrides):
    the experts' QMoE (ort) or DequantizeLinear + dense MoE (standard) with partial last groups along H and I."""
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build

    overrides = {"hidden_size": 72, "moe_intermediate_size": 40}
    result, = build(BuildOptions.of(model="tiny-moe", overrides=overrides, quant="int4", group_size=32,
                                 int4_accuracy=4 if onnx_ops == "ort" else None, onnx_ops=onnx_ops,
                                 artifact=tmp_path / "moe"))
    a = load_artifact(result.path)
    p = a.manifest["parity"]
    assert p["passed"] and p["greedy_match"] and p["logits_scaled_median"] < 1e-4
    spec = preset("tiny-moe")
    ops = op_counts(a)
    level = 4 if onnx_ops == "ort" else 0  # asked for ort; standard's default (its experts run fp32)
    assert a.manifest["quantization"]["accuracy_level"] == level
    if onnx_ops == "ort":
        assert ops["com.microsoft::QMoE"] == len(spec.moe_layers)
        # 72 and 40 are not multiples of the block (32): QMoE dequantizes, fp32 activations in the experts
        assert p["quant_gate"]["expert_weights"] == 0 and set(accuracy_levels(a)) == {4}
    else:  # the lm_head quantized too (int4's default)
        assert ops["::DequantizeLinear"] in linear_nodes(spec, 2 * len(spec.moe_layers) + 1)
    _greedy_against_the_dequantized_model(a, "tiny-moe", QuantConfig("int4", 32, quantize_lm_head=True,
                                                                     accuracy_level=level), **overrides)


def _fails(artifact, reference) -> dict:
    """check_engine_parity of the artifact's engine against `reference`, expected to fail: the report."""
    from qwen3export.quant_parity import check_engine_parity

    engine = open_engine(artifact)
    report = check_engine_parity(engine, engine.empty_cache(2), reference)
    # the plain reference is gated at the fp32 bound, an emulating one on its median row: every row is off
    assert not report["passed"] and any("logits scaled error" in f for f in report["failures"]), report["failures"]
    assert report["logits_scaled_median"] > 1e-3
    return report


def test_int4_level_4_gate_fails_when_the_reference_computes_something_else(int4_tiny, monkeypatch):
    """The emulation is what makes the level-4 engine pass: against the same weights with fp32 activations, or
    with the activations quantized per row instead of per MatMulNBits block (a wrong scale), the gate fails."""
    import qwen3export.quant_parity as qp

    spec, source, _ = resolve("tiny")
    qsource = QuantizedSource(source, spec, QuantConfig("int4", 32, quantize_lm_head=True))  # level 0
    assert dequantized_reference(spec, qsource).quant_gate["kind"] == "dequantized-weights"
    _fails(int4_tiny, dequantized_reference(spec, qsource))
    per_row = qp.quantize_activation_int8_blocks
    monkeypatch.setattr(qp, "quantize_activation_int8_blocks", lambda x, block: per_row(x, x.shape[-1]))
    level4 = QuantizedSource(source, spec, artifact_quant_config(int4_tiny))
    _fails(int4_tiny, dequantized_reference(spec, level4))


def test_int4_level_0_and_fp_lm_head_opt_out(built_artifact):
    """`--int4-accuracy 0 --no-quantize-lm-head`: MatMulNBits at level 0 without the lm_head, recorded so, gated
    against the plain dequantized reference; and that engine fails against the level-4 (emulating) reference."""
    a = load_artifact(built_artifact("--model", "tiny", "--quant", "int4", "--group-size", "32", "--int4-accuracy", "0",
                                     "--no-quantize-lm-head"))
    spec = preset("tiny")
    q, p = a.manifest["quantization"], a.manifest["parity"]
    assert (q["accuracy_level"], q["quantize_lm_head"], q["linears"]) == (0, False, 7 * spec.num_hidden_layers)
    assert set(accuracy_levels(a)) == {0}  # every MatMulNBits (however many a fused q/k/v or gate/up leaves)
    assert p["passed"] and p["quant_gate"]["kind"] == "dequantized-weights" and "emulated" not in p["reference"]
    spec, source, _ = resolve("tiny")
    emulating = QuantizedSource(source, spec, QuantConfig("int4", 32, accuracy_level=4))
    _fails(a, dequantized_reference(spec, emulating))


def test_int4_moe_level_4_experts_run_int8_activations(built_artifact):
    """tiny-moe int4 g32 on CPU: H 64 and I 32 are multiples of QMoE's block (32), so QMoE runs its experts
    through the MatMulNBits int8 kernels at level 4; the gate's reference quantizes the experts' inputs too
    (realistic, trained-statistics weights), and with the experts left fp32 the gate fails."""
    from qwen3export.graphs.decoder import SparseMoeBlock

    a = load_artifact(built_artifact("--model", "tiny-moe", "--quant", "int4", "--group-size", "32", "--int4-accuracy",
                                     "4"))
    spec = preset("tiny-moe")
    p = a.manifest["parity"]
    assert a.manifest["quantization"]["accuracy_level"] == 4 and set(accuracy_levels(a)) == {4}
    assert op_counts(a)["com.microsoft::QMoE"] == len(spec.moe_layers)
    assert p["passed"] and p["greedy_match"] and p["logits_scaled_median"] < 1e-4
    assert (p["quant_gate"]["kind"], p["quant_gate"]["expert_weights"]) == ("emulated-int8-activations",
                                                                             2 * len(spec.moe_layers))
    spec, source, _ = resolve("tiny-moe")
    reference = dequantized_reference(spec, QuantizedSource(source, spec, artifact_quant_config(a)))
    for m in reference.modules():
        if isinstance(m, SparseMoeBlock):
            del m.forward  # the class's forward again: the linears still emulated, the experts fp32
    _fails(a, reference)


def test_moe_int8_standard_flavour(tmp_path, capsys):
    """tiny-moe int8 (per channel) with --onnx-ops standard: DequantizeLinear-21 + MatMul, experts dequantized
    into the dense MoE; the runner keeps ORT's DQ+MatMul -> MatMulNBits fusion at accuracy level 0, so the
    fp32 gate holds."""
    out = tmp_path / "moe"
    code, _, err = cli(capsys, "build", "--quant", "int8", "--onnx-ops", "standard", "--artifact", out)
    assert code == 0, err
    a = load_artifact(out)
    spec = preset("tiny-moe")
    q = a.manifest["quantization"]
    assert (q["mode"], q["group_size"], q["moe_blocks"], q["quantize_lm_head"]) == ("int8", None,
                                                                                   len(spec.moe_layers), False)
    ops = op_counts(a)
    assert not any(k.startswith("com.microsoft") for k in ops)
    assert ops["::DequantizeLinear"] in linear_nodes(spec, 2 * len(spec.moe_layers))
    p = a.manifest["parity"]
    assert p["passed"] and p["logits_max_abs"] < 1e-4
    assert min(r["overlap"] for r in p["quantization"]["router_topk_agreement"].values()) > 0.6


def test_awq_folder_builds_as_it_is(tmp_path, capsys):
    spec = preset("tiny")
    folder = tmp_path / "tiny-awq"
    folder.mkdir()
    qc = {"quant_method": "awq", "bits": 4, "group_size": 32, "zero_point": True, "version": "gemm"}
    _write_checkpoint(folder, spec, qc)
    code, _, err = cli(capsys, "build", "--model", folder, "--quant", "int8", "--artifact", tmp_path / "no")
    assert code == 2 and "already quantized (awq int4)" in err and not (tmp_path / "no").exists()
    code, out, err = cli(capsys, "build", "--model", folder, "--artifact", tmp_path / "a")
    assert code == 0, err
    a = load_artifact(tmp_path / "a")
    q = a.manifest["quantization"]
    assert (q["mode"], q["group_size"], q["scheme"]) == ("int4", 32, "awq")
    assert a.manifest["parity"]["passed"]
    assert "not run" in out and "pre-quantized awq" in a.manifest["parity"]["quantization"]["not_run"]
    # asymmetric AWQ zero points reach MatMulNBits as its zero_points input
    model = onnx.load(str(a.file("decoder.onnx")), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) in linear_nodes(spec) and all(len(n.input) == 4 for n in nbits)


@pytest.mark.parametrize("argv,needles", [
    (["--target", "a100", "--quant", "fp8", "--backend", "onnx,kernels"], ["target a100 (sm_80) cannot run --quant fp8",
                                                                          "sm_89", "h100"]),
    (["--quant", "fp8"], ["--quant fp8 covers dense models only", "tiny-moe", "--model tiny"]),
    (["--model", "tiny", "--quant", "int4", "--backend", "aoti"], ["--backend aoti cannot take a quantized model"]),
    (["--model", "tiny", "--quant", "int4", "--group-size", "48"], ["--group-size 48 must be a power of two"]),
    (["--model", "tiny", "--quantize-lm-head"], ["--quantize-lm-head needs --quant"]),
])
def test_refusals_are_one_line(argv, needles, capsys, tmp_path):
    code, _, err = cli(capsys, "build", *argv, "--out", tmp_path / "o")
    lines = [line for line in err.strip().splitlines() if line]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("qwen3export: error: "), err
    for n in needles:
        assert n in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_quantized_kernel_pack_plan():
    """The pack of a quantized build compiles the kernels the model runs: wq_matmul once per weight layout
    and fused_moe_wq in place of fused_moe for int4 (moe_align at fused_moe_wq's BLOCK_M); fp8_matmul for fp8
    on h100; nothing is cross-compiled here (tests/test_kernel_backend_build.py covers compiling)."""
    from qwen3export.autotune.tables import select_configs
    from qwen3export.backends.kernel_pack import plan_jobs, quantized_selection
    from qwen3export.kernels.fused_moe_wq import DEFAULT_CONFIG
    from qwen3export.targets import get_target

    h100 = get_target("h100")
    spec = preset("tiny-moe")
    record = QuantConfig("int4", 32).to_dict()
    selection = quantized_selection(select_configs(h100, spec, "bf16", missing="default"), spec, h100, record)
    kernels = [e["kernel"] for e in selection]
    assert "fused_moe" not in kernels and {"wq_matmul", "fused_moe_wq", "moe_align"} <= set(kernels)
    jobs = plan_jobs(selection, spec, "bf16", h100.compute_capability, record)
    wq = [j for j in jobs if j["kernel"] == "wq_matmul"]
    assert {j["shape"]["bits"] for j in wq} == {4} and all(j["shape"]["group"] == 32 for j in wq)
    assert len({j["dir"] for j in jobs}) == len(jobs)  # every function in its own folder
    align = [j for j in jobs if j["kernel"] == "moe_align"]
    assert {j["shape"]["block_m"] for j in align} == {DEFAULT_CONFIG["BLOCK_M"]}
    tiny = preset("tiny")
    fp8 = quantized_selection(select_configs(h100, tiny, "bf16", missing="default"), tiny, h100,
                              QuantConfig("fp8").to_dict())
    assert "fp8_matmul" in [e["kernel"] for e in fp8]
    assert json.dumps(fp8)  # the manifest's kernels entry stays JSON


# Qwen3-0.6B's layer shapes (hidden 1024, MLP 3072, 16 x 128 query heads) with trained statistics, two layers and a
# 4,096-token vocabulary so that it builds in seconds: wide enough that level 4's int8 rounding flips compound
CHAOTIC = {"num_hidden_layers": 2, "vocab_size": 4096, "bos_token_id": 1, "eos_token_ids": (2,),
           "think_token_id": None, "end_think_token_id": None}


def test_int4_level_4_gate_is_measured_from_the_reference_noise_floor(tmp_path):
    """At real widths the int8 rounding of level 4 is chaotic: the emulating reference nudged by one ulp moves far
    beyond the fp32 bound, so the build measures that floor (quant_parity.noise_floor) and gates the engine at
    twice it. The CPU default (level 4) builds and passes; the same engine checked against another seed's weights
    fails that gate."""
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build
    from qwen3export.quant_parity import NOISE_FLOOR_FACTOR, check_engine_parity

    out = tmp_path / "a"
    build(BuildOptions.of(model="qwen3-0.6b", artifact=out, overrides=CHAOTIC, quant="int4"))
    a = load_artifact(out)
    assert a.manifest["quantization"]["accuracy_level"] == 4 and set(accuracy_levels(a)) == {4}
    p = a.manifest["parity"]
    floor, least = p["noise_floor"], THRESHOLDS["int8_activations"]
    assert p["passed"], p["failures"]
    assert floor["draws"] == 2 and floor["logits_scaled_median"] > 10 * least["logits_scaled_median"]
    assert p["thresholds"]["logits_scaled_median"] == NOISE_FLOOR_FACTOR * floor["logits_scaled_median"]
    assert p["thresholds"]["logits_scaled"] == max(least["logits_scaled"],
                                                   NOISE_FLOOR_FACTOR * floor["logits_scaled_err"])
    assert p["logits_scaled_median"] > least["logits_scaled_median"]  # the correct engine is off by more than fp32
    spec, source, _ = resolve("qwen3-0.6b", seed=1, **CHAOTIC)
    other = dequantized_reference(spec, QuantizedSource(source, spec, artifact_quant_config(a)))
    engine = open_engine(a)
    report = check_engine_parity(engine, engine.empty_cache(2), other)
    assert not report["passed"] and report["logits_scaled_median"] > p["thresholds"]["logits_scaled_median"]
