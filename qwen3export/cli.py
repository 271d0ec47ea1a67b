"""The `qwen3export` command line: build, run, verify, inspect, targets.

Errors are Qwen3ExportError subclasses printed as one line (`--debug` shows the traceback); exit code
0 only on success. Progress goes to stderr, results to stdout (`--json` for machine-readable output).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections import Counter
from pathlib import Path
from time import perf_counter
from typing import Any

from qwen3export.autotune.cli import add_tune_parser
from qwen3export.targets import TARGETS, get_target

from .artifact import SIGNATURE_FILE, load_artifact, seal
from .backends import BACKENDS, tensorrt as trt_backend
from .chat import load_tokenizer, render_chat
from .describe import engine_lines, engine_record, engine_status, quality_line, quantization_lines, summary_line
from .errors import InputError, Qwen3ExportError
from .signing import check_signature, generate_keypair, load_private_key, sign_artifact

EXIT_ERROR = 2


def _eprint(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _emit(args: argparse.Namespace, payload: dict[str, Any], text: str) -> None:
    if args.json:
        print(json.dumps(payload, indent=2, sort_keys=True))
    else:
        print(text)


INT32_MAX, INT64_MAX = 2**31 - 1, 2**63 - 1


def _parse_ids(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts:
        raise InputError("--prompt-ids is empty: give comma-separated token ids, e.g. --prompt-ids 1,2,3")
    try:
        ids = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    bad = next((i for i in ids if not -INT32_MAX <= i <= INT32_MAX), None)  # the rest: check_token_ids, per model
    if bad is not None:
        raise InputError(f"token id {bad} in --prompt-ids is out of range: ids are 0 .. vocab_size - 1")
    return ids


def int_in(lo: int, hi: int, what: str = ""):
    """An argparse type: an integer in lo..hi, else argparse's one-line usage error naming the flag and range."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"{value} is out of range: must be in {lo}..{hi}{what}")
        return value

    parse.__name__ = "integer"
    return parse


