"""`qwen3export serve` on the CPU: throughput and latency at concurrency 1, 4 and 8, and the batching gain.

    python benchmarks/serve_cpu.py [--model qwen3-0.6b] [--layers N] [--quant none --quant int4] [--requests 16]
                                   [--tokens 64] [--quick]

For each --quant (default: none and int4, i.e. fp32 and `build --quant int4` with the build's defaults), builds
(or reuses, under --work, default dist/bench) an onnx artifact with --max-batch 8, starts the server in this process on
127.0.0.1 (uvicorn in a thread), and sends the same `--requests` streamed /v1/completions (token-id prompts of
different lengths, `ignore_eos`, sampling at Qwen3's defaults, fixed seeds) from `c` client threads at a time.
Measured per level: tokens/s over the wall time, time to first token and inter-token latency (p50 / p99) as the
clients see them (client threads share this process's GIL with the engine loop: the HTTP overhead is included).
batching_gain = throughput at concurrency c / throughput at concurrency 1 (the same requests one after another).
--quick: the tiny preset, 8 requests x 16 tokens. Prints JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import uvicorn

from qwen3export.artifact import load_artifact
from qwen3export.manifest import SCHEMA
from qwen3export.options import BuildOptions
from qwen3export.pipeline import build
from qwen3export.serve.app import ServeConfig, open_server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_request(url: str, prompt: list[int], tokens: int, seed: int) -> dict:
    body = {"prompt": prompt, "max_tokens": tokens, "seed": seed, "stream": True, "ignore_eos": True,
            "return_token_ids": True}
    t0, times = time.perf_counter(), []
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: {"):
                chunk = json.loads(line[6:])
                for c in chunk["choices"]:
                    times += [time.perf_counter()] * len(c.get("token_ids") or [])
    return {"ttft": times[0] - t0, "itl": list(np.diff(times)), "tokens": len(times), "end": times[-1]}


def level(url: str, jobs: list, concurrency: int) -> dict:
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        out = list(pool.map(lambda j: one_request(url, *j), jobs))
    wall = time.perf_counter() - t0
    ttft = np.array([o["ttft"] for o in out])
    itl = np.array([x for o in out for x in o["itl"]])
    tokens = sum(o["tokens"] for o in out)
    ms = lambda a, q: round(float(np.percentile(a, q)) * 1e3, 2) if len(a) else None  # noqa: E731
    return {"concurrency": concurrency, "requests": len(jobs), "tokens": tokens, "wall_s": round(wall, 3),
            "throughput_tok_s": round(tokens / wall, 1), "ttft_ms": {"p50": ms(ttft, 50), "p99": ms(ttft, 99)},
            "itl_ms": {"p50": ms(itl, 50), "p99": ms(itl, 99)}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--layers", type=int, default=None, help="override the preset's layer count")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--quant", action="append", choices=("none", "int4", "int8"),
                    help="repeatable; default: none and int4")
    ap.add_argument("--threads", type=int, default=None, help="ONNX Runtime intra-op threads")
    ap.add_argument("--work", default="dist/bench", help="where the artifact is built (reused if present)")
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    if args.quick:
        args.model, args.requests, args.tokens = "tiny", 8, 16
    runs = [serve_levels(args, quant) for quant in args.quant or ["none", "int4"]]
    print(json.dumps({"benchmark": "serve_cpu", "model": args.model, "requests_per_level": args.requests,
                      "tokens_per_request": args.tokens, "machine": f"{platform.machine()}, shared CPU cores",
                      "runs": runs,
                      "note": "measured; the sequential baseline is concurrency 1 (the same requests one after "
                              "another through the same server)"}, indent=2))
    return 0


def serve_levels(args, quant: str) -> dict:
    """Build (or reuse) the artifact for `quant`, serve it, run concurrency 1, 4 and 8 -> its JSON record."""
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    name = "fp32" if quant == "none" else quant
    out = Path(args.work) / f"serve-{args.model}{f'-{args.layers}l' if args.layers else ''}-{name}-b8"
    manifest = out / "manifest.json"
    if manifest.is_file() and json.loads(manifest.read_text()).get("schema") != SCHEMA:
        shutil.rmtree(out)  # this benchmark's own build by an older qwen3export: rebuilt
    if not manifest.is_file():
        print(f"building {out} ...", file=sys.stderr, flush=True)
        build(BuildOptions.of(model=args.model, artifact=out, max_batch=8, max_seq=256, overrides=overrides,
                              quant=quant), progress=lambda m: None)
    artifact = load_artifact(out)
    server = open_server(artifact, args.threads, ServeConfig(max_queue=256))
    port = _free_port()
    uv = uvicorn.Server(uvicorn.Config(server.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    rng = np.random.default_rng(0)
    jobs = [(rng.integers(0, min(server.spec.vocab_size, 151643), 8 + 4 * (i % 5)).tolist(), args.tokens, i)
            for i in range(args.requests)]
    level(url, jobs[:2], 2)  # warm-up
    levels = [level(url, jobs, c) for c in (1, 4, 8)]
    base = levels[0]["throughput_tok_s"]
    for lv in levels:
        lv["batching_gain"] = round(lv["throughput_tok_s"] / base, 2)
    uv.should_exit = True
    thread.join(timeout=30)
    return {"quant": quant, "quantization": artifact.manifest.get("quantization") and {
                k: artifact.manifest["quantization"][k] for k in ("mode", "group_size", "accuracy_level",
                                                                   "quantize_lm_head")},
            "layers": server.spec.num_hidden_layers, "dtype": "fp32", "backend": "onnx",
            "max_batch": server.scheduler.max_batch, "levels": levels}

if __name__ == "__main__":
    raise SystemExit(main())
