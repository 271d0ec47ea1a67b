"""Reduced-precision error benchmark: fp16 / bf16 eager decoders and the fp16 ONNX engine against the fp32 eager
decoder, with the parity gate's own metric and thresholds (parity.check_parity), on presets drawn with the
"trained" weight statistics (synthetic_weights.py). Prints one JSON object.

    python benchmarks/precision.py [--models tiny,tiny-moe,qwen3-0.6b,...] [--layers 4] [--threads 1]

A model is NAME[:field=value,...][@STATS]: fields override the preset (decode_cpu.py parse_model), @small draws
the old N(0, 0.02) statistics for contrast; --layers sets num_hidden_layers of qwen3-0.6b unless given. Rows:
- eager_fp16 / eager_bf16: graphs/decoder.py in that dtype (an fp16 decoder keeps its residual stream in fp32),
  logits handed to check_parity as fp32;
- onnx_fp16: the fp16 decoder captured, lowered (pipeline.lower_program), emitted in standard ONNX ops and run
  by ONNX Runtime on CPU with an fp16 KV cache (runner.OnnxEngine); skipped over ONNX_MAX_WEIGHT_BYTES;
- naive_fp16: no engine. The fp32 reference's residual stream, measured with forward hooks: max |residual| per
  layer, and the sum of squares every RMSNorm would take had it squared the residual in fp16
  (x.half().pow(2).sum(-1)); where that is Inf is what the graph's fp32 residual and fp32 norm math prevent.
The fp32 reference runs once per model and is replayed to each row (ReplayedReference).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from decode_cpu import parse_model  # benchmarks/ is on sys.path when this file runs as a script

DEFAULT_MODELS = "tiny,tiny-moe,qwen3-0.6b,qwen3-30b-a3b:num_hidden_layers=2,tiny-moe@small"
# the fp16 ONNX row captures, lowers and exports the model: a 2-layer qwen3-30b-a3b (3.7 GB in fp16) would
# take most of the run's memory and minutes; a 4-layer qwen3-0.6b (0.43 GB) takes well under a minute
ONNX_MAX_WEIGHT_BYTES = 1 << 30
FP16_MAX = torch.finfo(torch.float16).max  # 65,504
ROW_KEYS = ("logits_scaled_err", "logits_max_abs", "top1_agreement", "greedy_tokens_matching", "new_tokens",
            "passed", "failures")


def parse_entry(text: str, layers: int | None) -> tuple[str, str, dict, str]:
    """`qwen3-0.6b:num_hidden_layers=2@small` -> (label, preset name, overrides, weight statistics); `layers`
    (None: the preset's) becomes qwen3-0.6b's num_hidden_layers unless the text sets it."""
    body, _, stats = text.partition("@")
    name, overrides = parse_model(body)
    if name == "qwen3-0.6b" and layers is not None:
        overrides.setdefault("num_hidden_layers", layers)
    stats = stats or "trained"
    label = name + (":" + ",".join(f"{k}={v}" for k, v in overrides.items()) if overrides else "")
    return label + (f"@{stats}" if stats != "trained" else ""), name, overrides, stats


class Float32Logits:
    """A reduced-precision step whose logits come back as fp32 (the reference's dtype), run without autograd."""

    def __init__(self, step):
        self.step = step

    def empty_cache(self, batch: int) -> tuple:
        return self.step.empty_cache(batch)

    def __call__(self, *args):
        with torch.no_grad():
            logits, present = self.step(*args)
        return logits.float(), present


class ReplayedReference:
    """The fp32 eager decoder as a step that computes each call once: check_parity feeds the reference the
    same calls for every row (its own greedy tokens), so later rows get the stored outputs, each call's inputs
    compared with the stored ones (any difference recomputes from there)."""

    def __init__(self, model):
        self.model, self.calls, self.at, self.computed = model, [], 0, 0
        self.spec = model.spec  # check_parity picks the MoE bound from the reference's spec

    def empty_cache(self, batch: int) -> tuple:
        self.at = 0  # a new generation starts
        return self.model.empty_cache(batch)

    def __call__(self, input_ids, position_ids, attention_mask, past):
        key = (input_ids, position_ids, attention_mask)
        if self.at < len(self.calls) and all(torch.equal(a, b) for a, b in zip(self.calls[self.at][0], key)):
            out = self.calls[self.at][1]
        else:
            with torch.no_grad():
                out = self.model(input_ids, position_ids, attention_mask, past)
            del self.calls[self.at:]
            self.calls.append((tuple(t.clone() for t in key), out))
            self.computed += 1
        self.at += 1
        return out


def converted(model, dtype: torch.dtype):
    """build_module(spec, source, dtype) without drawing the weights again (25 s for a 2-layer qwen3-30b-a3b):
    the fp32 module's tensors rounded to `dtype`, as load_into rounds source.get(name).to(dtype)."""
    from qwen3export.graphs.decoder import Qwen3Decoder

    out = Qwen3Decoder.empty(model.spec, dtype)
    with torch.no_grad():
        out.load_state_dict(model.state_dict())
    out.reset_derived()
    return out


def onnx_fp16_engine(half, folder: Path, threads: int):
    """The fp16 decoder captured, lowered and emitted ("standard" ops) under `folder`, in an ORT session."""
    from qwen3export.artifact import Artifact
    from qwen3export.backends.onnx import emit_decoder
    from qwen3export.graph_capture import capture
    from qwen3export.lowering import lower_program
    from qwen3export.runner import OnnxEngine

    spec = half.spec
    lowered, record = lower_program(capture(half))
    entry = emit_decoder(lowered, spec, folder, "standard")
    manifest = {"model": {"spec": spec.to_dict()}, "engine": entry, "dtype": "fp16",
                "target": {"ort_providers": ["CPUExecutionProvider"]}}
    return OnnxEngine(Artifact(folder, manifest), threads), record["passes"]


def parity_row(engine, reference: ReplayedReference, spec, dtype: str) -> dict:
    """check_parity of `engine` against the fp32 reference under `dtype`'s thresholds, with its wall time."""
    from qwen3export.parity import check_parity

    t0 = time.perf_counter()
    r = check_parity(engine, engine.empty_cache(2), reference, reference.empty_cache(2), spec.vocab_size, dtype)
    row = {k: r[k] for k in ROW_KEYS}
    row["finite"] = all(r["prefill"]["finite"].values()) and all(r["decode"]["finite"].values())
    bound = r.get("bound", r["thresholds"]["logits_scaled"])  # the bound applied (MoE models get their own)
    row["threshold_logits_scaled"] = bound
    row["err_over_threshold"] = None if r["logits_scaled_err"] is None else r["logits_scaled_err"] / bound
    row["seconds"] = round(time.perf_counter() - t0, 1)
    return row


@torch.no_grad()
def naive_fp16(model) -> tuple[dict, dict]:
    """(the naive_fp16 row, the reference logits' statistics) from one fp32 prefill of the parity prompts."""
    from qwen3export.generation import left_pad, position_ids_from_mask
    from qwen3export.parity import parity_prompts

    spec = model.spec
    ids, mask = left_pad(parity_prompts(spec.vocab_size))
    real = mask.bool()  # [B, S]: padding positions are not looked at
    residual, squares, handles = [], {}, []

    def norm_input(site: str):
        def hook(module, args):
            x = args[0][real]  # [P, H], the fp32 residual stream the norm reads
            squares[site] = {"fp32": x.double().pow(2).sum(-1).max().item(),
                             "fp16_inf": bool(torch.isinf(x.half().pow(2).sum(-1)).any())}
        return hook

    for i, layer in enumerate(model.model.layers):
        handles.append(layer.register_forward_hook(
            lambda m, args, out: residual.append(out[0][real].abs().max().item())))
        for site in ("input_layernorm", "post_attention_layernorm"):
            handles.append(getattr(layer, site).register_forward_pre_hook(norm_input(f"layers.{i}.{site}")))
    handles.append(model.model.norm.register_forward_pre_hook(norm_input("norm")))
    try:
        logits, _ = model(ids, position_ids_from_mask(mask), mask, model.empty_cache(ids.shape[0]))
    finally:
        for h in handles:
            h.remove()
    top = max(residual)
    overflowing = [site for site, s in squares.items() if s["fp16_inf"]]
    row = {
        "residual_max_abs_per_layer": [round(r, 2) for r in residual],
        "residual_max_abs": round(top, 2),
        "residual_fits_fp16_range": top <= FP16_MAX,
        # fp16 has 10 mantissa bits: the gap between neighbours at the largest residual
        "fp16_spacing_at_max_residual": 2.0 ** (math.floor(math.log2(top)) - 10) if top > 0 else None,
        "final_norm_sum_of_squares_max": squares["norm"]["fp32"],
        "overflows_in_fp16_sum_of_squares": squares["norm"]["fp16_inf"],
        "norms_whose_fp16_sum_of_squares_overflows": f"{len(overflowing)} of {len(squares)}",
        "first_overflowing_norm": overflowing[0] if overflowing else None,
    }
    real_logits = logits[real].double()  # [P, V]
    stats = {"max": real_logits.max().item(), "max_abs": real_logits.abs().max().item(),
             "std_mean_over_rows": real_logits.std(-1).mean().item(),
             "row_max_median": real_logits.amax(-1).median().item()}
    return row, stats


def bench_model(text: str, args) -> dict:
    from qwen3export.model import build_module, resolve

    label, name, overrides, stats = parse_entry(text, args.layers)
    t0 = time.perf_counter()
    spec, source, _ = resolve(name, weight_stats=stats, **overrides)
    fp32 = build_module(spec, source, torch.float32)
    build_s = time.perf_counter() - t0
    naive, ref_stats = naive_fp16(fp32)
    reference = ReplayedReference(fp32)
    rows, lowering = {}, None
    fp16_bytes = 2 * spec.param_count()
    for dtype, torch_dtype in (("fp16", torch.float16), ("bf16", torch.bfloat16)):
        model = converted(fp32, torch_dtype)
        rows[f"eager_{dtype}"] = parity_row(Float32Logits(model), reference, spec, dtype)
        if dtype == "fp16" and fp16_bytes <= ONNX_MAX_WEIGHT_BYTES:
            with tempfile.TemporaryDirectory(prefix="qwen3export-precision-") as folder:
                t1 = time.perf_counter()
                engine, lowering = onnx_fp16_engine(model, Path(folder), args.threads)
                export_s = time.perf_counter() - t1
                rows["onnx_fp16"] = parity_row(Float32Logits(engine), reference, spec, "fp16")
                rows["onnx_fp16"]["capture_lower_emit_s"] = round(export_s, 1)
                del engine
        elif dtype == "fp16":
            rows["onnx_fp16"] = {"skipped": f"{fp16_bytes / 1e9:.2f} GB of fp16 weights > "
                                            f"{ONNX_MAX_WEIGHT_BYTES / 1e9:.2f} GB"}
        del model
    rows["naive_fp16"] = naive

    def ratio(a: str, b: str):
        x, y = rows[a].get("logits_scaled_err"), rows[b].get("logits_scaled_err")
        return None if x is None or not y else round(x / y, 3)

    return {
        "model": label, "preset": name, "overrides": overrides, "weight_stats": stats,
        "layers": spec.num_hidden_layers, "experts": spec.num_experts, "param_count": spec.param_count(),
        "build_s": round(build_s, 1), "reference_logits": ref_stats,
        "reference_calls_computed": reference.computed, "onnx_lowering": lowering,
        "rows": rows,
        "ratios": {"bf16_over_fp16": ratio("eager_bf16", "eager_fp16"),
                   "onnx_fp16_over_eager_fp16": ratio("onnx_fp16", "eager_fp16") if "logits_scaled_err"
                   in rows["onnx_fp16"] else None},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=DEFAULT_MODELS, help="models separated by commas, each "
                    f"NAME[:field=value,...][@small] (default {DEFAULT_MODELS})")
    ap.add_argument("--layers", type=int, default=4, help="num_hidden_layers of qwen3-0.6b (default 4)")
    # 1 thread: on this 2-core machine shared with other work, 2 threads ran a 4-layer qwen3-0.6b fp32 decode
    # step in 0.78 s against 0.11 s with 1 (measured, load average ~5)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import onnxruntime

    from qwen3export.parity import METRIC, THRESHOLDS

    t0 = time.perf_counter()
    models = [bench_model(m, args) for m in split_models(args.models)]
    by_label = {m["model"]: m for m in models}
    contrast = {}
    for m in models:  # a trained model's error next to the same preset's small-statistics one
        small = by_label.get(m["model"] + "@small")
        if small:
            contrast[m["model"]] = {row: (None if not small["rows"][row].get("logits_scaled_err") or
                                          m["rows"][row].get("logits_scaled_err") is None else
                                          round(m["rows"][row]["logits_scaled_err"]
                                                / small["rows"][row]["logits_scaled_err"], 2))
                                    for row in ("eager_fp16", "eager_bf16", "onnx_fp16")}
    print(json.dumps({
        "benchmark": "precision",
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count(),
                    "threads": args.threads, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__},
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "reference": "fp32 eager decoder (graphs/decoder.py) on the same weights",
        "metric": METRIC, "thresholds": THRESHOLDS,
        "models": models,
        "trained_over_small_scaled_err": contrast,
        "wall_s": round(time.perf_counter() - t0, 1),
        "measured": True,
    }, indent=2))


def split_models(text: str) -> list[str]:
    """`a,b:x=1,y=2,c@small` -> ['a', 'b:x=1,y=2', 'c@small']: a comma starts a new model unless what
    follows it is a field=value of the model before."""
    out: list[str] = []
    for part in filter(None, text.split(",")):
        if out and "=" in part.split("@")[0] and ":" in out[-1]:
            out[-1] += "," + part
        else:
            out.append(part)
    return out


if __name__ == "__main__":
    main()