def finite_float(text: str) -> float:
    """An argparse type: a finite float (nan and inf refused; each flag's own range is checked by SamplingParams)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text} is not a finite number")
    return value


finite_float.__name__ = "number"


def _open_artifact(args: argparse.Namespace):
    """load_artifact, after checking manifest.sig against --trust KEY when given (before any file is read or
    loaded: an artifact signed by another key, unsigned, or changed after signing is refused in one line)."""
    record = None
    if getattr(args, "trust", None):
        record = check_signature(args.artifact, args.trust)
    artifact = load_artifact(args.artifact)
    if record is not None and record["manifest_sha256"] != artifact.manifest["manifest_sha256"]:
        raise InputError(f"{args.artifact}/manifest.json changed while it was being checked; run the command again")
    return artifact


# ------------------------------------------------------------------------- commands
def cmd_build(args: argparse.Namespace) -> int:
    from qwen3export.graphs.rope import parse_rope_flag  # lazy: loads torch

    from .options import BuildOptions  # lazy: loads torch
    from .pipeline import build  # lazy: loads torch, onnx, Triton

    # a tp x ep build's parts are torch.export programs (parallel_build.py): its default backend
    backend = args.backend or ("torch-export" if args.tp * args.ep > 1 else "onnx")
    if args.sign:
        load_private_key(args.sign)  # a bad key is refused now, not after the build
    overrides = {"rope_scaling": parse_rope_flag(args.rope_scaling)} if args.rope_scaling else {}
    opts = BuildOptions.of(model=args.model, target=args.target, dtype=args.dtype, seed=args.seed,
                           weight_stats=args.weight_stats, overrides=overrides,
                           quant=args.quant, group_size=args.group_size, quantize_lm_head=args.quantize_lm_head,
                           int4_accuracy=args.int4_accuracy,
                           tp=args.tp, ep=args.ep, max_batch=args.max_batch, max_seq=args.max_seq,
                           backends=tuple(b.strip() for b in backend.split(",") if b.strip()), out=args.out,
                           artifact=args.artifact, force=args.force, sign=Path(args.sign) if args.sign else None,
                           onnx_ops=args.onnx_ops, lower=not args.no_lower,
                           dump_ir=Path(args.dump_ir) if args.dump_ir else None, stream=args.stream,
                           verify=not args.no_verify)
    results = build(opts, progress=_eprint)
    payload = {"artifacts": [{"path": str(r.path), "backend": r.manifest["backend"], "status": engine_status(r.manifest),
                              "lowering": r.manifest["lowering"], "kernels": r.manifest.get("kernels"),
                              "parity": r.manifest["parity"], "quantization": r.manifest.get("quantization")}
                             for r in results]}
    lines = []
    for r in results:
        lines.append(f"artifact: {r.path} ({r.manifest['backend']}, {engine_status(r.manifest)})\n"
                     f"  {_lowering_line(r.manifest['lowering'])}\n  {summary_line(r.manifest['parity'])}")
        lines += quantization_lines(r.manifest)
        if r.manifest.get("kernels"):
            k = r.manifest["kernels"]
            lines.append(f"  kernel configs for {k['arch']} {k['dtype']}: {', '.join(k['sources'])} "
                         "(see `qwen3export inspect`)")
    pending = [r for r in results if r.manifest["engine"].get("tensorrt", {}).get("status") == "pending"]
    for r in pending:
        missing = "; ".join(r.manifest["engine"]["tensorrt"]["missing"])
        lines.append(f"tensorrt plan pending for {r.path}: missing {missing}; run `qwen3export finish {r.path}` on "
                     "the target machine")
    _emit(args, payload, "\n".join(lines))
    if pending:
        _eprint(f"qwen3export: pending: {len(pending)} TensorRT plan(s) need TensorRT and an NVIDIA GPU; every "
                f"other step is done and verified (exit {trt_backend.EXIT_PENDING})")
        return trt_backend.EXIT_PENDING
    return 0


def _lowering_line(record: dict[str, Any] | None) -> str:
    """`lowering qk_norm_rope 2, attention 2, ... (onnx ops ort)` or `lowering off`."""
    if not record:
        return "lowering -"
    flavour = f" (onnx ops {record['onnx_ops']})" if record.get("onnx_ops") else ""
    if not record["enabled"]:
        return f"lowering off{flavour}"
    return "lowering " + ", ".join(f"{k} {v}" for k, v in record["passes"].items()) + flavour


def onnx_op_counts(graph) -> Counter:
    """domain::op_type counts over an ONNX graph and its subgraphs (If branches hold the attention ops);
    standard ops by their bare name."""
    import onnx  # lazy: loads onnx

    counts: Counter = Counter()
    for n in graph.node:
        counts[f"{n.domain}::{n.op_type}" if n.domain not in ("", "ai.onnx") else n.op_type] += 1
        for a in n.attribute:
            subgraphs = [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)
            for g in subgraphs:
                counts.update(onnx_op_counts(g))
    return counts


def cmd_finish(args: argparse.Namespace) -> int:
    """Build the pending TensorRT plan of an artifact on the target machine."""
    _check_resign(args)
    artifact = _open_artifact(args)
    entry = artifact.manifest["engine"].get("tensorrt")
    if entry is None:
        raise InputError(f"artifact {artifact.path} has no TensorRT engine to finish (backend {artifact.backend})")
    missing = trt_backend.missing_requirements()
    if missing:
        _eprint(f"qwen3export: pending: cannot build the TensorRT plan here: missing {'; '.join(missing)}")
        return trt_backend.EXIT_PENDING
    artifact.manifest["engine"]["tensorrt"] = trt_backend.build_plan(artifact.path)
    seal(artifact.path, artifact.manifest)
    _resign(artifact, args)
    _emit(args, artifact.manifest["engine"]["tensorrt"], f"tensorrt plan built in {artifact.path}")
    return 0


def _chat_prompt(artifact, text: str, enable_thinking: bool) -> list[int]:
    """Apply the checkpoint's own chat template (rendered with jinja2, as transformers does) and tokenize."""
    tokenizer = load_tokenizer(artifact)
    rendered = render_chat(artifact, [{"role": "user", "content": text}], enable_thinking)
    return tokenizer.encode(rendered, add_special_tokens=False).ids


class CallTimer:
    """A decoder or sampler with each call's wall-clock span recorded, in call order, its other attributes passed
    through: `run --json` times the run it makes around the calls, inside no engine. Calls are the object's own
    (a generation.Step, a sampler) and its `prefill` / `decode` methods (a generation.SlotDecoder)."""

    TIMED_METHODS = ("prefill", "decode")

    def __init__(self, fn):
        self.fn, self.spans = fn, []

    def _timed(self, fn, *args, **kwargs):
        t0 = perf_counter()
        out = fn(*args, **kwargs)
        self.spans.append((t0, perf_counter()))
        return out

    def __call__(self, *args, **kwargs):
        return self._timed(self.fn, *args, **kwargs)

    def __getattr__(self, name: str):
        attr = getattr(self.fn, name)
        if name in self.TIMED_METHODS and callable(attr):
            return lambda *args, **kwargs: self._timed(attr, *args, **kwargs)
        return attr


