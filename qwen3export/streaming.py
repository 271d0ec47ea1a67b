"""Weight-free capture and streamed emission: no full model ever exists in this process's memory.

The decoder is built on the meta device (shapes and dtypes only), captured and lowered there, and exported to
ONNX without weights; then every initializer is bound to a lazy loader that produces its tensor from the
weight source (safetensors, memory-mapped, or a preset's per-tensor random generator) only when the ONNX
file's external data is written, one tensor at a time (onnx_ir writes initializers in turn and drops each one
after writing). Peak memory of emission is therefore about the largest single parameter (a stacked-experts
tensor of one MoE layer, or the embedding) plus its layout transform, not the model: see `emission_bound`.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from qwen3export.graphs.decoder import Qwen3Decoder
from qwen3export.graphs.rope import rope_parameters

from .errors import ConfigError
from .spec import ModelSpec
from .weights import WeightSource, check_names, module_assignments

META = torch.device("meta")


def meta_decoder(spec: ModelSpec, dtype: torch.dtype) -> Qwen3Decoder:
    """The decoder with every parameter and buffer on the meta device (nothing allocated)."""
    with META:
        module = Qwen3Decoder(spec)
    return module.to(dtype).eval()


def parameter_loaders(spec: ModelSpec, source: WeightSource, dtype: torch.dtype
                      ) -> dict[str, Callable[[], torch.Tensor]]:
    """Decoder parameter/buffer name -> a function producing its tensor (CPU, `dtype`) from `source`.
    Stacked expert tensors are assembled one expert at a time into one output buffer."""
    check_names(spec, source)
    loaders: dict[str, Callable[[], torch.Tensor]] = {}
    for pname, rows, stacked in module_assignments(spec):
        if not stacked:
            loaders[pname] = (lambda name=rows[0][0]: source.get(name).to(dtype))
            continue

        def stack(rows=rows) -> torch.Tensor:
            first = torch.cat([source.get(n).to(dtype) for n in rows[0]], 0)
            out = torch.empty((len(rows), *first.shape), dtype=dtype)
            out[0] = first
            for e, names in enumerate(rows[1:], 1):
                out[e] = torch.cat([source.get(n).to(dtype) for n in names], 0)
            return out

        loaders[pname] = stack
    if spec.tie_word_embeddings:
        loaders["lm_head.weight"] = loaders["model.embed_tokens.weight"]
    loaders["inv_freq"] = lambda: rope_parameters(spec.head_dim, spec.rope_theta, spec.rope_scaling)[0].to(
        torch.float32)
    return loaders


def _numpy(t: torch.Tensor) -> np.ndarray:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: onnx_ir takes the raw bits
        return t.view(torch.uint16).numpy()
    return t.numpy()


def bind_lazy_initializers(model, loaders: dict[str, Callable[[], torch.Tensor]]) -> int:
    """Replace every initializer exported from meta tensors with an onnx_ir LazyTensor calling its loader.

    The torch ONNX exporter names initializers by the parameter/buffer's qualified name (FQN); an initializer
    whose name has no loader and no data is an error (nothing would be written for it)."""
    import onnx_ir as ir

    bound = 0
    for name, value in model.graph.initializers.items():
        tensor = value.const_value
        raw = getattr(tensor, "raw", None)
        if not (isinstance(raw, torch.Tensor) and raw.device.type == "meta"):
            continue
        loader = loaders.get(name)
        if loader is None:
            raise ConfigError(f"exported initializer {name} has no weight loader; the graph and the weight "
                              "mapping (weights.module_assignments) disagree")
        shape, dtype = tuple(raw.shape), tensor.dtype

        def produce(loader=loader, shape=shape, dtype=dtype, name=name):
            t = loader().contiguous()
            if tuple(t.shape) != shape:
                raise ConfigError(f"weight {name} has shape {tuple(t.shape)}, the graph expects {shape}")
            return ir.tensor(_numpy(t), dtype=dtype, name=name)

        value.const_value = ir.LazyTensor(produce, dtype=dtype, shape=ir.Shape(shape), name=name)
        bound += 1
    return bound


def emission_bound(spec: ModelSpec, dtype: torch.dtype) -> dict[str, Any]:
    """The stated bound of emission's resident memory: the largest single parameter, twice (a layout
    transform such as the MoE interleave holds input and output), plus a fixed overhead for the interpreter,
    torch, the exporter and the graph."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    largest = 0
    with META:
        module = Qwen3Decoder(spec)
    for p in module.parameters():
        largest = max(largest, p.numel() * itemsize)
    overhead = 2 << 30
    return {"largest_parameter_bytes": largest, "bound_bytes": overhead + 2 * largest,
            "rule": "2 GiB + 2 x the largest parameter (independent of the number of layers)"}
