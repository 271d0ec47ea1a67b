"""Shared by the ONNX translation tests: export a lowered program with a translation table, and step the
result in ONNX Runtime's CPU provider with the runner's feed convention (without an artifact)."""

from __future__ import annotations

import onnxruntime as ort
import torch

from qwen3export.backends.onnx import export_program, io_names
from qwen3export.cache_engine import CacheEngine, is_shared_buffer

PROMPTS = [[151644, 872, 198, 9707, 11, 151667], [5, 6, 7]]  # left padding in row 1


def export(ep, spec, table: dict, opset: int):
    """emit_decoder's export (backends/onnx.export_program), with the given translation table and opset."""
    return export_program(ep, spec, table, opset)


def OrtStep(path, spec, config: dict[str, str] | None = None, max_batch: int = 2, max_seq: int = 64):  # noqa: N802
    """The decoder over an ONNX Runtime CPU session, one thread (`config` adds session config entries), as the
    runner steps it: a CacheEngine for a shared-buffer decoder (the ort flavour), else a concatenating step."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.log_severity_level = 1, 3
    for key, value in (config or {}).items():
        opts.add_session_config_entry(key, value)
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    if is_shared_buffer(session):
        return CacheEngine(spec, session, ["CPUExecutionProvider"], max_batch, max_seq)
    return ConcatStep(session, spec)


class ConcatStep:
    """A decoder step (ids, pos, mask, past) -> (logits, present) over a concatenating decoder's session."""

    def __init__(self, session, spec):
        self.session = session
        self.layers, self.outputs = spec.num_hidden_layers, io_names(spec)[1]

    def __call__(self, ids, pos, mask, past):
        feed = {"input_ids": ids.numpy(), "position_ids": pos.numpy(), "attention_mask": mask.numpy()}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"], feed[f"past_key_values.{i}.value"] = k.numpy(), v.numpy()
        out = [torch.from_numpy(o) for o in self.session.run(self.outputs, feed)]
        return out[0], tuple((out[1 + 2 * i], out[2 + 2 * i]) for i in range(self.layers))
