"""CPU decode benchmark: our engines against ONNX Runtime GenAI (the peer) on the same weights, in one run,
against the machine's measured memory-bandwidth roofline. Prints one JSON object.

    python benchmarks/decode_cpu.py [--quick] [--model qwen3-0.6b --model qwen3-30b-a3b:num_hidden_layers=2]
                                    [--prompt-len 128] [--new-tokens 64] [--threads 2] [--rounds 5]

--compare peer (the default; issue 18): a Qwen3-0.6B-shaped Hugging Face folder with seeded "trained"-statistics
weights is written once (peer_env.write_hf_folder); our fp32 and `--quant int4` artifacts (the build's defaults
otherwise) and the peer's fp32 and int4 CPU models (its builder, run in benchmarks/.peer-venv, which
peer_env.peer_python makes on first use: the peer needs the CPU onnxruntime package, we depend on onnxruntime-gpu)
are built from it, and all of them generate round-robin: prompt of --prompt-len ids, greedy, --new-tokens tokens,
--threads threads, --rounds rounds. Ours runs twice per round: "as run" (decoder, then the artifact's sampling
graph per token: what `qwen3export run --greedy` does, timed by the same cli.CallTimer) and "argmax" (on the
decoder's logits); the peer runs its generator in a worker process of its environment (peer_worker.py). The peer
cannot build Qwen3-MoE: the second --model (a 2-layer 30B-A3B by default) compares ours with transformers eager.
The JSON has issue 18's ratios (from the median rounds), its targets and `targets_met`. Artifacts are reused
from --work while the build code is unchanged (a hash of its sources).

--compare lowering: the lowered ONNX engine (`ort` flavour), the unlowered one and transformers eager.

Decode of a batch-1 LLM is memory-bound: every new token reads every weight it uses once, so the ceiling
is bandwidth / weight bytes per token. For the peer comparison these are the bytes of each ONNX model's
initializers, less an embedding table that is only gathered; for MoE layers the router and the top-k experts
only (what an ideal engine reads), not all experts. Bandwidth is measured here (a multi-threaded reduction
over a buffer much larger than the caches) just before and just after every round. This host's bandwidth swings
between two levels within seconds (~33 and ~54-62 GB/s on 2 threads, seen in one minute with nothing else
running), so the roofline target is judged per round, against the higher of the two probes around it, median
over rounds (`decode_fraction_of_round_bandwidth_median`); the fraction of the highest probe of the whole run is
reported beside it (`fp32_as_run_fraction_of_run_ceiling`). `ratio_ceilings_at_full_bandwidth` gives the most
each decode ratio could be here: ours at its rounds' full bandwidth against the other engine as measured; a
target above it needs fewer bytes, not a faster engine. All figures are measured, none modelled. A model is
`NAME[:field=value,...]`, fields overriding the preset (real layer shapes with fewer layers:
`qwen3-30b-a3b:num_hidden_layers=2` is 128 experts, top-8, ~7.4 GB in fp32). A MoE model alone (no dense one
given) runs only the comparison with transformers.

The engines run round-robin when their copies of the weights fit in half the free memory, else one after
another (a 2-layer 30B-A3B in fp32 is ~7.4 GB per copy); `--schedule round-robin` forces the fair order where
the memory is there (with ours and transformers on a 2-layer 30B-A3B, MemAvailable fell by ~8.5 GB of 23 at the
peak: ONNX Runtime maps its weights file).

With --quant (repeatable: int4, int8, fp8, each optionally `+lm_head` to quantize the lm_head too) the run
measures our own fp32 engine (lowered, ort flavour) against the quantized engines built with `build --quant`,
each at every --accuracy-levels value of ONNX Runtime's MatMulNBits: 0 (activations kept fp32) and 4
(activations quantized to int8 per block inside the op: a copy of the decoder with the attribute rewritten, not
parity-checked). The roofline of a quantized engine uses the bytes its ONNX weights read per token
(quant_bytes_per_token: codes, scales as stored, top-k experts).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # peer_env beside this file

DEFAULT_MODELS = ("qwen3-0.6b", "qwen3-30b-a3b:num_hidden_layers=2")
FULL, QUICK = {"new_tokens": 64, "rounds": 5}, {"new_tokens": 24, "rounds": 2}
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


def is_moe(text: str) -> bool:
    """Whether a --model names a mixture-of-experts preset (the peer's builder refuses those)."""
    name = parse_model(text)[0]
    return name.endswith("a3b") or name.endswith("a22b") or "moe" in name


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
    """(prefill seconds, decode seconds for new_tokens-1 steps, token ids): argmax on the decoder's logits through
    generation.greedy_generate (a Step or a SlotDecoder), its calls timed as `run --json` times them."""
    from qwen3export.cli import CallTimer
    from qwen3export.generation import greedy_generate

    timer = CallTimer(step)
    tokens, _, _ = greedy_generate(timer, empty_cache, prompt, torch.ones_like(prompt), new_tokens)
    end = time.perf_counter()
    (t0, t1) = timer.spans[0]
    return t1 - t0, end - t1, tokens[0].tolist()


def timed_sampled_generation(engine, sampler, graph, manifest: dict, prompt: torch.Tensor, new_tokens: int):
    """(prefill seconds, decode seconds for new_tokens-1 tokens, token ids, sampling ms per token) as `qwen3export
    run --greedy --no-stop` steps it: decoder, then the artifact's sampling graph, per token (cli's own timer)."""
    import numpy as np

    from qwen3export.cli import CallTimer, run_timing
    from qwen3export.generation import sample_generate
    from qwen3export.graphs.sampling import SamplingParams, initial_state

    ids = prompt[0].tolist()
    params = SamplingParams.recommended(False, manifest["sampling"]["defaults"], temperature=0.0)
    step, timed_sampler = CallTimer(engine), CallTimer(sampler)
    tokens, _ = sample_generate(step, engine.empty_cache(1), timed_sampler, ids, params.to_tensors(1),
                                initial_state([ids], graph.vocab), new_tokens, np.random.default_rng(0), ())
    t = run_timing(step, timed_sampler, time.perf_counter())
    return t["prefill_ms"] / 1e3, t["decode_s"], tokens, t["sampling_ms_per_token"]


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


def clear_stale(out: Path) -> None:
    """Remove this benchmark's earlier build at `out` when an older qwen3export wrote it (`build --force` replaces
    only an artifact of the current schema, and a benchmark rebuilds its own folders whatever wrote them)."""
    try:
        schema = json.loads((out / "manifest.json").read_text()).get("schema", "")
    except (OSError, ValueError):
        return
    if isinstance(schema, str) and schema.startswith("qwen3export.artifact/"):
        shutil.rmtree(out)


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
    clear_stale(out)
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


def fits_together(args, weight_bytes: int) -> bool:
    """Whether the engines run round-robin: `--schedule round-robin` forces it (the fair comparison, for a quiet
    machine with the memory), `sequential` forbids it; `auto` when their weights fit in half the free memory."""
    if args.schedule != "auto":
        return args.schedule == "round-robin"
    return weight_bytes <= memory_available() // 2


class Runner:
    """One engine's rounds: each a generation after a bandwidth probe, kept with the probe. `opener()` ->
    (generate(prompt [1, S], new_tokens) -> (prefill s, decode s, tokens[, sampling ms per token]), providers,
    release or None)."""

    def __init__(self, name: str, opener):
        self.name, self.opener, self.generate, self.rounds, self.tokens, self.providers = name, opener, None, [], [], None
        self.release, self.probes_after = None, []

    def open(self) -> None:
        self.generate, self.providers, self.release = self.opener()

    def close(self) -> None:
        self.generate = None
        if self.release is not None:
            self.release()
        gc.collect()

    def round(self, prompt, new_tokens: int, bandwidth: Bandwidth) -> None:
        bandwidth.probe()
        torch.set_num_threads(bandwidth.threads)
        pre, dec, self.tokens, *extra = self.generate(prompt, new_tokens)
        self.rounds.append((pre, dec, bandwidth.probes[-1], *extra))
        bandwidth.probe()  # the host's bandwidth swings within seconds (29-62 GB/s seen): bracket the round
        self.probes_after.append(bandwidth.probes[-1])

    def summary(self, new_tokens: int, bytes_per_token: int) -> dict:
        pre = min(r[0] for r in self.rounds)
        _, dec, probe, *_ = min(self.rounds, key=lambda r: r[1])  # the round with the fastest decode
        tps = (new_tokens - 1) / dec
        out = {"prefill_ms": round(pre * 1e3, 1), "decode_tokens_per_s": round(tps, 3),
               "decode_tokens_per_s_median": round((new_tokens - 1) / statistics.median(r[1] for r in self.rounds), 3),
               "prefill_ms_median": round(statistics.median(r[0] for r in self.rounds) * 1e3, 1),
               "bytes_per_token": bytes_per_token,
               "decode_effective_GBps": round(tps * bytes_per_token / 1e9, 2),
               # against the probe taken just before the best round (load on the machine then included)
               "decode_fraction_of_probe_before": round(tps * bytes_per_token / probe, 4),
               "prefill_ms_all_rounds": [round(r[0] * 1e3, 1) for r in self.rounds],
               "decode_s_all_rounds": [round(r[1], 3) for r in self.rounds],
               "probe_GBps_all_rounds": [round(r[2] / 1e9, 2) for r in self.rounds],
               "probe_after_GBps_all_rounds": [round(b / 1e9, 2) for b in self.probes_after],
               # each round against the higher of the probes just before and just after it (the bandwidth the
               # machine had then), the median over rounds: what the roofline target is judged on
               "decode_fraction_of_round_bandwidth_median": round(statistics.median(
                   (new_tokens - 1) / r[1] * bytes_per_token / max(r[2], after)
                   for r, after in zip(self.rounds, self.probes_after)), 4),
               "providers": self.providers}
        if len(self.rounds[0]) > 3:
            out["sampling_ms_per_token_median"] = round(statistics.median(r[3] for r in self.rounds), 3)
        return out


def step_opener(artifact, threads: int):
    """A Runner opener for an artifact's engine, argmax on its logits."""
    from qwen3export.runner import open_engine

    def opener():
        step = open_engine(artifact, threads=threads)
        return (lambda p, n: timed_generation(step, step.empty_cache(1), p, n)), getattr(step, "providers", None), None

    return opener


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

        runners.append(Runner(engine, step_opener(artifact, args.threads)))
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

    name, overrides = parse_model(text)
    spec, source, _ = resolve(name, **overrides)
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    bpt = weight_bytes_per_token(spec, 4)
    builds, lowering, runners = {}, {}, []
    for engine in ENGINES:  # builds first, one at a time (each holds the eager model and its program)
        artifact, builds[engine] = built_artifact(name, overrides, spec, Path(args.work), engine)
        lowering[engine] = artifact.manifest["lowering"]

        runners.append(Runner(engine, step_opener(artifact, args.threads)))

    def hf_opener():
        torch.set_num_threads(args.threads)
        step = transformers_step(transformers_model(spec, build_module(spec, source, torch.float32)))
        return (lambda p, n: timed_generation(step, None, p, n)), ["transformers (torch eager)"], None

    runners.append(Runner("transformers_eager", hf_opener))
    # round-robin when all three copies of the weights fit in half the free memory (the fair comparison on a
    # machine shared with other work); else one engine after another (two 30B-A3B engines and the eager
    # model need ~22 GB in fp32)
    together = fits_together(args, len(runners) * spec.param_count() * 4)
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


# --- against the peer (issue 18): ONNX Runtime GenAI on the same HF folder; MoE against transformers ---------------

# issue 18's targets: name -> (the ratio it reads, the least it must reach)
TARGETS = {"fp32_as_run_vs_peer_fp32_decode": ("fp32_as_run_vs_peer_decode", 1.1),
           "fp32_as_run_fraction_of_roofline": ("fp32_as_run_fraction_of_roofline", 0.8),
           "int4_as_run_vs_peer_int4_decode": ("int4_as_run_vs_peer_decode", 1.2),
           "moe_as_run_vs_transformers_decode": ("moe_as_run_vs_transformers_decode", 2.0),
           "fp32_prefill_vs_peer": ("fp32_prefill_vs_peer", 1.0),
           "int4_prefill_vs_peer": ("int4_prefill_vs_peer", 1.0)}
OURS = {"fp32": {}, "int4": {"quant": "int4"}}  # BuildOptions fields beyond the defaults (what `build` gives)


def code_fingerprint() -> str:
    """A hash of the build's Python sources: an artifact built by other code is rebuilt, not reused."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for d in ("qwen3export", "graphs", "kernels", "autotune", "targets"):
        for f in sorted((root / d).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def ours_artifact(model: str, overrides: dict, work: Path, tag: str, fields: dict, any_code: bool = False):
    """Our artifact for `model` built with `fields` under work/ours-TAG (reused when the stamp beside it names the
    same model, fields and build code, or any code with `any_code`) -> (artifact, build seconds or None when
    reused)."""
    from qwen3export.artifact import load_artifact
    from qwen3export.errors import ParityError
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build

    out, stamp = work / f"ours-{tag}", work / f"ours-{tag}.bench.json"
    want = {"model": model, "overrides": overrides, "fields": fields, "code": code_fingerprint()}
    if stamp.is_file():
        have = json.loads(stamp.read_text())
        failed = have.pop("parity_failed", None)
        if have == want or (any_code and {**have, "code": None} == {**want, "code": None}):
            if failed:  # this code failed its parity gate before: not built again
                raise ParityError(failed)
            if (out / "manifest.json").is_file():
                return load_artifact(out, verify_checksums=False), None
    clear_stale(out)
    t0 = time.perf_counter()
    try:
        build(BuildOptions.of(model=model, artifact=out, overrides=overrides, force=True, **fields),
              progress=lambda m: print(f"ours {tag}: {m}", file=sys.stderr, flush=True))
    except ParityError as e:
        stamp.write_text(json.dumps({**want, "parity_failed": str(e)}))
        raise
    seconds = time.perf_counter() - t0
    stamp.write_text(json.dumps(want))
    gc.collect()
    return load_artifact(out, verify_checksums=False), seconds


def onnx_bytes_per_token(path: Path) -> int:
    """Bytes of the initializers a batch-1 decode step of this ONNX model reads: all of them (subgraphs included),
    except a table only gathered from (an embedding not shared with the lm_head reads one row)."""
    from collections import defaultdict

    import onnx
    from onnx.helper import tensor_dtype_to_np_dtype

    model = onnx.load(str(path), load_external_data=False)
    consumers, inits = defaultdict(set), {}

    def walk(graph):
        for t in graph.initializer:
            inits[t.name] = t
        for node in graph.node:
            for name in node.input:
                consumers[name].add(node.op_type)
            for a in node.attribute:
                for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                    walk(g)

    walk(model.graph)
    half = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}
    total = 0.0
    for name, t in inits.items():
        if consumers[name] and consumers[name] <= {"Gather", "GatherBlockQuantized"}:
            continue
        n = 1
        for d in t.dims:
            n *= d
        total += n * (0.5 if t.data_type in half else tensor_dtype_to_np_dtype(t.data_type).itemsize)
    return int(total)


class Shared:
    """One loaded engine that several runners use (as run and argmax on the same sessions)."""

    def __init__(self, load):
        self.load, self.value, self.users = load, None, 0

    def acquire(self):
        if self.value is None:
            self.value = self.load()
        self.users += 1
        return self.value

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.value = None
            gc.collect()


def ours_runners(tag: str, artifact, threads: int) -> list[Runner]:
    """`ours_TAG_as_run` (decoder + the artifact's sampling graph per token, as `run --greedy` steps it) and
    `ours_TAG_argmax` (argmax on the decoder's logits) over one engine."""
    from qwen3export.runner import open_engine, sampling_pair

    def load():
        engine = open_engine(artifact, threads=threads)
        graph, sampler = sampling_pair(artifact, threads, engine)
        return engine, graph, sampler

    shared = Shared(load)

    def as_run():
        engine, graph, sampler = shared.acquire()
        return ((lambda p, n: timed_sampled_generation(engine, sampler, graph, artifact.manifest, p, n)),
                getattr(engine, "providers", None), shared.release)

    def argmax():
        engine, _, _ = shared.acquire()
        return ((lambda p, n: timed_generation(engine, engine.empty_cache(1), p, n)),
                getattr(engine, "providers", None), shared.release)

    return [Runner(f"ours_{tag}_as_run", as_run), Runner(f"ours_{tag}_argmax", argmax)]


def run_rounds(runners: list[Runner], prompt, new_tokens: int, rounds: int, bandwidth: Bandwidth,
               together: bool) -> str:
    """Round-robin over all runners (one round of each in turn) when `together`, else one runner after another."""
    if together:
        for r in runners:
            r.open()
        for _ in range(rounds):
            for r in runners:
                r.round(prompt, new_tokens, bandwidth)
        for r in runners:
            r.close()
        return "round-robin"
    for r in runners:
        r.open()
        for _ in range(rounds):
            r.round(prompt, new_tokens, bandwidth)
        r.close()
    return "one engine after another"


def match_length(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def bench_dense_vs_peer(text: str, args, bandwidth: Bandwidth, peer_python: Path) -> dict:
    """Ours fp32 and int4 (as run and argmax) against ONNX Runtime GenAI's fp32 and int4 CPU models, all built
    from one HF folder, round-robin."""
    import peer_env
    from qwen3export.errors import ParityError
    from qwen3export.model import resolve

    name, overrides = parse_model(text)
    spec, _, _ = resolve(name, args.seed, **overrides)
    work = Path(args.work)
    label = f"{spec.name}-seed{args.seed}-trained"
    hf = peer_env.write_hf_folder(spec, work / "hf" / label, args.seed, "trained",
                                  progress=lambda m: print(m, file=sys.stderr, flush=True))
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    runners, meta, builds = [], {}, {}
    notes = {}
    for tag, fields in OURS.items():
        try:
            artifact, builds[f"ours_{tag}"] = ours_artifact(str(hf), {}, work, f"{label}-{tag}", fields,
                                                                 args.reuse_builds)
        except ParityError as e:  # recorded, and the engine the parity gate does pass is measured instead
            if fields.get("quant") != "int4":
                raise
            notes[f"ours_{tag}"] = f"the default --quant int4 build failed its parity gate ({e}); measured: " \
                                   "--int4-accuracy 0 (fp32 activations)"
            print(f"ours {tag}: {notes[f'ours_{tag}']}", file=sys.stderr, flush=True)
            artifact, builds[f"ours_{tag}"] = ours_artifact(str(hf), {}, work, f"{label}-{tag}-acc0",
                                                             {**fields, "int4_accuracy": 0}, args.reuse_builds)
        decoder = artifact.onnx_file(artifact.manifest["engine"]["file"])
        q = artifact.manifest.get("quantization") or {}
        info = {"bytes_per_token": onnx_bytes_per_token(decoder), "artifact": str(artifact.path),
                "quantization": {k: q.get(k) for k in ("mode", "group_size", "quantize_lm_head", "accuracy_level")}
                if q else None, "decoder_ops": peer_env.model_op_counts(decoder),
                "parity_passed": artifact.manifest["parity"].get("passed")}
        for r in ours_runners(tag, artifact, args.threads):
            runners.append(r)
            meta[r.name] = info
        folder, builds[f"peer_{tag}"] = peer_env.build_peer_model(
            peer_python, hf, work / "peer" / f"{label}-{tag}", tag, args.threads,
            progress=lambda m: print(m, file=sys.stderr, flush=True))

        def peer_opener(folder=folder):
            g = peer_env.PeerGenerator(peer_python, folder, args.threads)
            return (lambda p, n: g.generate(p[0].tolist(), n)), [f"onnxruntime-genai {g.info['onnxruntime_genai']} "
                                                                 "(CPU)"], g.close

        runners.append(Runner(f"peer_{tag}", peer_opener))
        meta[f"peer_{tag}"] = {"bytes_per_token": onnx_bytes_per_token(folder / "model.onnx"), "artifact": str(folder),
                               "decoder_ops": peer_env.model_op_counts(folder),
                               "decoder_only": "n/a: its greedy search runs inside the generator (C++), so as run "
                                               "is its decoder plus an argmax"}
    # our fp32 engine, the peer's fp32 model and the int4 ones: ~2.5 x fp32 weights in all
    together = fits_together(args, 3 * spec.param_count() * 4)
    schedule = run_rounds(runners, prompt, args.new_tokens, args.rounds, bandwidth, together)
    engines = {r.name: {**r.summary(args.new_tokens, meta[r.name]["bytes_per_token"]),
                        **{k: v for k, v in meta[r.name].items() if k != "bytes_per_token"}} for r in runners}
    tokens = {r.name: r.tokens for r in runners}
    return {"model": spec.name, "overrides": overrides, "hf_folder": str(hf), "seed": args.seed, "notes": notes,
            "weight_stats": "trained", "param_count": spec.param_count(), "schedule": schedule,
            "build_s": {k: (round(v, 1) if v is not None else "reused") for k, v in builds.items()},
            "engines": engines,
            "greedy_match_length": {
                "ours_fp32_as_run_vs_argmax": match_length(tokens["ours_fp32_as_run"], tokens["ours_fp32_argmax"]),
                "ours_int4_as_run_vs_argmax": match_length(tokens["ours_int4_as_run"], tokens["ours_int4_argmax"]),
                "ours_fp32_vs_peer_fp32": match_length(tokens["ours_fp32_argmax"], tokens["peer_fp32"]),
                "ours_int4_vs_peer_int4": match_length(tokens["ours_int4_argmax"], tokens["peer_int4"]),
                "of": args.new_tokens}}


def bench_moe_vs_transformers(text: str, args, bandwidth: Bandwidth) -> dict:
    """Ours fp32 (as run and argmax) against transformers eager on a MoE preset (the peer's builder refuses
    Qwen3-MoE); one after another when two fp32 copies do not fit in half the free memory."""
    from qwen3export.model import build_module, resolve

    name, overrides = parse_model(text)
    spec, source, _ = resolve(name, args.seed, **overrides)
    prompt = torch.randint(0, spec.vocab_size, (1, args.prompt_len), generator=torch.Generator().manual_seed(0))
    label = f"{spec.name}-{'-'.join(f'{k}{v}' for k, v in sorted(overrides.items()))}-seed{args.seed}-fp32"
    artifact, build_s = ours_artifact(name, overrides, Path(args.work), label, OURS["fp32"], args.reuse_builds)
    bpt = weight_bytes_per_token(spec, 4)
    runners = ours_runners("moe_fp32", artifact, args.threads)

    def hf_opener():
        torch.set_num_threads(args.threads)
        step = transformers_step(transformers_model(spec, build_module(spec, source, torch.float32)))
        return (lambda p, n: timed_generation(step, None, p, n)), ["transformers (torch eager)"], None

    runners.append(Runner("transformers_eager", hf_opener))
    together = fits_together(args, 2 * spec.param_count() * 4)
    schedule = run_rounds(runners, prompt, args.new_tokens, args.rounds, bandwidth, together)
    tokens = {r.name: r.tokens for r in runners}
    return {"model": spec.name, "overrides": overrides, "seed": args.seed, "layers": spec.num_hidden_layers,
            "experts": spec.num_experts, "top_k": spec.num_experts_per_tok, "param_count": spec.param_count(),
            "schedule": schedule, "build_s": {"ours_moe_fp32": round(build_s, 1) if build_s else "reused"},
            "bytes_per_token_rule": "weights read: router and top-k experts of each MoE layer, embedding gathered",
            "engines": {r.name: r.summary(args.new_tokens, bpt) for r in runners},
            "greedy_match_length": {
                "ours_as_run_vs_transformers": match_length(tokens["ours_moe_fp32_as_run"], tokens["transformers_eager"]),
                "ours_argmax_vs_transformers": match_length(tokens["ours_moe_fp32_argmax"], tokens["transformers_eager"]),
                "of": args.new_tokens}}


def dense_ratios(e: dict) -> dict:
    """The dense model's ratios against the peer, from its engines' summaries."""
    return {"fp32_as_run_vs_peer_decode": e["ours_fp32_as_run"]["decode_tokens_per_s_median"]
            / e["peer_fp32"]["decode_tokens_per_s_median"],
            "int4_as_run_vs_peer_decode": e["ours_int4_as_run"]["decode_tokens_per_s_median"]
            / e["peer_int4"]["decode_tokens_per_s_median"],
            "fp32_argmax_vs_peer_decode": e["ours_fp32_argmax"]["decode_tokens_per_s_median"]
            / e["peer_fp32"]["decode_tokens_per_s_median"],
            "int4_argmax_vs_peer_decode": e["ours_int4_argmax"]["decode_tokens_per_s_median"]
            / e["peer_int4"]["decode_tokens_per_s_median"],
            "fp32_prefill_vs_peer": e["peer_fp32"]["prefill_ms_median"] / e["ours_fp32_as_run"]["prefill_ms_median"],
            "int4_prefill_vs_peer": e["peer_int4"]["prefill_ms_median"] / e["ours_int4_as_run"]["prefill_ms_median"],
            "fp32_as_run_fraction_of_roofline": e["ours_fp32_as_run"]["decode_fraction_of_round_bandwidth_median"],
            "fp32_as_run_fraction_of_run_ceiling": e["ours_fp32_as_run"]["decode_fraction_of_roofline_median"]}


PAIRS = {"fp32_as_run_vs_peer_decode": (0, "ours_fp32_as_run", "peer_fp32"),
         "int4_as_run_vs_peer_decode": (0, "ours_int4_as_run", "peer_int4"),
         "moe_as_run_vs_transformers_decode": (1, "ours_moe_fp32_as_run", "transformers_eager")}


def pair_engines(dense: dict | None, moe: dict | None):
    """(ratio key, our engine's summary, the other engine's) for each of PAIRS whose model was run."""
    for key, (i, ours, theirs) in PAIRS.items():
        model = (dense, moe)[i]
        if model is not None:
            yield key, model["engines"][ours], model["engines"][theirs]


FAST_MODE = 0.75  # of the run's highest probe: this host's probes sit at ~33 or at ~54-62 GB/s, little between


def by_bandwidth_mode(e: dict, ceiling: float, new_tokens: int) -> dict:
    """An engine's median decode tok/s over its rounds in each bandwidth mode of the host (FAST_MODE), and
    how many rounds fell in each."""
    modes = {"fast": [], "slow": [], "mixed": []}
    for dec, before, after in zip(e["decode_s_all_rounds"], e["probe_GBps_all_rounds"],
                                  e["probe_after_GBps_all_rounds"]):
        fast = [b * 1e9 >= FAST_MODE * ceiling for b in (before, after)]
        modes["fast" if all(fast) else "slow" if not any(fast) else "mixed"].append((new_tokens - 1) / dec)
    out = {m: round(statistics.median(v), 3) if v else None for m, v in modes.items() if m != "mixed"}
    out["rounds"] = {m: len(v) for m, v in modes.items()}
    return out


def ratios_by_mode(dense: dict | None, moe: dict | None) -> dict:
    """Each decode ratio of PAIRS within one bandwidth mode (both engines' rounds in it), None where either
    engine had no round in that mode."""
    out = {}
    for key, o, t in pair_engines(dense, moe):
        o, t = o["decode_tokens_per_s_median_by_bandwidth_mode"], t["decode_tokens_per_s_median_by_bandwidth_mode"]
        out[key] = {m: round(o[m] / t[m], 3) if o[m] and t[m] else None for m in ("slow", "fast")}
    return out


def ratio_ceilings(dense: dict | None, moe: dict | None) -> dict:
    """The most each decode ratio could be on this machine: ours reading its bytes at the full bandwidth of its
    rounds (fraction 1.0) against the other engine as measured, i.e. (their bytes / ours) / their fraction of
    their rounds' bandwidth. A target above its ceiling cannot be met by a faster engine, only by fewer bytes."""
    out = {}
    for key, o, t in pair_engines(dense, moe):
        fraction = t["decode_fraction_of_round_bandwidth_median"]
        out[key] = round(t["bytes_per_token"] / o["bytes_per_token"] / fraction, 3)
    return out


def peer_ratios(dense: dict | None, moe: dict | None) -> dict:
    """Issue 18's ratios from the median rounds: decode ours / the peer's (> 1: ours faster), prefill the peer's
    ms / ours (> 1: ours faster), our fp32 as run against the roofline."""
    r = {}
    if dense is not None:
        r.update(dense_ratios(dense["engines"]))
    if moe is not None:
        m = moe["engines"]
        r["moe_as_run_vs_transformers_decode"] = (m["ours_moe_fp32_as_run"]["decode_tokens_per_s_median"]
                                                  / m["transformers_eager"]["decode_tokens_per_s_median"])
        r["moe_argmax_vs_transformers_decode"] = (m["ours_moe_fp32_argmax"]["decode_tokens_per_s_median"]
                                                  / m["transformers_eager"]["decode_tokens_per_s_median"])
    return {k: round(v, 3) for k, v in r.items()}


def bench_vs_peer(args, bandwidth: Bandwidth) -> dict:
    import peer_env

    log = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
    models = args.model or DEFAULT_MODELS
    # a dense model meets the peer; a MoE one (or the second model given) meets transformers; either may be absent
    dense_text = next((m for m in models if not is_moe(m)), None)
    dense = python = None
    if dense_text is not None:
        python = peer_env.peer_python(progress=log)
        dense = bench_dense_vs_peer(dense_text, args, bandwidth, python)
        # the dense half on its own, in case the MoE half (builds of a few GB) does not get to the end
        (Path(args.work) / "decode_cpu.dense.json").write_text(json.dumps(dense, indent=2))
    moe_text = next((m for m in models if m != dense_text), None)
    moe = bench_moe_vs_transformers(moe_text, args, bandwidth) if moe_text else None
    for m in filter(None, (dense, moe)):  # the roofline from the highest bandwidth seen anywhere in the run
        for e in m["engines"].values():
            roofline = bandwidth.ceiling / e["bytes_per_token"]
            e["decode_roofline_tokens_per_s"] = round(roofline, 3)
            e["decode_fraction_of_roofline"] = round(e["decode_tokens_per_s"] / roofline, 4)
            e["decode_fraction_of_roofline_median"] = round(e["decode_tokens_per_s_median"] / roofline, 4)
            e["decode_tokens_per_s_median_by_bandwidth_mode"] = by_bandwidth_mode(e, bandwidth.ceiling, args.new_tokens)
    ratios = peer_ratios(dense, moe)
    met = {k: ratios[key] >= least for k, (key, least) in TARGETS.items() if key in ratios}
    return {"peer": {"package": "onnxruntime-genai", "environment": str(peer_env.VENV),
                     "installed": peer_env.installed_versions(python) if python else "not run (no dense model given)",
                     "pins": peer_env.PINS,
                     "builder": "python -m onnxruntime_genai.models.builder -i HF -o OUT -p fp32|int4 -e cpu "
                                "(its defaults otherwise: int4 with the lm_head quantized, accuracy level 4)"},
            "models": [m for m in (dense, moe) if m],
            "ratios": ratios, "ratios_rule": "median rounds; decode: ours tok/s / theirs; prefill: their ms / ours; "
                                             "roofline: bytes per token x tok/s over the bandwidth probed around "
                                             "each round (fraction_of_run_ceiling: over the highest probe of the "
                                             "whole run instead)",
            "ratio_ceilings_at_full_bandwidth": ratio_ceilings(dense, moe),
            "ratios_by_bandwidth_mode": ratios_by_mode(dense, moe),
            "bandwidth_mode_rule": f"a round is 'fast' when the probes before and after it are both >= "
                                   f"{FAST_MODE} x the run's highest probe, 'slow' when both are below, else "
                                   "'mixed' (left out); median decode tok/s of each engine's rounds in that mode",
            "targets": {k: {"ratio": key, "at_least": least} for k, (key, least) in TARGETS.items()},
            "targets_met": met,
            "targets_missing_by": {k: round(least / ratios[key], 3) for k, (key, least) in TARGETS.items()
                                   if key in ratios and not met[k]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--compare", choices=("peer", "lowering"), default="peer", help="peer (default): ours against "
                    "ONNX Runtime GenAI on the same HF folder, and MoE against transformers; lowering: our lowered "
                    "and unlowered engines against transformers")
    ap.add_argument("--model", action="append", help=f"NAME[:field=value,...], repeatable (default: "
                    f"{' and '.join(DEFAULT_MODELS)}; with --compare peer the first dense one meets the peer and a "
                    "second one is the MoE)")
    ap.add_argument("--quick", action="store_true", help=f"{QUICK['new_tokens']} new tokens and {QUICK['rounds']} "
                    "rounds unless given (a few minutes once the builds are there)")
    ap.add_argument("--seed", type=int, default=0, help="weights' seed (--compare peer)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=None, help="default 64")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--schedule", choices=("auto", "round-robin", "sequential"), default="auto",
                    help="round-robin: one round of each engine in turn (the fair comparison on a noisy machine); "
                         "sequential: one engine after another (less memory); auto (default): round-robin when "
                         "the engines' weights fit in half the free memory")
    ap.add_argument("--rounds", type=int, default=None, help="generation rounds per engine (default 5); the best "
                    "and the median reported, ratios from the median")
    ap.add_argument("--work", default="dist/bench", help="where the engine artifacts are built (reused if present)")
    ap.add_argument("--reuse-builds", action="store_true", help="reuse our artifacts under --work even when the "
                    "build code changed since (default: rebuilt then); an artifact whose files the current runtime "
                    "no longer reads (a changed sampling graph interface) fails, so use it within one code state")
    ap.add_argument("--quant", action="append", help="int4 | int8 | fp8, optionally +lm_head; repeatable: measure "
                    "our fp32 engine against these quantized engines instead of the unlowered / transformers peers")
    ap.add_argument("--group-size", type=int, default=128, help="int4 group size (default 128)")
    ap.add_argument("--accuracy-levels", default="0,4", help="MatMulNBits accuracy levels to run each quantized "
                    "engine at (default 0,4; 0 is the parity-checked setting)")
    args = ap.parse_args()
    args.accuracy_levels = [int(x) for x in args.accuracy_levels.split(",") if x.strip()]
    defaults = QUICK if args.quick else FULL
    args.new_tokens = args.new_tokens or defaults["new_tokens"]
    args.rounds = args.rounds or defaults["rounds"]

    import onnxruntime
    import transformers

    t0 = time.perf_counter()
    bandwidth = Bandwidth(args.threads)
    result: dict = {}
    if args.quant or args.compare == "lowering":
        bench = bench_quant_model if args.quant else bench_model
        models = [bench(m, args, bandwidth) for m in (args.model or DEFAULT_MODELS)]
        for m in models:  # the roofline from the highest bandwidth seen anywhere in the run
            for e in m["engines"].values():
                roofline = bandwidth.ceiling / e.get("weight_bytes_per_token", m.get("weight_bytes_per_token"))
                e["decode_roofline_tokens_per_s"] = round(roofline, 3)
                e["decode_fraction_of_roofline"] = round(e["decode_tokens_per_s"] / roofline, 4)
            if "weight_bytes_per_token" in m:
                m["decode_roofline_tokens_per_s"] = round(bandwidth.ceiling / m["weight_bytes_per_token"], 3)
        result["models"] = models
    else:
        result = bench_vs_peer(args, bandwidth)
    print(json.dumps({
        "benchmark": "decode_cpu", "compare": "quant" if args.quant else args.compare, "quick": args.quick,
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "transformers": transformers.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "dtype": "fp32", "quant": args.quant or "none", "batch": 1, "prompt_len": args.prompt_len,
        "new_tokens": args.new_tokens, "rounds": args.rounds,
        "memory_read_bandwidth_GBps": {"ceiling": round(bandwidth.ceiling / 1e9, 2),
                                       "probes": [round(b / 1e9, 2) for b in bandwidth.probes]},
        "roofline": "decode tokens/s = bandwidth ceiling (highest probe) / weight bytes read per token",
        "as_run": "decoder step + the artifact's sampling graph per token, greedy, as `qwen3export run --greedy` "
                  "steps it (cli.CallTimer / run_timing); argmax: argmax on the decoder's logits",
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "wall_s": round(time.perf_counter() - t0, 1),
        **result,
        "measured": True,
    }, indent=2))


if __name__ == "__main__":
    main()
