"""Runner: loads an artifact's ONNX decoder into ONNX Runtime and steps it (prefill, then decode).

The engine step has the decoder's signature, so the generation loop (generation.py) drives eager
PyTorch and engines alike.
"""

from __future__ import annotations

import functools
from pathlib import Path

import numpy as np
import torch

from .artifact import Artifact
from .errors import ArtifactError
from .spec import ModelSpec


def available_providers(wanted: list[str] | tuple[str, ...]) -> list[str]:
    """The target's ONNX Runtime providers that this installation has, CPU last as the fallback."""
    import onnxruntime as ort

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
    import ctypes

    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


class OnnxEngine:
    """An ONNX Runtime session over an artifact's decoder.onnx."""

    def __init__(self, artifact: Artifact, threads: int | None = None):
        import onnxruntime as ort

        m = artifact.manifest
        self.spec = ModelSpec.from_dict(m["model"]["spec"])
        engine = m["engine"]
        path = artifact.onnx_file(engine["file"])
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # ORT fuses DequantizeLinear(int4/int8) + MatMul (the standard flavour) into MatMulNBits, at accuracy
        # level 4 (activations quantized to int8) unless told otherwise: keep them fp so the engine computes
        # what the parity gate checked (onnxruntime_session_options_config_keys.h)
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        self.providers = available_providers(m["target"]["ort_providers"])
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=self.providers)
        except Exception as e:  # onnxruntime raises its own exception types for an unloadable model
            raise ArtifactError(f"ONNX Runtime cannot load {path.name} ({str(e).splitlines()[0]}); rebuild the "
                                "artifact") from None
        self.inputs, self.outputs = engine["inputs"], engine["outputs"]
        self.np_dtype = {"fp32": np.float32, "fp16": np.float16}.get(m["dtype"], np.float32)
        self.torch_dtype = torch.from_numpy(np.zeros(0, self.np_dtype)).dtype

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
        return OnnxEngine(artifact, threads)
    if artifact.backend == "aoti":
        from .backends.aoti import AotiEngine

        if threads:
            torch.set_num_threads(threads)
        return AotiEngine(artifact, ModelSpec.from_dict(artifact.manifest["model"]["spec"]))
    raise ArtifactError(f"artifact {Path(artifact.path).name} has backend {artifact.backend!r}, which does not "
                        "run on this machine (`run`/`verify` execute onnx and aoti artifacts)")


def sampling_pair(artifact: Artifact, threads: int | None = None, engine=None):
    """(torch SamplingGraph, the artifact's own sampler: ONNX Runtime session or AOTInductor package)."""
    from qwen3export.graphs.sampling import SamplingGraph, SamplingSession, SamplingVocab

    entry = artifact.manifest["sampling"]
    spec = ModelSpec.from_dict(artifact.manifest["model"]["spec"])
    graph = SamplingGraph(SamplingVocab.from_spec(spec), entry["early_stop_ids"])
    if artifact.backend == "aoti":
        return graph, (engine or open_engine(artifact, threads)).sampler
    session = SamplingSession(artifact.onnx_file(entry["file"]), available_providers(
        artifact.manifest["target"]["ort_providers"]), threads)
    return graph, session
