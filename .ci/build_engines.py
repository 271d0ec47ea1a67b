#!/usr/bin/env python3
"""Build the engine artifacts of one target with the `qwen3export` CLI, as a CI job does, and check them.

    python .ci/build_engines.py --target cpu  --backends onnx,aoti               [--model tiny-moe] [--out dist/ci]
    python .ci/build_engines.py --target a100 --backends onnx,kernels,tensorrt

Runs `qwen3export build ... --json`; exit 0 (built) and, when tensorrt is asked for on a machine without
TensorRT and a GPU, 3 (pending) are the accepted outcomes; anything else fails the job. Then every artifact
is loaded with its checksums, its manifest checked (backend, engine status, parity passed for every engine
that runs here, kernel configs with their measured/modelled/default tags, the TensorRT recipe when pending),
and `qwen3export verify` re-runs parity for the onnx and aoti engines. Prints one JSON line per artifact and
exits non-zero on the first problem. `.github/workflows/engines.yml` and `.ci/run` call this script.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

EXIT_PENDING = 3


def fail(msg: str) -> None:
    print(f"build_engines: FAIL: {msg}", file=sys.stderr, flush=True)
    sys.exit(1)


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qwen3export.cli", *args], capture_output=True, text=True)


def check_artifact(path: Path, backend: str, target: str) -> dict:
    from qwen3export.artifact import load_artifact

    artifact = load_artifact(path)  # every file's sha256 against the manifest
    m = artifact.manifest
    if m["backend"] != backend or m["target"]["name"] != target:
        fail(f"{path}: manifest says backend {m['backend']} target {m['target']['name']}")
    if "sampling" not in m or not (path / m["sampling"]["file"]).is_file():
        fail(f"{path}: the sampling graph is missing")
    if m.get("serving", {}).get("figures") != "modelled" or m["serving"].get("max_seq", 0) < 1:
        fail(f"{path}: the serving limits (max batch/seq, KV cache labelled modelled) are missing")
    engine = m["engine"]
    status = "built"
    if backend == "tensorrt":
        trt = engine.get("tensorrt", {})
        status = trt.get("status", "built")
        if status == "pending":
            for name in (trt["settings"],):
                if not (path / name).is_file():
                    fail(f"{path}: pending TensorRT build lacks {name}")
            if not trt.get("missing"):
                fail(f"{path}: pending without saying what is missing")
    if backend == "kernels":
        if engine.get("status") != "built" or engine.get("functions", 0) < 1:
            fail(f"{path}: kernel pack not built: {engine}")
        for k in engine["kernels"]:
            for bucket, c in k["configs"].items():
                if c["source"] not in ("measured", "measured-public", "modelled", "default"):
                    fail(f"{path}: {k['kernel']} {bucket} config has no measured/measured-public/modelled tag")
    parity = m.get("parity") or {}
    if not parity.get("passed"):
        fail(f"{path}: parity did not pass: {parity.get('failures')}")
    if backend in ("onnx", "aoti"):
        rerun = cli("verify", str(path), "--json")
        if rerun.returncode != 0:
            fail(f"{path}: `qwen3export verify` exited {rerun.returncode}: {rerun.stderr.strip()[-300:]}")
    return {"artifact": str(path), "backend": backend, "status": status, "parity": "passed",
            "files": len(m["files"]), "kernel_sources": engine.get("sources")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--target", required=True)
    ap.add_argument("--backends", required=True)
    ap.add_argument("--model", default="tiny-moe")
    ap.add_argument("--out", default="dist/ci")
    args = ap.parse_args()
    backends = [b for b in args.backends.split(",") if b]
    out = Path(args.out) / args.target
    if out.exists():
        shutil.rmtree(out)
    build = cli("build", "--model", args.model, "--target", args.target, "--backend", ",".join(backends),
                "--out", str(out), "--json")
    sys.stderr.write(build.stderr)
    allowed = {0, EXIT_PENDING} if "tensorrt" in backends else {0}
    if build.returncode not in allowed:
        fail(f"build exited {build.returncode} (expected {sorted(allowed)}): {build.stderr.strip()[-400:]}")
    payload = json.loads(build.stdout)
    built = {a["backend"]: Path(a["path"]) for a in payload["artifacts"]}
    if sorted(built) != sorted(backends):
        fail(f"asked for {backends}, got artifacts for {sorted(built)}")
    rows = [check_artifact(built[b], b, args.target) for b in backends]
    pending = [r for r in rows if r["status"] == "pending"]
    if (build.returncode == EXIT_PENDING) != bool(pending):
        fail(f"exit {build.returncode} but pending artifacts: {[r['artifact'] for r in pending]}")
    for r in rows:
        print(json.dumps(r), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
