"""Weight-free capture and streamed emission (qwen3export/streaming.py): the decoder captured on the meta
device, exported to ONNX without weights, its initializers bound to per-tensor loaders that run only while the
external data is written; the engine equals the eager model built the ordinary way."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from qwen3export.backends.onnx import io_names
from qwen3export.capture import dynamic_shapes, example_inputs
from qwen3export.model import build_module, resolve
from qwen3export.streaming import META, bind_lazy_initializers, emission_bound, meta_decoder, parameter_loaders


def _meta_capture(spec):
    m = meta_decoder(spec, torch.float32)
    ids, pos, mask, cache = example_inputs(m)
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
