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

With --quant (repeatable: int4, int8, fp8, each optionally `+lm_head` to quantize the lm_head too) the run
measures our own fp32 engine (lowered, ort flavour) against the quantized engines built with `build --quant`,
each at every --accuracy-levels value of ONNX Runtime's MatMulNBits: 0 (activations kept fp32: what the
artifact ships and the parity gate checked) and 4 (activations quantized to int8 per block inside the op: a
copy of the decoder with the attribute rewritten, not parity-checked). The roofline of a quantized engine uses
the bytes its ONNX weights read per token (quant_bytes_per_token: codes, scales as stored, top-k experts).
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


def parse_quant(text: str) -> dict:
    """`int4` | `int4+lm_head` | `int8` | `fp8` -> BuildOptions fields (group size set by the caller)."""
    mode, _, extra = text.partition("+")
    if mode not in ("int4", "int8", "fp8") or extra not in ("", "lm_head"):
        raise SystemExit(f"--quant {text!r}: choose int4, int8 or fp8, optionally with +lm_head")
    return {"quant": mode, "quantize_lm_head": extra == "lm_head"}


def _nbits_block(group: int) -> int:
    """MatMulNBits' block for a group (backends/onnx_quant.py matmul_nbits_block): the largest power of two
    <= 256 dividing it; the group's scale is stored once per block."""
    return min(group & -group, 256)


def quant_bytes_per_token(spec, mode: str, group: int, lm_head: bool) -> int:
    """Weight bytes one batch-1 decode step of the ort-flavour quantized engine reads, as its ONNX initializers
    store them: int4 codes half a byte, int8 / fp8 one, fp32 scales (MatMulNBits keeps A's dtype) once per
    MatMulNBits block (int8 per channel re-blocked to <= 256, its scale repeated), one per channel for fp8 and
    int8 QMoE experts; the MoE router, norms and an unquantized lm_head in fp32; top-k experts of each MoE
    layer. The embedding is only gathered unless it is the (tied, unquantized) lm_head."""
    h, d = spec.hidden_size, spec.head_dim

    def linear(n: int, k: int, expert: bool = False) -> int:
        if mode == "fp8" or (mode == "int8" and expert):
            return n * k + 4 * n
        g = group if mode == "int4" else k
        return n * k * (4 if mode == "int4" else 8) // 8 + n * (k // _nbits_block(g)) * 4

    q, kv = spec.num_attention_heads * d, spec.num_key_value_heads * d
    attn = linear(q, h) + 2 * linear(kv, h) + linear(h, q) + 2 * d * 4
    total = 0
    for i in range(spec.num_hidden_layers):
        if spec.layer_is_moe(i):
            inter = spec.moe_intermediate_size
            mlp = spec.num_experts_per_tok * (2 * linear(inter, h, True) + linear(h, inter, True)) \
                + spec.num_experts * h * 4
        else:
            inter = spec.intermediate_size
            mlp = 2 * linear(inter, h) + linear(h, inter)
        total += attn + mlp + 2 * h * 4
    head = linear(spec.vocab_size, h) if lm_head else spec.vocab_size * h * 4
    return total + head + h * 4


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


