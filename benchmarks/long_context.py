"""Long-context decode benchmark: ONNX-engine decode tokens/s vs KV-cache length (1K … 128K) on CPU for
a small YaRN-scaled model. Prints one JSON object.

    python benchmarks/long_context.py [--model tiny] [--layers N] [--lengths 1024,8192,32768,131008] [--steps 16]

The cache is filled with random keys/values of the requested length (a 128K-token prefill of the
reference graph would materialise a 128K x 128K score matrix), then `--steps` tokens are decoded
through the engine at positions just past it. Those figures are measured on this machine.

The default (ort-flavour) engine keeps its cache in place (cache_engine.CacheEngine): the slot's buffer is filled
once and each step reads the weights and the cache once. `roofline` puts each step against the bytes it must
read (the decoder's weights + K and V at that length) over this machine's memory bandwidth, measured in the same
run with a large numpy copy; `roofline_fraction` = roofline ms / measured ms (1.0 = no byte read twice or copied).

`modelled_attention_decode` adds, per GPU target, the attention_decode kernel's time per token at each cache
length for `--gpu-model` (default qwen3-8b: 32 query heads over 8 KV heads, head_dim 128, bf16, batch 1)
with the target's tuned config (autotune tables): the autotune cost model over the config's real compiled
resources (kernels compile). It is labelled `modelled`: no GPU ran it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from qwen3export.generation import SlotDecoder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count (qwen3-0.6b: 2)")
    ap.add_argument("--lengths", default="1024,8192,32768,131008")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="dist/bench")
    ap.add_argument("--gpu-model", default="qwen3-8b", help="model shape of the modelled per-target figures")
    ap.add_argument("--no-modelled", action="store_true", help="skip the modelled per-target figures")
    args = ap.parse_args()

    from qwen3export.artifact import load_artifact
    from qwen3export.graphs.rope import parse_rope_flag
    from qwen3export.manifest import SCHEMA
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build
    from qwen3export.runner import open_engine

    overrides = {"rope_scaling": parse_rope_flag("yarn:4.0")}
    if args.layers:
        overrides["num_hidden_layers"] = args.layers
    out = Path(args.work) / f"{args.model}{f'-{args.layers}l' if args.layers else ''}-yarn4-cpu-onnx"
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("schema") != SCHEMA:
        shutil.rmtree(out)  # this benchmark's own build by an older qwen3export: rebuilt
    if not manifest.is_file():
        build(BuildOptions.of(model=args.model, artifact=out, max_batch=1, overrides=overrides),
              progress=lambda s: print(s, file=sys.stderr, flush=True))
    artifact = load_artifact(out)
    engine = open_engine(artifact, threads=args.threads)
    spec = engine.spec
    weight_bytes = sum(f["size"] for name, f in artifact.manifest["files"].items() if name.startswith("decoder.onnx"))
    bandwidth = copy_bandwidth()
    lengths = [int(x) for x in args.lengths.split(",")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in lengths:
        if length + args.steps > spec.max_positions:
            raise SystemExit(f"cache {length} + {args.steps} steps exceeds {spec.max_positions} positions")
        times, logits = (cached_steps if isinstance(engine, SlotDecoder) else concat_steps)(engine, length, args.steps, g)
        kv_bytes = 2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim * 4 * length
        steady = sorted(times[1:])[len(times[1:]) // 2]  # median, first step (warm-up) excluded
        roofline = (weight_bytes + kv_bytes) / bandwidth
        rows.append({"cache_length": length, "decode_tokens_per_s": round(1 / steady, 2),
                     "median_step_ms": round(steady * 1e3, 3), "kv_cache_bytes": kv_bytes,
                     "weight_bytes": weight_bytes, "roofline_ms": round(roofline * 1e3, 3),
                     "roofline_fraction": round(roofline / steady, 3),
                     "finite_logits": bool(torch.isfinite(logits).all())})
    print(json.dumps({
        "benchmark": "long_context",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "onnxruntime_providers": engine.providers, "copy_bandwidth_bytes_per_s": round(bandwidth)},
        "engine": type(engine).__name__, "layers": spec.num_hidden_layers,
        "roofline": "(decoder weight bytes + K/V bytes at the cache length) / the measured copy bandwidth",
        "model": spec.name, "rope_scaling": spec.rope_scaling, "max_positions": spec.max_positions,
        "dtype": "fp32", "batch": 1, "steps": args.steps, "measured": True,
        "cpu_engine": rows,
        "modelled_attention_decode": None if args.no_modelled else modelled_attention(args.gpu_model, lengths),
    }, indent=2))


def copy_bandwidth(nbytes: int = 1 << 28, repeats: int = 5) -> float:
    """This machine's memory bandwidth in bytes/s: bytes read + written by a numpy copy of `nbytes` (best of
    `repeats`; one thread, as a decode step's reads are streamed)."""
    src = np.ones(nbytes // 4, np.float32)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return 2 * nbytes / best


def cached_steps(engine, length: int, steps: int, g: torch.Generator):
    """A CacheEngine: slot 0's buffer filled with `length` random positions in place, then `steps` decode steps."""
    engine.reserve(1, length + steps)
    engine.release([0])
    for buffer in engine.buffers:
        buffer[0, :, :length] = torch.randn(buffer.shape[1], length, buffer.shape[3], generator=g).numpy()
    engine.lengths[0] = length
    token, times = [1], []
    for _ in range(steps):
        t0 = time.perf_counter()
        logits = engine.decode([0], token)
        times.append(time.perf_counter() - t0)
        token = logits.argmax(-1).tolist()
    return times, logits


def concat_steps(engine, length: int, steps: int, g: torch.Generator):
    """A concatenating engine (standard flavour): the cache passed in and returned every step."""
    spec = engine.spec
    shape = (1, spec.num_key_value_heads, length, spec.head_dim)
    past = tuple((torch.randn(shape, generator=g), torch.randn(shape, generator=g))
                 for _ in range(spec.num_hidden_layers))
    mask = torch.ones(1, length, dtype=torch.int64)
    token, times = torch.tensor([[1]]), []
    for i in range(steps):
        mask = torch.cat((mask, torch.ones(1, 1, dtype=torch.int64)), 1)
        t0 = time.perf_counter()
        logits, past = engine(token, torch.tensor([[length + i]]), mask, past)
        times.append(time.perf_counter() - t0)
        token = logits[:, -1].argmax(-1, keepdim=True)
    return times, logits[:, -1]


def modelled_attention(model: str, lengths: list[int]) -> dict:
    """Per GPU target: attention_decode us per layer and per token (all layers) at each cache length, with the
    target's tuned config for that bucket; `modelled` (cost model + the cubin's real resources)."""
    from qwen3export.autotune.cost_model import modelled_seconds
    from qwen3export.autotune.tables import table_config
    from qwen3export.autotune.workloads import workload
    from qwen3export.spec import preset
    from qwen3export.targets import gpu_targets

    spec = preset(model)
    fixed = workload("attention_decode").fixed(spec)
    out = {"source": "modelled", "model": model, "dtype": "bf16", "batch": 1, "targets": {}}
    for target in gpu_targets():
        rows = []
        for length in lengths:
            shape = fixed | {"B": 1, "L": length}
            config, entry = table_config(target.name, "attention_decode", "bf16", shape)
            est = modelled_seconds(target, "attention_decode", shape, config, "bf16")
            kv = 2 * spec.num_key_value_heads * spec.head_dim * 2 * length  # bf16 K and V of one layer
            rows.append({"cache_length": length, "config": config.label, "table_source": entry["source"],
                         "us_per_layer_modelled": None if est.seconds is None else round(est.seconds * 1e6, 2),
                         "ms_per_token_all_layers_modelled": None if est.seconds is None
                         else round(est.seconds * 1e3 * spec.num_hidden_layers, 3),
                         "kv_bandwidth_fraction_modelled": None if est.seconds is None
                         else round(kv / est.seconds / target.memory_bandwidth, 3)})
        out["targets"][target.name] = rows
    return out


if __name__ == "__main__":
    main()
