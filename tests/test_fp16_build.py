"""fp16 engines of a model with massive activations (issue 15): where fp16 would overflow, that the graph keeps
those places in fp32, and that `build --dtype fp16` (GPU targets: onnx verified here in ONNX Runtime's CPU
provider, TensorRT built strongly typed from the same ONNX) stays finite and within the fp16 bound."""

from __future__ import annotations

import json

import onnx
import pytest
import torch

from qwen3export.backends import tensorrt as trt_backend
from qwen3export.cli import main
from qwen3export.generation import left_pad, position_ids_from_mask
from qwen3export.model import build_module, resolve
from qwen3export.parity import THRESHOLDS, parity_prompts


def _residuals(model, ids, mask):
    """Each layer's output residual stream [B, S, H] (forward hooks)."""
    out = []
    hooks = [layer.register_forward_hook(lambda m, a, o: out.append(o[0])) for layer in model.model.layers]
    with torch.no_grad():
        logits, _ = model(ids, position_ids_from_mask(mask), mask, model.empty_cache(ids.shape[0]))
    for h in hooks:
        h.remove()
    return logits, out


def test_fp16_overflows_where_the_graph_keeps_fp32():
    """tiny (trained statistics) carries residual values ~1,500: their sum of squares, which RMSNorm takes,
    is past fp16's 65,504, so a norm computed in fp16 is inf. The fp16 decoder keeps the residual stream in
    fp32 and the norms' statistics in fp32: every logit stays finite."""
    spec, source, _ = resolve("tiny")
    ids, mask = left_pad(parity_prompts(spec.vocab_size))
    ids[0, 2] = 11  # a delimiter: the massive activations fire there
    fp32 = build_module(spec, source, torch.float32)
    _, res32 = _residuals(fp32, ids, mask)
    massive = res32[-1].abs().amax()
    assert massive > 1000
    assert torch.isinf(res32[-1].half().float().pow(2).half().sum(-1)).any()  # naive fp16 RMSNorm: inf
    fp16 = build_module(spec, source, torch.float16)
    logits, res16 = _residuals(fp16, ids, mask)
    assert res16[-1].dtype == torch.float32 and logits.dtype == torch.float16
    assert torch.isfinite(logits).all()
    ref, _ = _residuals(fp32, ids, mask)
    real = mask.bool()
    err = ((logits.float() - ref)[real].abs().amax(-1) / ref[real].abs().amax(-1).clamp(min=1)).max()
    assert err < THRESHOLDS["fp16"]["logits_scaled"]


@pytest.fixture(scope="module")
def fp16_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("fp16")
    code = main(["build", "--model", "tiny", "--target", "a100", "--backend", "onnx,tensorrt", "--dtype", "fp16",
                 "--out", str(out)])
    assert code == trt_backend.EXIT_PENDING  # onnx built and verified; the TensorRT plan needs TensorRT
    return out


def test_fp16_onnx_engine_is_fp16_finite_and_gated(fp16_build, capsys):
    folder = fp16_build / "tiny-a100-onnx"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["dtype"] == "fp16"
    p = m["parity"]
    assert p["passed"] and p["dtype"] == "fp16" and p["thresholds"] == THRESHOLDS["fp16"]
    assert p["prefill"]["finite"] == p["decode"]["finite"] == {"engine": True, "reference": True}
    assert p["logits_scaled_err"] <= THRESHOLDS["fp16"]["logits_scaled"]
    assert p["top1_agreement"] >= THRESHOLDS["fp16"]["top1_agreement"]
    model = onnx.load(str(folder / "decoder.onnx"))
    # every matrix (the exporter folds the linears' transposes into unnamed initializers) is fp16
    matrices = [i for i in model.graph.initializer if len(i.dims) >= 2]
    assert len(matrices) >= 4 * m["model"]["spec"]["num_hidden_layers"]  # qkv, o, gate_up, down (fused projections)
    assert all(i.data_type == onnx.TensorProto.FLOAT16 for i in matrices)
    # the norms' statistics are fp32: every ReduceMean (RMSNorm's mean of squares) reads fp32 values
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in (*inferred.graph.value_info, *inferred.graph.input)}
    means = [n for n in inferred.graph.node if n.op_type == "ReduceMean"]
    assert len(means) >= 2 * m["model"]["spec"]["num_hidden_layers"] + 1
    assert {types.get(n.input[0]) for n in means} == {onnx.TensorProto.FLOAT}
    code = main(["run", str(folder), "--prompt-ids", "1,11,2,3", "--max-new-tokens", "6", "--greedy", "--json"])
    out = capsys.readouterr().out
    assert code == 0 and len(json.loads(out)["tokens"]) >= 1
    assert main(["verify", str(folder)]) == 0  # against fp32 eager, at the fp16 bound


def test_fp16_tensorrt_recipe_is_strongly_typed(fp16_build):
    folder = fp16_build / "tiny-a100-tensorrt"
    m = json.loads((folder / "manifest.json").read_text())
    assert m["dtype"] == "fp16" and m["parity"]["passed"]
    settings = json.loads((folder / trt_backend.SETTINGS_FILE).read_text())
    # TensorRT forbids precision flags on a strongly typed network: the ONNX's own types rule
    assert settings["strongly_typed"] is True and settings["builder_flags"] == []


@pytest.mark.parametrize("argv,needle", [
    (["--target", "a100", "--dtype", "bf16"], "--dtype bf16 cannot go with --backend onnx"),
    (["--target", "a100", "--dtype", "fp16", "--onnx-ops", "ort"], "--dtype fp16 cannot go with --onnx-ops ort"),
    (["--target", "a100", "--dtype", "fp16", "--quant", "int8"], "--dtype fp16 cannot go with --quant int8"),
    (["--dtype", "fp16"], "target cpu cannot run dtype fp16"),
])
def test_refusals(argv, needle, tmp_path, capsys):
    code = main(["build", "--model", "tiny", *argv, "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and needle in err[0], err
    assert not (tmp_path / "o").exists()
