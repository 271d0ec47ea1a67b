"""What `qwen3export inspect` says about an artifact's engine, per backend: built or pending, its files with
checksums, and for GPU targets the kernel configs with how each was chosen (measured / modelled / default)."""

from __future__ import annotations

from typing import Any

from qwen3export.kernels.config import KernelConfig


def engine_status(manifest: dict[str, Any]) -> str:
    """"built" or "pending" (a TensorRT plan that needs TensorRT and the GPU to finish)."""
    engine = manifest.get("engine", {})
    if manifest["backend"] == "tensorrt":
        return engine.get("tensorrt", {}).get("status", "built")
    return engine.get("status", "built")


def engine_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The machine-readable per-backend summary (`inspect --json` "engine_summary")."""
    engine = manifest.get("engine", {})
    out: dict[str, Any] = {"backend": manifest["backend"], "status": engine_status(manifest),
                           "files": {rel: {"size": e["size"], "sha256": e["sha256"]}
                                     for rel, e in manifest.get("files", {}).items()}}
    if out["status"] == "pending":
        trt = engine.get("tensorrt", {})
        out["missing"], out["finish"] = trt.get("missing", []), trt.get("finish")
    if "parallel" in manifest:  # tp x ep rank parts (parallel_artifact.py)
        out["parallel"] = {k: manifest["parallel"][k] for k in ("tp", "ep", "world")}
        out["ranks"] = manifest.get("ranks", [])
    kernels = (manifest.get("kernels") or {}).get("kernels") or engine.get("kernels")
    if kernels:
        out["kernel_configs"] = [{"kernel": k["kernel"], "table": k.get("table"), "sources": k["sources"],
                                  "configs": k["configs"]} for k in kernels]
    return out


def engine_lines(manifest: dict[str, Any]) -> list[str]:
    """Human-readable lines for the same summary."""
    rec = engine_record(manifest)
    lines = [f"  engine   {rec['backend']}: {rec['status'].upper()}"]
    if rec["status"] == "pending":
        lines.append(f"    missing: {'; '.join(rec['missing'])}")
        if rec.get("finish"):
            lines.append(f"    finish:  {rec['finish']}")
    if "parallel" in rec:
        p = rec["parallel"]
        lines.append(f"  ranks    tp {p['tp']} x ep {p['ep']} = {p['world']} parts (a safetensors weight shard "
                     "each; the rank program is re-captured from the spec at load; gloo processes on CPU)")
        lines += [f"    rank {r['rank']}: tp_rank {r['tp_rank']} ep_rank {r['ep_rank']}  heads {r['heads']} kv_heads "
                  f"{r['kv_heads']} experts {r['experts']} vocab {r['vocab']}" for r in rec["ranks"]]
    for k in rec.get("kernel_configs", []):
        where = k["table"] or "no tuned table: kernel default"
        lines.append(f"  kernel   {k['kernel']:18s} [{', '.join(k['sources'])}] {where}")
        for bucket, c in k["configs"].items():
            config = c["config"] if isinstance(c["config"], str) else _label(c["config"])
            us = f"  {c['objective_us']:.2f} us" if c.get("objective_us") is not None else ""
            lines.append(f"    {bucket:16s} {config:52s} {c['source']}{us}")
    return lines


def _label(config: dict[str, Any]) -> str:
    return KernelConfig.from_dict(config).label


def quantization_lines(manifest: dict[str, Any]) -> list[str]:
    """A quantized artifact's record (mode, group, lm_head, scheme, bytes) and its not-gated comparison with
    the unquantized model; nothing for an unquantized one."""
    q = manifest.get("quantization")
    if not q:
        return []
    group = f" g{q['group_size']}" if q.get("group_size") not in (None, -1) else " per channel"
    lines = [f"  quant    {q['mode']}{group} ({q['scheme']}), lm_head {'quantized' if q['quantize_lm_head'] else 'fp'}"
             f"; weights {q['weight_bytes'] / 2**20:,.1f} MiB ({q['quantized_bytes'] / 2**20:,.1f} MiB quantized)"
             f" vs fp32 {q['fp32_model_bytes'] / 2**20:,.1f} MiB"]
    quality = (manifest.get("parity") or {}).get("quantization")
    if quality:
        lines.append("  " + quality_line(quality))
    return lines


def quality_line(quality: dict[str, Any]) -> str:
    """parity["quantization"]: quant_parity.compare_to_unquantized's report, or why it was not run."""
    if "not_run" in quality:
        return f"quantized vs unquantized: not run ({quality['not_run']})"
    return quant_summary_line({"quantization": quality})


def _num(x: float | None) -> str:
    return "NaN/Inf" if x is None else f"{x:.2e}"


def summary_line(report: dict[str, Any]) -> str:
    if report.get("not_run"):  # a streamed / parallel build with no check (streaming.py parity_not_run)
        later = f"; run it with `{report['command']}`" if report.get("command") else ""
        return f"parity NOT RUN ({report['not_run']}){later}"
    state = "PASS" if report["passed"] else "FAIL"
    if "functions" in report:  # a kernel pack (backends/kernel_pack.py verify_kernel_pack)
        inner = report.get("interpreter") or {}
        err = inner.get("logits_scaled_err", inner.get("logits_max_abs"))
        ran = (f"interpreter vs eager: logits scaled error {_num(err)}, greedy {inner['greedy_tokens_matching']}"
               f"/{inner['new_tokens']}" if inner.get("passed") is not None
               else f"interpreter check not run ({inner.get('not_run')})")
        return (f"parity {state}: kernel pack, {report['functions']} functions (cubin resources re-read, loader "
                f"rebuilt); {ran}; GPU launch not run here")
    if "logits_scaled_err" not in report:  # a manifest written before the scale-aware metric
        return (f"parity {state}: logits max abs {_num(report['logits_max_abs'])} (rel "
                f"{_num(report['logits_max_rel'])}), top-1 {report['top1_agreement']:.3f}, greedy "
                f"{report['greedy_tokens_matching']}/{report['new_tokens']} tokens match")
    return (f"parity {state}: logits scaled error {_num(report['logits_scaled_err'])} (max |engine - eager| / "
            f"max(1, max |eager|) per row; max abs {_num(report['logits_max_abs'])}), top-1 "
            f"{report['top1_agreement']:.3f}, greedy {report['greedy_tokens_matching']}/{report['new_tokens']} "
            f"tokens match")


def quant_summary_line(report: dict[str, Any]) -> str:
    q = report["quantization"]
    routers = q["router_topk_agreement"]
    router = (f", router top-k overlap {min(r['overlap'] for r in routers.values()):.3f}" if routers else "")
    return (f"quantized vs unquantized (not gated): KL mean {q['logits_kl']['mean']:.2e} max "
            f"{q['logits_kl']['max']:.2e}, top-1 {q['top1_agreement']:.3f}, greedy match "
            f"{q['greedy_match_length']['min']}/{q['greedy_match_length']['of']}, last-layer error "
            f"{q['hidden_state_rel_error'][-1]:.2e}{router}")
