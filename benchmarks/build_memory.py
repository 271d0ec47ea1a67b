"""Peak resident memory of `build --stream --no-verify` against the number of layers: it must not grow.

For each shape (published Qwen3 MoE configs with random weights, truncated to N layers through the preset's
`num_hidden_layers` override) and each N, one build runs in a fresh subprocess (this script with --child, which
calls pipeline.build as `qwen3export build --stream --no-verify` does); its peak RSS is its own
/proc/self/status VmHWM read at its end (exec starts a new address space), cross-checked by this process
polling /proc/<pid>/status VmHWM. The
artifact is deleted after each run. Printed as JSON: per run the peak, the weight bytes written and the
stated bound (streaming.emission_bound); per shape the least-squares slope of peak RSS against layers, next
to the slope a build that held the model would have (the weight bytes per layer).

    python benchmarks/build_memory.py                      # both shapes, 2, 4, 8 layers, bf16 for h100
    python benchmarks/build_memory.py --shapes qwen3-30b-a3b --layers 1,2,4 --target cpu --dtype fp32
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = ("qwen3-235b-a22b", "qwen3-30b-a3b")
FLAT = 0.05  # "flat": the slope is under 5% of the weight bytes one more layer adds


def child(shape: str, layers: int, out: str, target: str, dtype: str) -> None:
    """One streamed build in this (fresh) process; prints its figures as one JSON line."""
    from qwen3export.options import BuildOptions
    from qwen3export.pipeline import build

    t0 = time.perf_counter()
    result = build(BuildOptions.of(model=shape, target=target, dtype=dtype, artifact=Path(out), force=True, stream=True,
                                verify=False, overrides={"num_hidden_layers": layers}), progress=lambda s: None)[0]
    streaming = result.manifest["streaming"]
    # VmHWM, not getrusage's ru_maxrss: Linux keeps ru_maxrss across execve, so a child forked from a large
    # process (a pytest run that held a 30B model) reported its parent's peak (9.5 GB for a 2.4 GB build)
    peak = _vm_hwm(os.getpid()) or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"peak_rss_bytes": peak,
                      "weight_bytes": streaming["weight_bytes"], "bound_bytes": streaming["bound_bytes"],
                      "largest_parameter_bytes": streaming["largest_parameter_bytes"],
                      "parity": result.manifest["parity"], "seconds": round(time.perf_counter() - t0, 1)}))


def _vm_hwm(pid: int) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def measure(shape: str, layers: int, work: Path, target: str, dtype: str) -> dict:
    out = work / f"{shape}-{layers}"
    cmd = [sys.executable, __file__, "--child", shape, str(layers), str(out), target, dtype]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    polled = 0
    while proc.poll() is None:
        polled = max(polled, _vm_hwm(proc.pid))
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    shutil.rmtree(out, ignore_errors=True)
    if proc.returncode != 0:
        return {"layers": layers, "error": (stderr.strip().splitlines() or ["?"])[-1]}
    run = json.loads(stdout.strip().splitlines()[-1])
    return {"layers": layers, **run, "polled_vm_hwm_bytes": polled}


def slope(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", nargs=5, metavar=("SHAPE", "LAYERS", "OUT", "TARGET", "DTYPE"), help=argparse.SUPPRESS)
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--layers", default="2,4,8")
    p.add_argument("--target", default="h100", help="h100 with bf16: what a 235B build is for (cpu is fp32 only)")
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--work", help="folder for the artifacts (default: a temp folder)")
    args = p.parse_args()
    if args.child:
        shape, layers, out, target, dtype = args.child
        child(shape, int(layers), out, target, dtype)
        return

    import torch

    from qwen3export.spec import resolve_spec
    from qwen3export.weights import parse_dtype

    work = Path(args.work or tempfile.mkdtemp(prefix="build_memory-"))
    work.mkdir(parents=True, exist_ok=True)
    layers = [int(x) for x in args.layers.split(",")]
    report = {"benchmark": "build_memory", "command": "qwen3export build --stream --no-verify (pipeline.build in a "
              "fresh subprocess per run)", "target": args.target, "dtype": args.dtype,
              "machine": {"cpus": os.cpu_count(), "memory_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                          "python": platform.python_version(), "torch": torch.__version__},
              "flat_rule": f"slope of peak RSS vs layers < {FLAT:.0%} of the weight bytes per layer", "shapes": {}}
    try:
        for shape in args.shapes.split(","):
            itemsize = parse_dtype(args.dtype).itemsize
            runs = []
            for n in layers:
                spec = resolve_spec(shape, num_hidden_layers=n)
                need = spec.param_count() * itemsize * 1.05 + (1 << 30)
                free = shutil.disk_usage(work).free
                if need > free:
                    runs.append({"layers": n, "skipped": f"needs ~{need / 2**30:.0f} GiB of disk, {free / 2**30:.0f} free"})
                    continue
                print(f"{shape} x {n} layers ...", file=sys.stderr, flush=True)
                runs.append(measure(shape, n, work, args.target, args.dtype))
                print(f"  {json.dumps(runs[-1])}", file=sys.stderr, flush=True)
            ok = [r for r in runs if "peak_rss_bytes" in r]
            entry = {"runs": runs}
            if len(ok) >= 2:
                xs = [r["layers"] for r in ok]
                rss = slope(xs, [r["peak_rss_bytes"] for r in ok])
                per_layer = slope(xs, [r["weight_bytes"] for r in ok])
                entry.update({"slope_peak_rss_bytes_per_layer": round(rss),
                              "weight_bytes_per_layer": round(per_layer),
                              "slope_ratio": round(rss / per_layer, 4), "flat": rss < FLAT * per_layer,
                              "within_bound": all(r["peak_rss_bytes"] <= r["bound_bytes"] for r in ok)})
            report["shapes"][shape] = entry
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