def run_timing(step: CallTimer, sampler: CallTimer, end: float) -> dict[str, Any]:
    """`run --json`'s timing of a generation whose decoder steps and sampler calls were timed, ended at `end`
    (perf_counter): prefill = the first decoder call (the prompt); decode = from the first token (prefill and its
    sampling) to the last, N - 1 tokens each through a decoder step and the sampling graph, as the user waits."""
    n = len(sampler.spans)
    first_token = sampler.spans[0][1]
    decode_s = end - first_token
    steps = [b - a for a, b in step.spans[1:]]
    return {"prefill_ms": round((step.spans[0][1] - step.spans[0][0]) * 1e3, 3),
            "time_to_first_token_ms": round((first_token - step.spans[0][0]) * 1e3, 3),
            "new_tokens": n, "decode_s": round(decode_s, 6),
            "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 else None,
            "decoder_step_ms": round(sum(steps) / len(steps) * 1e3, 3) if steps else None,
            "sampling_ms_per_token": round(sum(b - a for a, b in sampler.spans) / n * 1e3, 3)}


def cmd_run(args: argparse.Namespace) -> int:
    import numpy as np  # lazy: loads numpy
    import torch  # lazy: loads torch

    from qwen3export.graphs.sampling import SamplingParams, initial_state  # lazy: loads torch

    from .generation import check_token_ids, sample_generate  # lazy: loads torch
    from .runner import open_engine, sampling_pair  # lazy: loads torch, onnxruntime

    if (args.prompt is None) == (args.prompt_ids is None):
        raise InputError("give exactly one of --prompt-ids 1,2,3 or --prompt \"text\"")
    thinking = args.thinking == "on"
    # sampling parameters: the manifest's per-mode defaults (Qwen3's, or the checkpoint's
    # generation_config.json), then the flags; all validated before anything runs
    artifact = _open_artifact(args)
    flags = {k: getattr(args, k) for k in ("temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                                            "presence_penalty") if getattr(args, k) is not None}
    if args.greedy:
        flags["temperature"] = 0.0
    params = SamplingParams.recommended(thinking, artifact.manifest["sampling"]["defaults"],
                                        thinking_budget=args.thinking_budget, **flags)
    ids = _parse_ids(args.prompt_ids) if args.prompt_ids is not None else _chat_prompt(artifact, args.prompt, thinking)
    if "parallel" in artifact.manifest:  # tp x ep rank parts: N gloo processes stepped as one decoder
        from .parallel_artifact import ParallelEngine  # lazy: loads torch

        engine = ParallelEngine(artifact, args.threads)
    else:
        engine = open_engine(artifact, args.threads)
    check_token_ids(torch.tensor([ids]), engine.spec.vocab_size)
    limit = engine.spec.max_positions
    if len(ids) + args.max_new_tokens > limit:
        raise InputError(f"prompt ({len(ids)}) + --max-new-tokens ({args.max_new_tokens}) exceeds the model's "
                         f"{limit} positions (max_position_embeddings with RoPE scaling); shorten one of them "
                         "or build with --rope-scaling yarn:4.0")
    serving = artifact.manifest.get("serving")
    if serving and len(ids) + args.max_new_tokens > serving["max_seq"]:
        raise InputError(f"prompt ({len(ids)}) + --max-new-tokens ({args.max_new_tokens}) exceeds the engine's "
                         f"{serving['max_seq']} tokens per sequence (built with --max-seq {serving['max_seq']}); "
                         "shorten one of them or rebuild with a larger --max-seq")
    graph, session = sampling_pair(artifact, args.threads, engine)
    stop = () if args.no_stop else engine.spec.eos_token_ids
    empty, state0, rng = engine.empty_cache(1), initial_state([ids], graph.vocab), np.random.default_rng(args.seed)
    step, sampler = CallTimer(engine), CallTimer(session)
    new, state = sample_generate(step, empty, sampler, ids, params.to_tensors(1), state0, args.max_new_tokens, rng,
                                 stop)

    timing = run_timing(step, sampler, perf_counter())
    payload: dict[str, Any] = {"tokens": new, "thinking_tokens": int(state["think_spent"][0]),
                               "params": params.__dict__, "timing": timing}
    text = " ".join(map(str, new))
    if "tokenizer.json" in artifact.manifest["sampling"].get("tokenizer_files", []):
        payload["text"] = load_tokenizer(artifact).decode(new, skip_special_tokens=True)
        text = payload["text"]
    _emit(args, payload, text)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve.app import ServeConfig, open_server, serve  # lazy: loads torch, onnxruntime, fastapi, uvicorn

    artifact = _open_artifact(args)
    server = open_server(artifact, args.threads, ServeConfig(max_queue=args.max_queue, max_batch=args.max_batch))
    _eprint(f"serving {artifact.path.name} on http://{args.host}:{args.port}/v1 ({server.scheduler.max_batch} "
            f"slots x {server.max_seq} tokens, queue {args.max_queue}); Ctrl-C stops")
    serve(server, args.host, args.port)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .verify import verify_artifact  # lazy: loads torch, onnxruntime

    _check_resign(args)
    artifact = _open_artifact(args)
    report = verify_artifact(artifact, args.model, args.threads, _eprint)
    if artifact.has_signature() and not (args.sign and report["passed"]):  # a rewrite would void the signature
        why = "parity failed, so it is not re-signed" if args.sign else "pass --trust KEY.pub --sign KEY to " \
              "record it and re-sign"
        _eprint(f"note: {artifact.path} is signed: its manifest was not updated with this report ({why})")
    else:
        artifact.manifest["parity"] = report
        artifact.save_manifest()
        _resign(artifact, args)

    text = summary_line(report) + (f"\n{quality_line(report['quantization'])}" if "quantization" in report else "")
    _emit(args, report, text)
    return 0 if report["passed"] else 1


def cmd_inspect(args: argparse.Namespace) -> int:
    import onnx  # lazy: loads onnx

    artifact = _open_artifact(args)
    m = artifact.manifest
    ops: dict[str, dict[str, int]] = {}
    for rel in m["files"]:
        if rel.endswith(".onnx"):
            model = onnx.load(str(artifact.onnx_file(rel)), load_external_data=False)
            ops[rel] = dict(sorted(onnx_op_counts(model.graph).items()))
    spec = m["model"]["spec"]
    payload = {"path": str(artifact.path), "schema": m["schema"], "created": m["created"], "model": m["model"],
               "target": m["target"]["name"], "backend": m["backend"], "dtype": m["dtype"],
               "lowering": m.get("lowering"), "files": m["files"], "op_counts": ops, "parity": m.get("parity"),
               "engine_summary": engine_record(m), "versions": m["versions"], "quantization": m.get("quantization"),
               "signature": _signature_record(artifact, args)}
    lines = [f"artifact {artifact.path}  ({m['schema']}, built {m['created']})",
             f"  model    {spec['name']} ({spec['model_type']}, {m['model']['param_count']:,} params, "
             f"{spec['num_hidden_layers']} layers)",
             f"  target   {m['target']['name']}  backend {m['backend']}  dtype {m['dtype']}",
             f"  signature {_signature_line(_signature_record(artifact, args))}",
             *quantization_lines(m),
             f"  {_lowering_line(m.get('lowering'))}"]
    lines += [f"    note: {note}" for note in (m.get("lowering") or {}).get("notes", [])]
    lines.append("  files:")
    lines += [f"    {rel:28s} {e['size']:>14,d} B  sha256 {e['sha256'][:16]}…" for rel, e in m["files"].items()]
    for rel, counts in ops.items():
        lines.append(f"  ops in {rel} ({sum(counts.values())} nodes, If branches included):")
        lines += [f"    {k:32s} {v}" for k, v in counts.items()]
    lines += engine_lines(m)
    p = m.get("parity")
    if p:
        lines.append(f"  {summary_line(p)}")
    _emit(args, payload, "\n".join(lines))
    return 0


def _check_resign(args: argparse.Namespace) -> None:
    """verify/finish --sign vouch for an artifact again: only for one whose signature was just checked (--trust),
    so a signature can never launder an artifact nobody checked."""
    if getattr(args, "sign", None):
        if not getattr(args, "trust", None):
            raise InputError(f"--sign re-signs the artifact, so it needs --trust PUBLIC_KEY too (the signature it "
                             f"replaces is checked first): `qwen3export {args.command} ARTIFACT --trust KEY.pub "
                             "--sign KEY`")

        load_private_key(args.sign)


def _resign(artifact, args: argparse.Namespace) -> None:
    """After a command rewrote a manifest: sign it again with --sign KEY (checked by _check_resign first); a stale
    signature is removed (it would no longer match) and said so."""
    if getattr(args, "sign", None):
        sign_artifact(artifact.path, args.sign)
    elif (artifact.path / SIGNATURE_FILE).is_file():
        (artifact.path / SIGNATURE_FILE).unlink()
        _eprint("note: the manifest changed, so its old signature was removed; sign it again with --sign KEY")


def _signature_record(artifact, args: argparse.Namespace) -> dict[str, Any]:
    """inspect's view of manifest.sig: absent, present (unchecked), or checked against --trust."""
    if not artifact.has_signature():
        return {"signed": False}
    if getattr(args, "trust", None):
        return {"signed": True, "checked": True, "trusted_key": args.trust}
    try:
        fp = json.loads((artifact.path / SIGNATURE_FILE).read_text()).get("public_key_fingerprint")
    except (OSError, ValueError, AttributeError):
        fp = None
    return {"signed": True, "checked": False, "fingerprint": fp if isinstance(fp, str) else None}


def _signature_line(rec: dict[str, Any]) -> str:
    if not rec["signed"]:
        return "none (unsigned; `build --sign KEY` signs, `--trust KEY` requires a signature)"
    if rec.get("checked"):
        return f"ed25519, valid for the trusted key {rec['trusted_key']}"
    return f"ed25519 by key {str(rec.get('fingerprint'))[:16]}... (not checked: pass --trust PUBLIC_KEY)"


def cmd_keys(args: argparse.Namespace) -> int:
    """Make an Ed25519 key pair for build --sign (private) and run/verify/inspect --trust (public)."""
    rec = generate_keypair(args.private, args.public)
    _emit(args, rec, f"private key {rec['private']} (keep it secret; build --sign)\npublic key  {rec['public']} "
                     f"(give to users; --trust)\nfingerprint {rec['fingerprint']}")
    return 0


def cmd_targets(args: argparse.Namespace) -> int:
    payload = {"targets": [t.to_dict() for t in TARGETS.values()]}
    lines = [f"{t.name:10s} {t.arch or '-':7s} dtypes {','.join(t.dtypes):16s} backends {','.join(t.backends):12s} "
             f"{t.description}" for t in TARGETS.values()]
    _emit(args, payload, "\n".join(lines))
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from qwen3export.graphs.rope import parse_rope_flag  # lazy: loads torch

    from .memory_plan import PlanOptions, memory_plan_summary, plan_for_target  # lazy: loads torch
    from .spec import resolve_spec  # lazy: loads torch

    target = get_target(args.target)
    overrides = {"rope_scaling": parse_rope_flag(args.rope_scaling)} if args.rope_scaling else {}
    spec = resolve_spec(args.model, **overrides)
    dtype = args.dtype or ("bf16" if "bf16" in target.dtypes else target.dtypes[0])
    target.check_dtype(dtype)
    p = plan_for_target(spec, target, PlanOptions(dtype=dtype, quant=args.quant, group_size=args.group_size,
                                                  tp=args.tp, ep=args.ep, max_batch=args.max_batch,
                                                  max_seq=args.max_seq))
    _emit(args, p, memory_plan_summary(p))
    return 0


def cmd_kernels_compile(args: argparse.Namespace) -> int:
    from qwen3export.kernels.compile import compile_report, compile_summary  # lazy: loads Triton
    arch = args.target
    if not (arch.lower().startswith("sm") or arch[:1].isdigit()):
        target = get_target(arch)
        if target.arch is None:
            raise InputError(f"target {target.name} is not a GPU: kernels compile needs an sm_XX arch or a GPU "
                             f"target ({', '.join(t for t, v in TARGETS.items() if v.arch)})")
        arch = target.arch
    kernels = [k.strip() for k in args.kernel.split(",")] if args.kernel else None
    _eprint(f"compiling {'default configs' if args.defaults_only else 'the config space'} for {arch} "
            f"({args.workers} workers; cached results are reused) ...")
    records = compile_report(arch, kernels, args.dtype, configs="default" if args.defaults_only else "space",
                             workers=args.workers)
    table = compile_summary(records)
    payload = {"arch": arch, "dtype": args.dtype, "summary": table, "records": records}
    lines = [f"{arch} {args.dtype}: kernel               valid/configs  default config -> regs/spill/shared"]
    for kernel, s in table.items():
        lines.append(f"  {kernel:22s} {s['valid']:>4d}/{s['configs']:<8d} {s['default']}")
        lines += [f"      {r['function']:28s} {r['registers']:>4} regs {r['spill_bytes']:>5} B spill "
                  f"{r['shared_bytes']:>7} B shared  {'ok' if r['valid'] else r['reason']}" for r in s["default_records"]]
    _emit(args, payload, "\n".join(lines))
    return 0


# ------------------------------------------------------------------------- parser
class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line (`qwen3export: error: argument --tp: ...`), exit 2;
    `--help` shows the usage."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"qwen3export: error: {message} (see `{self.prog} --help`)\n")


def make_parser(tune: bool = True) -> argparse.ArgumentParser:
    p = _Parser(prog="qwen3export", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, help_: str, fn) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("--json", action="store_true", help="machine-readable output on stdout")
        sp.add_argument("--debug", action="store_true", help="show tracebacks on errors")
        sp.set_defaults(fn=fn)
        return sp

    b = add("build", "build, verify and write an engine artifact", cmd_build)
    b.add_argument("--model", default="tiny-moe", help="Hugging Face Qwen3 folder or preset name (default tiny-moe)")
    b.add_argument("--target", default="cpu", help="target name (see `qwen3export targets`; default cpu)")
    b.add_argument("--backend", default=None,
                   help=f"comma-separated backends ({', '.join(BACKENDS)}; kernels = the Triton kernel pack "
                        "cross-compiled for a GPU target's arch; default onnx, and torch-export (one torch.export "
                        "program per rank) with --tp/--ep)")
    b.add_argument("--dtype", default="fp32", help="fp32 | fp16 | bf16 (default fp32)")
    b.add_argument("--out", metavar="DIR",
                   help="parent folder of the artifacts: each is DIR/<model>-<target>-<backend> (default dist)")
    b.add_argument("--artifact", metavar="PATH", help="the artifact folder itself, for a one-backend build "
                   "(instead of --out)")
    b.add_argument("--sign", metavar="KEY", help="sign each artifact's manifest with this Ed25519 private key "
                   "(PEM, from `qwen3export keys`); users check it with --trust")
    b.add_argument("--force", action="store_true",
                   help="replace an existing artifact folder (only a folder holding a qwen3export manifest)")
    b.add_argument("--seed", type=int_in(0, INT64_MAX), default=0,
                   help="seed of a preset's random weights (default 0)")
    b.add_argument("--weight-stats", choices=("trained", "small"), default="trained",
                   help="statistics of a preset's random weights: trained (default: logits std ~3 and max 15-35, "
                        "massive activations, norms not 1, uneven MoE routing) or small (N(0, 0.02), logits near 0)")
    b.add_argument("--dump-ir", metavar="DIR", help="write each phase's graph into DIR")
    b.add_argument("--max-batch", type=int_in(1, 1 << 16), default=8,
                   help="serving limit: sequences per batch (TensorRT profile; KV cache planned for it; default 8)")
    b.add_argument("--max-seq", type=int_in(1, INT32_MAX),
                   help="serving limit: tokens per sequence, prompt + generated (TensorRT profile; KV cache "
                        "planned for it; `run` refuses beyond; default min(model positions, 8192))")
    b.add_argument("--rope-scaling", metavar="TYPE:FACTOR[:ORIG]",
                   help="RoPE scaling, e.g. yarn:4.0 (131,072 positions for Qwen3, original window 32768)")
    b.add_argument("--no-lower", action="store_true",
                   help="skip the lowering passes (attention, MoE, norms -> qwen3export:: ops); emit the captured graph")
    b.add_argument("--onnx-ops", metavar="ort|standard",
                   help="ONNX translation of the lowered ops: ort = ONNX Runtime com.microsoft contrib ops "
                        "(GroupQueryAttention, MoE, ...), standard = plain ONNX ops (TensorRT); default ort for "
                        "target cpu, standard for GPU targets and always for tensorrt")
    b.add_argument("--quant", default="none", choices=("none", "int8", "int4", "fp8"),
                   help="weight quantization: int8/int4 weight-only (W8A16/W4A16), fp8 e4m3 weights and "
                        "activations (sm_89+); default none")
    b.add_argument("--group-size", type=int_in(1, INT32_MAX),
                   help="--quant int4 group size along the input dimension (default 128)")
    b.add_argument("--quantize-lm-head", action=argparse.BooleanOptionalAction, default=None,
                   help="quantize the lm_head as well (default: yes for --quant int4, as ONNX Runtime GenAI does; no "
                        "for int8 / fp8); --no-quantize-lm-head keeps it fp32")
    b.add_argument("--int4-accuracy", type=int, choices=(0, 4), default=None,
                   help="--quant int4: MatMulNBits accuracy level, 4 = activations quantized to int8 per block inside "
                        "the op (fast CPU path; the parity gate emulates it), 0 = fp32 activations (default: 4 on CPU "
                        "targets with --onnx-ops ort, as ONNX Runtime GenAI's CPU int4; 0 elsewhere: GPU targets "
                        "refuse 4, their CUDA MatMulNBits ignores it)")
    b.add_argument("--tp", type=int_in(1, 1024), default=1,
                   help="tensor-parallel degree: one engine part per rank (default 1)")
    b.add_argument("--ep", type=int_in(1, 1024), default=1, help="expert-parallel degree (MoE models; default 1)")
    b.add_argument("--stream", action="store_true",
                   help="capture on the meta device and stream weights tensor by tensor into the ONNX external "
                        "data: peak memory bounded by the largest tensor, not the model (onnx backend)")
    b.add_argument("--no-verify", action="store_true",
                   help="--stream / --tp/--ep builds: skip the parity check; the manifest records it as NOT run "
                        "and names the `qwen3export verify` command that runs it")

    trust_help = ("refuse the artifact unless its manifest.sig is a valid signature by this Ed25519 public key "
                  "(PEM), checked before anything is loaded")
    r = add("run", "generate tokens with an artifact's engine", cmd_run)
    r.add_argument("artifact")
    r.add_argument("--trust", metavar="PUBLIC_KEY", help=trust_help)
    r.add_argument("--prompt-ids", help="comma-separated prompt token ids, e.g. 1,2,3")
    r.add_argument("--prompt", help="text, wrapped in the checkpoint's chat template (needs its tokenizer)")
    r.add_argument("--max-new-tokens", type=int_in(1, INT32_MAX), default=32)
    r.add_argument("--thinking", choices=("on", "off"), default="on",
                   help="Qwen3 thinking mode (off: <think> can never be produced); default on")
    r.add_argument("--thinking-budget", type=int_in(-1, INT32_MAX), default=-1,
                   help="max thinking tokens, then the early-stop sequence closes </think> (-1: unlimited)")
    r.add_argument("--greedy", action="store_true", help="argmax decoding (temperature 0)")
    r.add_argument("--temperature", type=finite_float)
    r.add_argument("--top-k", type=int_in(0, INT32_MAX), help="0: no top-k cut")
    r.add_argument("--top-p", type=finite_float)
    r.add_argument("--min-p", type=finite_float)
    r.add_argument("--repetition-penalty", type=finite_float)
    r.add_argument("--presence-penalty", type=finite_float)
    r.add_argument("--seed", type=int_in(0, INT64_MAX), default=0, help="seed of the uniforms fed to the sampling graph")
    r.add_argument("--no-stop", action="store_true", help="do not stop at the model's EOS tokens")
    r.add_argument("--threads", type=int_in(1, 1024), help="ONNX Runtime intra-op threads")

    sv = add("serve", "an OpenAI-compatible HTTP server (/v1/chat/completions, /v1/completions, /v1/models, "
             "/health, /metrics) with continuous batching", cmd_serve)
    sv.add_argument("artifact")
    sv.add_argument("--trust", metavar="PUBLIC_KEY", help=trust_help)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int_in(0, 65535), default=8000)
    sv.add_argument("--max-batch", type=int_in(1, 1 << 16), help="requests decoded together (default: the "
                    "artifact's --max-batch)")
    sv.add_argument("--max-queue", type=int_in(1, 1 << 20), default=64, help="requests waiting for a slot before "
                    "new ones get 429")
    sv.add_argument("--threads", type=int_in(1, 1024), help="ONNX Runtime intra-op threads")

    v = add("verify", "re-run the parity check of an artifact against eager PyTorch", cmd_verify)
    v.add_argument("artifact")
    v.add_argument("--trust", metavar="PUBLIC_KEY", help=trust_help)
    v.add_argument("--sign", metavar="KEY", help="record the report in the manifest of a signed artifact and sign "
                   "it again with this private key")
    v.add_argument("--model", help="checkpoint folder or preset to rebuild eager from (default: as recorded)")
    v.add_argument("--threads", type=int_in(1, 1024), help="ONNX Runtime intra-op threads")

    i = add("inspect", "show an artifact's manifest, files and ONNX op counts", cmd_inspect)
    i.add_argument("artifact")
    i.add_argument("--trust", metavar="PUBLIC_KEY", help=trust_help)

    add("targets", "list the known targets", cmd_targets)

    if tune:  # autotune imports torch and Triton: registered in full only when `tune` runs

        add_tune_parser(add)
    else:
        sub.add_parser("tune", help="tune the Triton kernels' configs for a GPU target with optuna; write tuned "
                       "tables (`qwen3export tune --help`)", add_help=False)

    fi = add("finish", "build an artifact's pending TensorRT plan (on the target machine)", cmd_finish)
    fi.add_argument("artifact")
    fi.add_argument("--trust", metavar="PUBLIC_KEY", help=trust_help)
    fi.add_argument("--sign", metavar="KEY", help="sign the finished artifact's manifest with this private key "
                    "(without it, an old signature is removed: the manifest changes)")
    k = add("keys", "make an Ed25519 key pair: the private key signs builds (--sign), the public key is what "
            "users --trust", cmd_keys)
    k.add_argument("--private", required=True, metavar="PATH", help="private key file to write (mode 0600)")
    k.add_argument("--public", required=True, metavar="PATH", help="public key file to write")

    ks = sub.add_parser("kernels", help="Triton kernel tools (cross-compilation per GPU arch)",
                        description="Triton kernel tools (cross-compilation per GPU arch)")
    ksub = ks.add_subparsers(dest="kernels_command", required=True, metavar="COMMAND")
    kc = ksub.add_parser("compile", help="cross-compile every kernel x config for an arch; report registers, "
                         "spills, shared memory and validity", description="cross-compile every kernel x config "
                         "for an arch with triton.compile + GPUTarget (no GPU needed) and read the cubin's "
                         "resource usage with cuobjdump")
    kc.add_argument("--target", required=True, help="sm_80 | sm_86 | sm_89 | sm_90 | a GPU target name")
    kc.add_argument("--kernel", help="comma-separated kernel names (default all)")
    kc.add_argument("--dtype", default="fp16", help="fp16 | bf16 | fp32 (default fp16)")
    kc.add_argument("--defaults-only", action="store_true", help="only each kernel's DEFAULT_CONFIG (fast)")
    kc.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="parallel compile processes")
    kc.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    kc.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    kc.set_defaults(fn=cmd_kernels_compile)

    pl = add("plan", "memory plan per rank for a model on a target, without reading weights", cmd_plan)
    pl.add_argument("--model", default="tiny-moe", help="Hugging Face folder or preset")
    pl.add_argument("--target", default="cpu")
    pl.add_argument("--dtype", help="activation/weight dtype (default bf16 where the target has it)")
    pl.add_argument("--quant", default="none", help="none | int8 | int4 | fp8 (weights)")
    pl.add_argument("--group-size", type=int_in(1, INT32_MAX), default=128, help="int4 quantization group size")
    pl.add_argument("--tp", type=int_in(1, 1024), default=1, help="tensor-parallel degree")
    pl.add_argument("--ep", type=int_in(1, 1024), default=1, help="expert-parallel degree")
    pl.add_argument("--max-batch", type=int_in(1, 1 << 16), default=1)
    pl.add_argument("--max-seq", type=int_in(1, INT32_MAX), help="tokens per sequence (default: the model's max positions)")
    pl.add_argument("--rope-scaling", metavar="TYPE:FACTOR[:ORIG]", help="e.g. yarn:4.0")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = make_parser(tune=command == "tune")
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # a usage error (one line, exit 2) or --help (exit 0): a code, also when called in-process
        return e.code if isinstance(e.code, int) else EXIT_ERROR
    debug = args.debug or os.environ.get("QWEN3EXPORT_DEBUG") == "1"
    try:
        return args.fn(args)
    except Qwen3ExportError as e:
        if debug:
            traceback.print_exc()
        _eprint(f"qwen3export: error: {e}")
        return EXIT_ERROR
    except BrokenPipeError:  # e.g. `qwen3export inspect … | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except MemoryError:
        _eprint("qwen3export: error: out of memory; use a smaller model, --stream, or a machine with more memory")
        return EXIT_ERROR
    except OSError as e:  # a full disk, a read-only --out, a folder we may not read: exit 2, not "parity failed"
        if debug:
            traceback.print_exc()
        where = f" {e.filename}" if e.filename else ""
        what = e.strerror or str(e)
        _eprint(f"qwen3export: error: cannot access{where}: {what} (errno {e.errno}); free space, fix the "
                "permissions or choose another path (nothing half-written was left behind)")
        return EXIT_ERROR
    except KeyboardInterrupt:
        _eprint("qwen3export: interrupted; nothing half-written was left behind")
        return 130
    except Exception as e:  # a bug, not bad input: still one line and exit 2 (1 means "parity failed")
        if debug:
            traceback.print_exc()
        _eprint(f"qwen3export: error: internal error {type(e).__name__}: {str(e)[:200]} (a bug in qwen3export; "
                "rerun with --debug for the traceback and report it)")
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
