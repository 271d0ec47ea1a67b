"""Weight-free capture and streamed emission (qwen3export/streaming.py): the decoder captured on the meta
device, exported to ONNX without weights, its initializers bound to per-tensor loaders that run only while the
external data is written; the engine equals the eager model built the ordinary way."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qwen3export.backends.onnx import io_names
from qwen3export.graph_capture import decoder_example_inputs, dynamic_shapes
from qwen3export.model import build_module, resolve
from qwen3export.graph_capture import META, meta_decoder
from qwen3export.streaming import bind_lazy_initializers, emission_bound, parameter_loaders


def _meta_capture(spec):
    m = meta_decoder(spec, torch.float32)
    ids, pos, mask, cache = decoder_example_inputs(m)
    ex = (ids.to(META), pos.to(META), mask.to(META), tuple((k.to(META), v.to(META)) for k, v in cache))
    with torch.no_grad():
        return torch.export.export(m, ex, dynamic_shapes=dynamic_shapes(m), strict=False)


@pytest.mark.parametrize("name,overrides", [("tiny-moe", {}),
                                            ("tiny", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0,
                                                                       "original_max_position_embeddings": 32768}})])
def test_streamed_onnx_equals_eager(name, overrides, tmp_path):
    spec, source, _ = resolve(name, 0, **overrides)
    ep = _meta_capture(spec)
    assert all(t.device.type == "meta" for t in ep.state_dict.values())  # no weight was materialised
    inputs, outputs = io_names(spec)
    program = torch.onnx.export(ep, (), dynamo=True, opset_version=18, input_names=inputs, output_names=outputs,
                                optimize=False, verbose=False)
    calls = []
    loaders = {k: (lambda f=f, k=k: calls.append(k) or f()) for k, f in parameter_loaders(spec, source,
                                                                                       torch.float32).items()}
    bound = bind_lazy_initializers(program.model, loaders)
    assert bound == len(program.model.graph.initializers) - sum(
        1 for v in program.model.graph.initializers.values() if v.name not in loaders) and not calls
    program.save(str(tmp_path / "decoder.onnx"), external_data=True)
    assert len(calls) == bound  # each loader ran once, while saving
    session = ort.InferenceSession(str(tmp_path / "decoder.onnx"), providers=["CPUExecutionProvider"])
    eager = build_module(spec, source, torch.float32)
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pos = torch.arange(40_000, 40_005)[None] if overrides else torch.arange(5)[None]
    mask = torch.ones_like(ids)
    feeds = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
    for i, (k, v) in enumerate(eager.empty_cache(1)):
        feeds[f"past_key_values.{i}.key"], feeds[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
    got = session.run(["logits"], feeds)[0]
    with torch.no_grad():
        want = eager(ids, pos, mask, eager.empty_cache(1))[0].numpy()
    assert np.abs(got - want).max() <= 1e-4


def test_emission_bound_does_not_grow_with_layers():
    spec, _, _ = resolve("qwen3-30b-a3b", 0)
    a = emission_bound(spec.replace(num_hidden_layers=2), torch.bfloat16)
    b = emission_bound(spec.replace(num_hidden_layers=48), torch.bfloat16)
    assert a == b and a["largest_parameter_bytes"] == 128 * 2 * 768 * 2048 * 2  # one layer's stacked gate_up
    assert a["bound_bytes"] == (2 << 30) + 3 * a["largest_parameter_bytes"]


# ---------------------------------------------------------------------- build --stream
def test_meta_decoder_keeps_rope_frequencies_fp32():
    spec, _, _ = resolve("tiny", 0)
    m = meta_decoder(spec, torch.bfloat16)
    assert m.inv_freq.dtype == torch.float32 and m.inv_freq.device.type == "meta"
    assert m.model.embed_tokens.weight.dtype == torch.bfloat16


def _cli(capsys, *argv):
    from qwen3export.cli import main

    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_streamed_build_without_verify_records_not_run_and_verifies_later(tmp_path, capsys):
    """--stream --no-verify from a sharded safetensors folder (read memory-mapped, tensor by tensor): parity
    recorded as NOT run with the command; that command then passes (the streamed engine equals eager: logits
    within 1e-4, 32 greedy tokens); the ort MoE fc1 is baked lazily."""
    import json

    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build
    from qwen3export.weights import save_hf_checkpoint

    spec, source, _ = resolve("tiny-moe", 0, num_hidden_layers=2)
    folder = save_hf_checkpoint(spec, source, tmp_path / "ckpt", max_shard_bytes=16 << 20)
    assert len(list(folder.glob("*.safetensors"))) > 1
    out = tmp_path / "art"
    result = build(BuildOptions.of(model=str(folder), artifact=out, stream=True, verify=False))[0]
    m = result.manifest
    assert m["parity"] == {"passed": None, "not_run": "--no-verify", "command": f"qwen3export verify {out}"}
    assert m["engine"]["external_data"] and m["engine"]["onnx_ops"] == "ort"
    assert m["engine"]["kv_cache"] == "shared_buffer" and "logits_index" in m["engine"]["inputs"]  # cache in place
    assert m["engine"]["genai_config"] == "genai_config.json" and (out / "genai_config.json").is_file()
    assert m["engine"]["baked_weights"] == sum(spec.layer_is_moe(i) for i in range(2)) >= 1
    assert m["streaming"]["weight_bytes"] == (out / "decoder.onnx.data").stat().st_size
    code, stdout, _ = _cli(capsys, "verify", out, "--json")
    report = json.loads(stdout)
    assert code == 0 and report["passed"] and report["logits_scaled_err"] <= 1e-4 and report["greedy_match"]
    assert report["sampling"]["identical"]


def test_streamed_bf16_build_writes_the_source_weights_and_fp32_rope(tmp_path):
    """bf16 (GPU target, --no-verify only): the external data holds the source tensors cast to bf16, RoPE
    frequencies stay fp32, and the manifest says why parity was not run and offers no command that cannot."""
    import onnx
    from onnx import numpy_helper

    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build

    spec, source, _ = resolve("tiny-moe", 0, num_hidden_layers=1)
    out = tmp_path / "art"
    m = build(BuildOptions.of(model="tiny-moe", target="h100", dtype="bf16", artifact=out, stream=True, verify=False,
                           overrides={"num_hidden_layers": 1}))[0].manifest
    assert m["dtype"] == "bf16" and m["parity"]["passed"] is None and m["parity"]["command"] is None
    assert "bf16" in m["parity"]["not_run"]
    model = onnx.load(str(out / "decoder.onnx"))  # with its external data
    inits = {t.name: t for t in model.graph.initializer}
    assert inits["inv_freq"].data_type == onnx.TensorProto.FLOAT
    emb = inits["model.embed_tokens.weight"]
    assert emb.data_type == onnx.TensorProto.BFLOAT16
    got = torch.from_numpy(numpy_helper.to_array(emb).astype(np.float32))
    assert torch.equal(got, source.get("model.embed_tokens.weight").to(torch.bfloat16).float())


@pytest.mark.parametrize("argv,needle", [
    (["--stream", "--quant", "int4"], "--stream cannot go with --quant int4"),
    (["--stream", "--tp", "2"], "--stream cannot go with --tp/--ep"),
    (["--stream", "--backend", "aoti"], "--stream emits the onnx backend only"),
    (["--stream", "--target", "h100", "--dtype", "bf16"], "pass --no-verify"),
    (["--stream", "--dtype", "bf16", "--no-verify"], "target cpu cannot run dtype bf16"),
    (["--no-verify"], "--no-verify applies to --stream and --tp/--ep builds only"),
])
def test_stream_refusals_are_one_line_before_any_work(tmp_path, capsys, argv, needle):
    code, _, err = _cli(capsys, "build", "--model", "tiny-moe", "--artifact", tmp_path / "art", *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
    assert not list(tmp_path.iterdir())
