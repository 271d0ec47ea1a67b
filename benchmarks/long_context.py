"""Long-context decode benchmark: ONNX-engine decode tokens/s vs KV-cache length (1K … 128K) on CPU for
a small YaRN-scaled model. Prints one JSON object.

    python benchmarks/long_context.py [--model tiny] [--lengths 1024,8192,32768,131008] [--steps 16]

The cache is filled with random keys/values of the requested length (a 128K-token prefill of the
reference graph would materialise a 128K x 128K score matrix), then `--steps` tokens are decoded
through the engine at positions just past it. Those figures are measured on this machine.

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
import sys
import time
from pathlib import Path

import torch


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--lengths", default="1024,8192,32768,131008")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="dist/bench")
    ap.add_argument("--gpu-model", default="qwen3-8b", help="model shape of the modelled per-target figures")
    ap.add_argument("--no-modelled", action="store_true", help="skip the modelled per-target figures")
    args = ap.parse_args()

    from qwen3export.artifact import load_artifact
    from qwen3export.graphs.rope import parse_rope_flag
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build
    from qwen3export.runner import open_engine

    out = Path(args.work) / f"{args.model}-yarn4-cpu-onnx"
    if not (out / "manifest.json").is_file():
        build(BuildOptions.of(model=args.model, artifact=out, overrides={"rope_scaling": parse_rope_flag("yarn:4.0")}),
              progress=lambda s: print(s, file=sys.stderr, flush=True))
    engine = open_engine(load_artifact(out), threads=args.threads)
    spec = engine.spec
    lengths = [int(x) for x in args.lengths.split(",")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for length in lengths:
        if length + args.steps > spec.max_positions:
            raise SystemExit(f"cache {length} + {args.steps} steps exceeds {spec.max_positions} positions")
        shape = (1, spec.num_key_value_heads, length, spec.head_dim)
        past = tuple((torch.randn(shape, generator=g), torch.randn(shape, generator=g))
                     for _ in range(spec.num_hidden_layers))
        mask = torch.ones(1, length, dtype=torch.int64)
        token = torch.tensor([[1]])
        times = []
        for i in range(args.steps):
            mask = torch.cat((mask, torch.ones(1, 1, dtype=torch.int64)), 1)
            t0 = time.perf_counter()
            logits, past = engine(token, torch.tensor([[length + i]]), mask, past)
            times.append(time.perf_counter() - t0)
            token = logits[:, -1].argmax(-1, keepdim=True)
        kv_bytes = 2 * spec.num_hidden_layers * spec.num_key_value_heads * spec.head_dim * 4 * length
        steady = sorted(times[1:])[len(times[1:]) // 2]  # median, first step (warm-up) excluded
        rows.append({"cache_length": length, "decode_tokens_per_s": round(1 / steady, 2),
                     "median_step_ms": round(steady * 1e3, 3), "kv_cache_bytes": kv_bytes,
                     "finite_logits": bool(torch.isfinite(logits).all())})
    print(json.dumps({
        "benchmark": "long_context",
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                    "onnxruntime_providers": engine.providers},
        "model": spec.name, "rope_scaling": spec.rope_scaling, "max_positions": spec.max_positions,
        "dtype": "fp32", "batch": 1, "steps": args.steps, "measured": True,
        "cpu_engine": rows,
        "modelled_attention_decode": None if args.no_modelled else modelled_attention(args.gpu_model, lengths),
    }, indent=2))


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
