"""CPU decode benchmark: the ONNX engine vs transformers eager on the same weights, in one run, against
the machine's measured memory-bandwidth roofline. Prints one JSON object.

    python benchmarks/decode_cpu.py [--model qwen3-0.6b] [--prompt-len 128] [--new-tokens 64] [--threads 2]

Decode of a batch-1 LLM is memory-bound: every new token reads every weight once, so the ceiling is
bandwidth / weight bytes per token. Bandwidth is measured here (a multi-threaded reduction over a buffer
much larger than the caches); all figures are measured, none modelled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch


def measure_read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 7) -> float:
    """Bytes/s of a streaming read (torch.sum over `gib` GiB of fp32) with `threads` threads; best of N."""
    torch.set_num_threads(threads)
    buf = torch.ones(int(gib * (1 << 30)) // 4, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best


def weight_bytes_per_token(spec, dtype_bytes: int) -> int:
    """Weights read by one decode step: every parameter once, except that the embedding table is only
    gathered (one row) unless it is also the (tied) lm_head, which reads all of it."""
    n = spec.param_count()
    if not spec.tie_word_embeddings:
        n -= spec.vocab_size * spec.hidden_size - spec.hidden_size
    return n * dtype_bytes


def timed_generation(step, empty_cache, prompt: torch.Tensor, new_tokens: int):
    """(prefill seconds, decode seconds for new_tokens-1 steps, token ids) through the generic step API."""
    from qwen3export.generation import position_ids_from_mask

    mask = torch.ones_like(prompt)
    t0 = time.perf_counter()
    logits, past = step(prompt, position_ids_from_mask(mask), mask, empty_cache)
    t1 = time.perf_counter()
    tokens = [int(logits[0, -1].argmax())]
    for _ in range(new_tokens - 1):
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), 1)
        pos = torch.tensor([[mask.shape[1] - 1]])
        logits, past = step(torch.tensor([[tokens[-1]]]), pos, mask, past)
        tokens.append(int(logits[0, -1].argmax()))
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1, tokens


def transformers_step(hf):
    """The transformers model behind the decoder's step signature (its own DynamicCache inside)."""

    def step(ids, pos, mask, past):
        with torch.no_grad():
            out = hf(input_ids=ids, position_ids=pos, attention_mask=mask, past_key_values=past, use_cache=True)
        return out.logits, out.past_key_values

    return step


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="qwen3-0.6b")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2, help="alternating engine/transformers rounds; best kept")
    ap.add_argument("--work", default="dist/bench", help="where the engine artifact is built (reused if present)")
    args = ap.parse_args()

    import transformers

    from qwen3export.artifact import load_artifact
    from qwen3export.model import build_module, resolve
    from qwen3export.pipeline import BuildOptions, build
    from qwen3export.runner import open_engine

    torch.set_num_threads(args.threads)
    bandwidth = measure_read_bandwidth(args.threads)

    spec, source, _ = resolve(args.model)
    out = Path(args.work) / f"{spec.name}-cpu-onnx"
    t0 = time.perf_counter()
    if not (out / "manifest.json").is_file():
        build(BuildOptions(model=args.model, out=out), progress=lambda s: print(s, file=sys.stderr, flush=True))
    build_s = time.perf_counter() - t0
    artifact = load_artifact(out)
    engine = open_engine(artifact, threads=args.threads)

    eager = build_module(spec, source, torch.float32)
    cfg_cls = transformers.Qwen3Config
    hf_cfg = cfg_cls(**{k: v for k, v in spec.to_hf_config().items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = transformers.Qwen3ForCausalLM(hf_cfg)
    hf.load_state_dict(eager.state_dict(), assign=True, strict=False)  # same tensors, no copy
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)  # its buffers were left on meta
    hf.eval()
    hf_step = transformers_step(hf)

    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=g)
    runs: dict[str, list] = {"engine": [], "transformers": []}
    tokens = {}
    for _ in range(args.rounds):
        for name, step, cache in (("engine", engine, engine.empty_cache(1)), ("transformers", hf_step, None)):
            pre, dec, toks = timed_generation(step, cache, prompt, args.new_tokens)
            runs[name].append((pre, dec))
            tokens[name] = toks

    bpt = weight_bytes_per_token(spec, 4)
    roofline = bandwidth / bpt
    result = {}
    for name, rs in runs.items():
        pre = min(r[0] for r in rs)
        dec = min(r[1] for r in rs)
        tps = (args.new_tokens - 1) / dec
        result[name] = {"prefill_ms": round(pre * 1e3, 1), "decode_tokens_per_s": round(tps, 3),
                        "decode_fraction_of_roofline": round(tps / roofline, 3),
                        "decode_s_all_rounds": [round(r[1], 3) for r in rs]}
    print(json.dumps({
        "benchmark": "decode_cpu",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                    "onnxruntime_providers": engine.providers},
        "model": spec.name, "dtype": "fp32", "batch": 1, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "rounds": args.rounds, "build_s": round(build_s, 1),
        "memory_read_bandwidth_GBps": round(bandwidth / 1e9, 2),
        "weight_bytes_per_token": bpt,
        "decode_roofline_tokens_per_s": round(roofline, 3),
        "engine": result["engine"],
        "transformers_eager": result["transformers"],
        "engine_vs_transformers_decode": round(result["engine"]["decode_tokens_per_s"]
                                               / result["transformers"]["decode_tokens_per_s"], 3),
        "engine_vs_transformers_prefill": round(result["transformers"]["prefill_ms"] / result["engine"]["prefill_ms"], 3),
        "greedy_tokens_equal": tokens["engine"] == tokens["transformers"],
        "measured": True,
    }, indent=2))


if __name__ == "__main__":
    main()
