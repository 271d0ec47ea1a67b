"""Runner: loads an artifact's decoder into ONNX Runtime (or AOTInductor) and steps it.

Two kinds of engine: `CacheEngine` (cache_engine.py; the ort flavour) owns its KV cache, one buffer per layer
at the artifact's max batch x max sequence, updated in place, and steps slots: prefill(slots, prompts) /
decode(slots, tokens). `OnnxEngine` (the standard flavour) and AOTInductor have the decoder's signature
(ids, pos, mask, past) -> (logits, present) like eager PyTorch. The generation loop (generation.py) drives both.
"""

from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import numpy as np
import torch

from qwen3export.graphs.sampling import SamplingGraph, SamplingSession, SamplingVocab

from .artifact import Artifact
from .cache_engine import CacheEngine, is_shared_buffer
from .errors import ArtifactError
from .memory_plan import DEFAULT_SERVING_SEQ
from .spec import ModelSpec


def available_providers(wanted: list[str] | tuple[str, ...]) -> list[str]:
    """The target's ONNX Runtime providers that this installation has, CPU last as the fallback."""
    import onnxruntime as ort  # lazy: onnxruntime loads only for ONNX artifacts (aoti runs skip it)

    have = set(ort.get_available_providers())
    if not _nvidia_driver():  # onnxruntime-gpu lists its CUDA/TensorRT providers whether or not a GPU exists
        have -= set(GPU_PROVIDERS)
    chosen = [p for p in wanted if p in have and p != "CPUExecutionProvider"]
    return chosen + ["CPUExecutionProvider"]


GPU_PROVIDERS = ("TensorrtExecutionProvider", "CUDAExecutionProvider")


@functools.lru_cache(maxsize=1)
def _nvidia_driver() -> bool:
    """Whether the NVIDIA driver library loads here (without it no CUDA provider can create a session, and
    trying prints pages of errors before ONNX Runtime falls back to the CPU)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def onnx_session(artifact: Artifact, threads: int | None = None):
    """ONNX Runtime session over the artifact's decoder.onnx -> (session, providers)."""
    import onnxruntime as ort  # lazy: onnxruntime loads only for ONNX artifacts (aoti runs skip it)

    m = artifact.manifest
    path = artifact.onnx_file(m["engine"]["file"])
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    # ORT fuses DequantizeLinear(int4/int8) + MatMul (the standard flavour) into MatMulNBits, at accuracy
    # level 4 (activations quantized to int8) unless told otherwise: use the artifact's recorded level (quantization
    # accuracy_level) so the engine computes what the parity gate checked (onnxruntime_session_options_config_keys.h)
    opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level",
                                  str((m.get("quantization") or {}).get("accuracy_level", 0)))
    providers = available_providers(m["target"]["ort_providers"])
    try:
        session = ort.InferenceSession(str(path), sess_options=opts, providers=providers)
    except Exception as e:  # onnxruntime raises its own exception types for an unloadable model
        raise ArtifactError(f"ONNX Runtime cannot load {path.name} ({str(e).splitlines()[0]}); rebuild the "
                            "artifact") from None
    return session, providers


def _dtypes(artifact: Artifact):
    np_dtype = {"fp32": np.float32, "fp16": np.float16}.get(artifact.manifest["dtype"], np.float32)
    return np_dtype, torch.from_numpy(np.zeros(0, np_dtype)).dtype


class OnnxEngine:
    """An ONNX Runtime session over a decoder.onnx whose cache grows by concatenation (the standard flavour):
    a generation.Step, (ids, pos, mask, past) -> (logits, present), fed numpy arrays each step."""

    def __init__(self, artifact: Artifact, threads: int | None = None, session=None):
        m = artifact.manifest
        self.spec = ModelSpec.from_dict(m["model"]["spec"])
        self.session, self.providers = session or onnx_session(artifact, threads)
        self.outputs = [o.name for o in self.session.get_outputs()]
        self.np_dtype, self.torch_dtype = _dtypes(artifact)

    def empty_cache(self, batch: int) -> tuple:
        s = self.spec
        z = torch.zeros(batch, s.num_key_value_heads, 0, s.head_dim, dtype=self.torch_dtype)
        return tuple((z, z) for _ in range(s.num_hidden_layers))

    def __call__(self, input_ids, position_ids, attention_mask, past):
        feed = {"input_ids": input_ids.numpy(), "position_ids": position_ids.numpy(),
                "attention_mask": attention_mask.numpy()}
        for i, (k, v) in enumerate(past):
            feed[f"past_key_values.{i}.key"] = k.numpy()
            feed[f"past_key_values.{i}.value"] = v.numpy()
        out = self.session.run(self.outputs, feed)
        logits = torch.from_numpy(out[0]).float()  # an fp16 engine's logits: the sampling graph takes fp32
        present = tuple((torch.from_numpy(out[1 + 2 * i]), torch.from_numpy(out[2 + 2 * i]))
                        for i in range(self.spec.num_hidden_layers))
        return logits, present


def open_engine(artifact: Artifact, threads: int | None = None):
    """The artifact's decoder as a step callable: ONNX Runtime session or AOTInductor package."""
    if artifact.backend in ("onnx", "tensorrt"):  # a tensorrt artifact carries its verified fp32 ONNX
        session = onnx_session(artifact, threads)
        if is_shared_buffer(session[0]):  # the ort flavour: backends/onnx.py share_kv_buffer
            serving = artifact.manifest.get("serving") or {}
            return CacheEngine(ModelSpec.from_dict(artifact.manifest["model"]["spec"]), *session,
                               serving.get("max_batch", 1), serving.get("max_seq", DEFAULT_SERVING_SEQ),
                               _dtypes(artifact)[0])
        return OnnxEngine(artifact, threads, session)
    if artifact.backend == "aoti":
        from .backends.aoti import AotiEngine  # lazy: AOTInductor's package loader, for aoti artifacts only

        if threads:
            torch.set_num_threads(threads)
        return AotiEngine(artifact, ModelSpec.from_dict(artifact.manifest["model"]["spec"]))
    raise ArtifactError(f"artifact {Path(artifact.path).name} has backend {artifact.backend!r}, which does not "
                        "run on this machine (`run`/`verify` execute onnx and aoti artifacts)")


def sampling_pair(artifact: Artifact, threads: int | None = None, engine=None):
    """(torch SamplingGraph, the artifact's own sampler: ONNX Runtime session or AOTInductor package)."""
    entry = artifact.manifest["sampling"]
    spec = ModelSpec.from_dict(artifact.manifest["model"]["spec"])
    graph = SamplingGraph(SamplingVocab.from_spec(spec), entry["early_stop_ids"])
    if artifact.backend == "aoti":
        return graph, (engine or open_engine(artifact, threads)).sampler
    session = SamplingSession(artifact.onnx_file(entry["file"]), available_providers(
        artifact.manifest["target"]["ort_providers"]), threads)
    return graph, session
