"""CPU decode benchmark: the lowered ONNX engine (`ort` flavour: ONNX Runtime's com.microsoft contrib ops),
the unlowered ONNX engine (the captured graph in plain ONNX ops) and transformers eager, on the same weights,
in one run, against the machine's measured memory-bandwidth roofline. Prints one JSON object.

    python benchmarks/decode_cpu.py [--model qwen3-0.6b --model qwen3-30b-a3b:num_hidden_layers=2]
                                    [--prompt-len 128] [--new-tokens 64] [--threads 2] [--rounds 2]

Decode of a batch-1 LLM is memory-bound: every new token reads every weight it uses once, so the ceiling
is bandwidth / weight bytes per token. For MoE layers that is the router and the top-k experts only
(what an ideal engine reads), not all experts. Bandwidth is measured here (a multi-threaded reduction
over a buffer much larger than the caches) before every round; the roofline takes the highest figure
seen in the run, since on a machine shared with other work a probe under load understates the ceiling
(each engine's effective GB/s is reported too). All figures are measured, none modelled. A model is `NAME[:field=value,...]`, fields overriding the preset (real layer shapes with
fewer layers: `qwen3-30b-a3b:num_hidden_layers=2` is 128 experts, top-8, ~7.4 GB in fp32).

The engines run round-robin, --rounds rounds each with the best kept, when the three copies of the weights
fit in memory, else one after another (a 2-layer 30B-A3B in fp32 is ~7.4 GB per copy); a probe before each
round gives the fraction of the bandwidth available at that moment too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

DEFAULT_MODELS = ("qwen3-0.6b", "qwen3-30b-a3b:num_hidden_layers=2")
# engine name -> BuildOptions fields of its artifact
ENGINES = {"onnx_lowered_ort": {"lower": True, "onnx_ops": "ort"},
           "onnx_unlowered": {"lower": False}}


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


def parse_model(text: str) -> tuple[str, dict]:
    """`qwen3-30b-a3b:num_hidden_layers=2,norm_topk_prob=true` -> (name, {field: JSON value or string})."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return name, overrides


def weight_bytes_per_token(spec, dtype_bytes: int) -> int:
    """Weights read by one batch-1 decode step: every parameter once, except that the embedding table is
    only gathered (one row) unless it is also the (tied) lm_head, and a MoE layer reads its top-k experts
    of num_experts (gate, up, down: 3 * hidden * moe_intermediate each)."""
    n = spec.param_count()
    if not spec.tie_word_embeddings:
        n -= spec.vocab_size * spec.hidden_size - spec.hidden_size
    unread = spec.num_experts - spec.num_experts_per_tok
    n -= len(spec.moe_layers) * unread * 3 * spec.hidden_size * spec.moe_intermediate_size
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


def transformers_model(spec, eager):
    """transformers' Qwen3 / Qwen3-MoE model over the eager module's own tensors (same names and layouts
    in transformers 5, experts stacked as gate_up_proj [E, 2I, H]; assigned, not copied)."""
    import transformers

    cfg_cls, model_cls = ((transformers.Qwen3MoeConfig, transformers.Qwen3MoeForCausalLM) if spec.is_moe
                          else (transformers.Qwen3Config, transformers.Qwen3ForCausalLM))
    hf_cfg = cfg_cls(**{k: v for k, v in spec.to_hf_config().items() if k not in ("architectures", "model_type")})
    with torch.device("meta"):
        hf = model_cls(hf_cfg)
    hf.load_state_dict(eager.state_dict(), assign=True, strict=False)
    hf.tie_weights()
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config=hf_cfg)  # its buffers were left on meta
    return hf.eval()


def transformers_step(hf):
    """The transformers model behind the decoder's step signature (its own DynamicCache inside)."""
    import inspect

    # transformers 5.24 renamed forward's past_key_values to cache (the old name warns until 5.40)
    kw = "cache" if "cache" in inspect.signature(hf.forward).parameters else "past_key_values"

    def step(ids, pos, mask, past):
        with torch.no_grad():
            out = hf(input_ids=ids, position_ids=pos, attention_mask=mask, use_cache=True, **{kw: past})
        return out.logits, getattr(out, kw)

    return step