def built_artifact(name: str, overrides: dict, spec, work: Path, engine: str, fields: dict | None = None):
    """The engine's artifact under `work` (built unless one with the same spec, lowering and quantization is
    there); -> (artifact, build seconds or None when reused)."""
    from qwen3export.artifact import load_artifact
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build

    out = work / f"{spec.name}-{'-'.join(f'{k}{v}' for k, v in sorted(overrides.items()))}-{engine}".replace("--", "-")
    fields = fields if fields is not None else ENGINES[engine]
    if (out / "manifest.json").is_file():
        a = load_artifact(out, verify_checksums=False)
        q = a.manifest.get("quantization") or {}
        same_quant = (q.get("mode", "none"), q.get("group_size") if q.get("mode") == "int4" else None,
                      q.get("quantize_lm_head", False)) == (
            fields.get("quant", "none"), fields.get("group_size") if fields.get("quant") == "int4" else None,
            fields.get("quantize_lm_head", False))
        if a.manifest["model"]["spec"] == spec.to_dict() and a.manifest["lowering"]["enabled"] == fields["lower"] \
                and same_quant:
            return a, None
    t0 = time.perf_counter()
    build(BuildOptions.of(model=name, artifact=out, overrides=overrides, force=True, **fields),
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


def accuracy_variant(artifact, level: int, folder: Path):
    """The artifact with every MatMulNBits at `level` (a copy of decoder.onnx under `folder`, the manifest
    alongside): level 4 quantizes activations to int8 inside the op, ONNX Runtime's fast CPU path."""
    import onnx

    from qwen3export.artifact import Artifact

    folder.mkdir(parents=True, exist_ok=True)
    name = artifact.manifest["engine"]["file"]
    model = onnx.load(str(artifact.file(name)))
    changed = 0
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            for a in node.attribute:
                if a.name == "accuracy_level":
                    a.i, changed = level, changed + 1
    onnx.save(model, str(folder / name), save_as_external_data=artifact.manifest["engine"]["external_data"],
              location=name + ".data")
    del model
    return Artifact(folder, artifact.manifest), changed


def bench_quant_model(text: str, args, bandwidth: Bandwidth) -> dict:
    """Our fp32 engine against the --quant engines (and their accuracy-level variants), same weights."""
    from qwen3export.model import resolve
    from qwen3export.runner import open_engine

    name, overrides = parse_model(text)
    spec, _, _ = resolve(name, **overrides)
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    work = Path(args.work)
    variants = {"onnx_fp32_ort": ({"lower": True, "onnx_ops": "ort"}, None)}
    for q in args.quant:
        fields = {"lower": True, "onnx_ops": "ort", **parse_quant(q)}
        if fields["quant"] == "int4":  # int8 / fp8 scale per output channel: a group size is refused for them
            fields["group_size"] = args.group_size
        for level in args.accuracy_levels:
            variants[f"onnx_{q.replace('+', '_')}_acc{level}"] = (fields, level)
    builds, runners, meta = {}, [], {}
    for engine, (fields, level) in variants.items():
        base = engine.rsplit("_acc", 1)[0]
        artifact, seconds = built_artifact(name, overrides, spec, work, base, fields)
        builds.setdefault(base, None if seconds is None else round(seconds, 1))
        q = artifact.manifest.get("quantization")
        bpt = (quant_bytes_per_token(spec, q["mode"], args.group_size, q["quantize_lm_head"]) if q
               else weight_bytes_per_token(spec, 4))
        parity = artifact.manifest["parity"]
        meta[engine] = {"weight_bytes_per_token": bpt, "accuracy_level": level,
                        "parity_checked": level in (None, 0),
                        "parity_vs_eager_dequantized": {k: parity[k] for k in ("passed", "logits_max_abs",
                                                                               "greedy_tokens_matching")},
                        "vs_unquantized": ({k: parity["quantization"].get(k) for k in
                                            ("logits_kl", "top1_agreement", "greedy_match_length")}
                                           if q else None),
                        "artifact_weight_bytes": q["weight_bytes"] if q else 4 * spec.param_count()}
        if level not in (None, 0):
            artifact, changed = accuracy_variant(artifact, level, work / f"{artifact.path.name}-acc{level}")
            meta[engine]["matmulnbits_nodes_rewritten"] = changed

        def opener(artifact=artifact):
            step = open_engine(artifact, threads=args.threads)
            return step, lambda: step.empty_cache(1), step.providers

        runners.append(Runner(engine, opener))
    # one engine after another: the quantized engines are small, but several 30B-A3B ones are not
    for r in runners:
        r.open()
        for _ in range(args.rounds):
            r.round(prompt, args.new_tokens, bandwidth)
        r.close()
    engines = {r.name: {**r.summary(args.new_tokens, meta[r.name]["weight_bytes_per_token"]), **meta[r.name]}
               for r in runners}
    base = engines["onnx_fp32_ort"]["decode_tokens_per_s"]
    return {
        "model": spec.name, "overrides": overrides, "layers": spec.num_hidden_layers,
        "experts": spec.num_experts, "top_k": spec.num_experts_per_tok, "param_count": spec.param_count(),
        "tie_word_embeddings": spec.tie_word_embeddings, "group_size": args.group_size,
        "build_s": {k: (v if v is not None else "reused") for k, v in builds.items()},
        "schedule": "one engine after another",
        "engines": engines,
        "decode_speedup_vs_fp32_engine": {k: round(e["decode_tokens_per_s"] / base, 3) for k, e in engines.items()},
        "bytes_ratio_vs_fp32_engine": {k: round(engines["onnx_fp32_ort"]["weight_bytes_per_token"]
                                                / e["weight_bytes_per_token"], 3) for k, e in engines.items()},
        "greedy_tokens_equal_to_fp32_engine": {r.name: r.tokens == runners[0].tokens for r in runners},
    }


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
    ap.add_argument("--quant", action="append", help="int4 | int8 | fp8, optionally +lm_head; repeatable: measure "
                    "our fp32 engine against these quantized engines instead of the unlowered / transformers peers")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    ap.add_argument("--accuracy-levels", default="0,4", help="MatMulNBits accuracy levels to run each quantized "
                    "engine at (default 0,4; 0 is the parity-checked setting)")
    args = ap.parse_args()
    args.accuracy_levels = [int(x) for x in args.accuracy_levels.split(",") if x.strip()]

    import onnxruntime
    import transformers

    bandwidth = Bandwidth(args.threads)
    bench = bench_quant_model if args.quant else bench_model
    models = [bench(m, args, bandwidth) for m in (args.model or DEFAULT_MODELS)]
    for m in models:  # the roofline from the highest bandwidth seen anywhere in the run
        for e in m["engines"].values():
            roofline = bandwidth.ceiling / e.get("weight_bytes_per_token", m.get("weight_bytes_per_token"))
            e["decode_roofline_tokens_per_s"] = round(roofline, 3)
            e["decode_fraction_of_roofline"] = round(e["decode_tokens_per_s"] / roofline, 4)
        if "weight_bytes_per_token" in m:
            m["decode_roofline_tokens_per_s"] = round(bandwidth.ceiling / m["weight_bytes_per_token"], 3)
    print(json.dumps({
        "benchmark": "decode_cpu",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "dtype": "fp32", "quant": args.quant or "none", "batch": 1, "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
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