def built_artifact(name: str, overrides: dict, spec, work: Path, engine: str):
    """The engine's artifact under `work` (built unless one with the same spec and lowering is there);
    -> (artifact, build seconds or None when reused)."""
    from qwen3export.artifact import load_artifact
    from qwen3export.pipeline import BuildOptions, build

    out = work / f"{spec.name}-{'-'.join(f'{k}{v}' for k, v in sorted(overrides.items()))}-{engine}".replace("--", "-")
    fields = ENGINES[engine]
    if (out / "manifest.json").is_file():
        a = load_artifact(out, verify_checksums=False)
        if a.manifest["model"]["spec"] == spec.to_dict() and a.manifest["lowering"]["enabled"] == fields["lower"]:
            return a, None
    t0 = time.perf_counter()
    build(BuildOptions(model=name, out=out, overrides=overrides, force=True, **fields),
          progress=lambda s: print(f"{engine}: {s}", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - t0
    gc.collect()
    return load_artifact(out, verify_checksums=False), seconds


class Bandwidth:
    """Read-bandwidth probes taken through the run; `ceiling` is the highest (bytes/s)."""

    def __init__(self, threads: int):
        self.threads, self.probes = threads, []

    def probe(self) -> None:
        self.probes.append(measure_read_bandwidth(self.threads))

    @property
    def ceiling(self) -> float:
        return max(self.probes)


def memory_available() -> int:
    """MemAvailable from /proc/meminfo in bytes (0 where unknown: engines then run one at a time)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Runner:
    """One engine's rounds: each a generation after a bandwidth probe, kept with the probe."""

    def __init__(self, name: str, opener):
        self.name, self.opener, self.step, self.rounds, self.tokens, self.providers = name, opener, None, [], [], None

    def open(self) -> None:
        self.step, self.empty_cache, self.providers = self.opener()

    def close(self) -> None:
        self.step = self.empty_cache = None
        gc.collect()

    def round(self, prompt, new_tokens: int, bandwidth: Bandwidth) -> None:
        bandwidth.probe()
        torch.set_num_threads(bandwidth.threads)
        pre, dec, self.tokens = timed_generation(self.step, self.empty_cache(), prompt, new_tokens)
        self.rounds.append((pre, dec, bandwidth.probes[-1]))

    def summary(self, new_tokens: int, bytes_per_token: int) -> dict:
        pre = min(r[0] for r in self.rounds)
        _, dec, probe = min(self.rounds, key=lambda r: r[1])  # the round with the fastest decode
        tps = (new_tokens - 1) / dec
        return {"prefill_ms": round(pre * 1e3, 1), "decode_tokens_per_s": round(tps, 3),
                "decode_effective_GBps": round(tps * bytes_per_token / 1e9, 2),
                # against the probe taken just before the best round (load on the machine then included)
                "decode_fraction_of_probe_before": round(tps * bytes_per_token / probe, 4),
                "prefill_ms_all_rounds": [round(r[0] * 1e3, 1) for r in self.rounds],
                "decode_s_all_rounds": [round(r[1], 3) for r in self.rounds],
                "probe_GBps_all_rounds": [round(r[2] / 1e9, 2) for r in self.rounds],
                "providers": self.providers}


def bench_model(text: str, args, bandwidth: Bandwidth) -> dict:
    from qwen3export.model import build_module, resolve
    from qwen3export.runner import open_engine

    name, overrides = parse_model(text)
    spec, source, _ = resolve(name, **overrides)
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    bpt = weight_bytes_per_token(spec, 4)
    builds, lowering, runners = {}, {}, []
    for engine in ENGINES:  # builds first, one at a time (each holds the eager model and its program)
        artifact, builds[engine] = built_artifact(name, overrides, spec, Path(args.work), engine)
        lowering[engine] = artifact.manifest["lowering"]

        def onnx_opener(artifact=artifact):
            step = open_engine(artifact, threads=args.threads)
            return step, lambda: step.empty_cache(1), step.providers

        runners.append(Runner(engine, onnx_opener))

    def hf_opener():
        torch.set_num_threads(args.threads)
        hf = transformers_model(spec, build_module(spec, source, torch.float32))
        return transformers_step(hf), lambda: None, ["transformers (torch eager)"]

    runners.append(Runner("transformers_eager", hf_opener))
    # round-robin when all three copies of the weights fit in half the free memory (the fair comparison on a
    # machine shared with other work); else one engine after another (two 30B-A3B engines and the eager
    # model need ~22 GB in fp32)
    together = len(runners) * spec.param_count() * 4 <= memory_available() // 2
    if together:
        for r in runners:
            r.open()
        for _ in range(args.rounds):
            for r in runners:
                r.round(prompt, args.new_tokens, bandwidth)
        for r in runners:
            r.close()
    else:
        for r in runners:
            r.open()
            for _ in range(args.rounds):
                r.round(prompt, args.new_tokens, bandwidth)
            r.close()
    engines = {r.name: r.summary(args.new_tokens, bpt) for r in runners}
    tokens = {r.name: r.tokens for r in runners}

    def ratio(a: str, b: str) -> dict:
        return {"decode": round(engines[a]["decode_tokens_per_s"] / engines[b]["decode_tokens_per_s"], 3),
                "prefill": round(engines[b]["prefill_ms"] / engines[a]["prefill_ms"], 3)}

    return {
        "model": spec.name, "overrides": overrides, "layers": spec.num_hidden_layers,
        "experts": spec.num_experts, "top_k": spec.num_experts_per_tok, "param_count": spec.param_count(),
        "lowering": lowering["onnx_lowered_ort"]["passes"],
        "build_s": {k: (round(v, 1) if v is not None else "reused") for k, v in builds.items()},
        "weight_bytes_per_token": bpt,
        "schedule": "round-robin" if together else "one engine after another",
        "engines": engines,
        "speedup": {"lowered_vs_unlowered": ratio("onnx_lowered_ort", "onnx_unlowered"),
                    "lowered_vs_transformers": ratio("onnx_lowered_ort", "transformers_eager"),
                    "unlowered_vs_transformers": ratio("onnx_unlowered", "transformers_eager")},
        "greedy_tokens_equal_to_transformers": {k: tokens[k] == tokens["transformers_eager"] for k in ENGINES},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", action="append", help=f"NAME[:field=value,...], repeatable (default: "
                    f"{' and '.join(DEFAULT_MODELS)})")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3, help="generation rounds per engine; best kept")
    ap.add_argument("--work", default="dist/bench", help="where the engine artifacts are built (reused if present)")
    args = ap.parse_args()

    import onnxruntime
    import transformers

    bandwidth = Bandwidth(args.threads)
    models = [bench_model(m, args, bandwidth) for m in (args.model or DEFAULT_MODELS)]
    for m in models:  # the roofline from the highest bandwidth seen anywhere in the run
        roofline = bandwidth.ceiling / m["weight_bytes_per_token"]
        m["decode_roofline_tokens_per_s"] = round(roofline, 3)
        for e in m["engines"].values():
            e["decode_fraction_of_roofline"] = round(e["decode_tokens_per_s"] / roofline, 4)
    print(json.dumps({
        "benchmark": "decode_cpu",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "dtype": "fp32", "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "rounds": args.rounds,
        "memory_read_bandwidth_GBps": {"ceiling": round(bandwidth.ceiling / 1e9, 2),
                                       "probes": [round(b / 1e9, 2) for b in bandwidth.probes]},
        "roofline": "decode tokens/s = bandwidth ceiling (highest probe) / weight bytes read per token",
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "models": models,
        "measured": True,
    }, indent=2))


if __name__ == "__main__":
    main()
