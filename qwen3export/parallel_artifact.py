"""Parallel artifacts: a tp x ep decoder as one part per rank (its weight shard as safetensors and its
weight-free torch.export program holding the collectives) plus a manifest describing the ranks; and the
runner, ParallelEngine: the N parts in N gloo processes, stepped from the caller's process as one decoder.

Layout: `<out>/manifest.json`, `<out>/rank<r>/weights.safetensors`, `<out>/rank<r>/decoder.pt2`. Each
program is captured on the meta device (graphs/parallel.py meta_rank_decoder), so the build holds one
rank's shard at a time and never a whole model; the runner binds the shard to the program when it loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from qwen3export.graphs.parallel import (TP_GROUP, WORLD_GROUP, RankLayout, capture_rank, layouts, meta_rank_decoder,
                                         rank_tensors)

from .artifact import Artifact, default_manifest, load_artifact, seal, staging
from .errors import ArtifactError
from .spec import ModelSpec
from .weights import dtype_name, parse_dtype

BACKEND = "torch-export"
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_FILE = "decoder.pt2"
GLOO_STEP_TIMEOUT_S = 180  # one step's reply; above ranks.GLOO_TIMEOUT_S so a stuck collective errors first


def part_folder(rank: int) -> str:
    return f"rank{rank}"


def parallel_record(tp: int, ep: int) -> dict[str, Any]:
    """The manifest's `parallel` entry."""
    return {"tp": tp, "ep": ep, "world": tp * ep, "rank_order": "rank = ep_rank * tp + tp_rank",
            "collectives": "torch.distributed functional collectives (_c10d_functional all_reduce, "
                           "all_gather_into_tensor): gloo on CPU (what ParallelEngine runs); NCCL on CUDA is not "
                           "run by this runner",
            "groups": {TP_GROUP: "the rank's tp ranks (same ep_rank)", WORLD_GROUP: "all ranks"}}


def write_parts(folder: Path, spec: ModelSpec, source: Any, ranks: list[RankLayout], dtype: torch.dtype,
                progress=lambda s: None) -> list[dict[str, Any]]:
    """Each rank's part into `folder`: its weight shard (one full source tensor read at a time, sliced) and its
    weight-free program. -> the manifest's `ranks` entries."""
    from safetensors.torch import save_file

    entries = []
    for layout in ranks:
        part = folder / part_folder(layout.rank)
        part.mkdir()
        progress(f"  rank {layout.rank}: tp_rank {layout.tp_rank}, ep_rank {layout.ep_rank}: shard + capture")
        save_file({n: t.contiguous() for n, t in rank_tensors(spec, source, layout, dtype)},
                  str(part / WEIGHTS_FILE), metadata={"format": "pt"})
        program = capture_rank(meta_rank_decoder(spec, layout, dtype))
        program.example_inputs = None  # meta tensors: nothing to keep
        torch.export.save(program, str(part / PROGRAM_FILE))
        entries.append({**layout.to_dict(spec),
                        "files": [f"{part_folder(layout.rank)}/{f}" for f in (WEIGHTS_FILE, PROGRAM_FILE)]})
    return entries


def write_parallel_artifact(out: str | Path, spec: ModelSpec, source: Any, tp: int, ep: int, *,
                            dtype: torch.dtype = torch.float32, model_ref: dict[str, Any] | None = None,
                            force: bool = False) -> Artifact:
    """Shard, capture and write every rank's part (no sampling graph, no parity: parallel_build.build_parallel
    adds both); the degrees are checked before anything is written."""
    ranks = layouts(spec, tp, ep)  # one-line InputError for a bad degree, before any work
    with staging(Path(out), force) as tmp:
        entries = write_parts(tmp, spec, source, ranks, dtype)
        manifest = default_manifest(
            model={"spec": spec.to_dict(), "ref": model_ref, "param_count": spec.param_count()}, backend=BACKEND,
            dtype=dtype_name(dtype), parallel=parallel_record(tp, ep), ranks=entries)
        seal(tmp, manifest)
    return load_artifact(out)


def load_rank_program(artifact: Artifact, rank: int, device: str | torch.device = "cpu"):
    """The rank's program with its shard bound, on `device`: (callable with the decoder's signature,
    empty_cache). The program was captured on meta: its weights, its RoPE constant and the device of the
    tensors it creates are all bound here (torch.export.passes.move_to_device_pass)."""
    from safetensors.torch import load_file
    from torch.export.passes import move_to_device_pass

    from qwen3export.graphs.rope import rope_parameters

    m = artifact.manifest
    spec, dtype = ModelSpec.from_dict(m["model"]["spec"]), parse_dtype(m["dtype"])
    part = artifact.path / part_folder(rank)
    program = torch.export.load(str(part / PROGRAM_FILE))
    tensors = load_file(str(part / WEIGHTS_FILE))
    if spec.tie_word_embeddings and "lm_head.weight" in program.state_dict:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # one tensor, both names: still tied
    if set(tensors) != set(program.state_dict):
        raise ArtifactError(f"{part_folder(rank)}/{WEIGHTS_FILE} and {PROGRAM_FILE} name different tensors "
                            f"({sorted(set(tensors) ^ set(program.state_dict))[:3]}); rebuild the artifact")
    params: dict[int, torch.nn.Parameter] = {}
    for name in program.state_dict:
        t = tensors[name]
        program.state_dict[name] = params.setdefault(id(t), torch.nn.Parameter(t, requires_grad=False))
    unknown = set(program.constants) - {"inv_freq"}
    if unknown:
        raise ArtifactError(f"{part_folder(rank)}/{PROGRAM_FILE} has constants {sorted(unknown)} this runner "
                            "cannot bind; rebuild the artifact")
    program.constants["inv_freq"] = rope_parameters(spec.head_dim, spec.rope_theta, spec.rope_scaling)[0]  # fp32
    module = move_to_device_pass(program, device).module()
    layout = RankLayout(m["parallel"]["tp"], m["parallel"]["ep"], rank)
    k0, k1 = layout.kv_heads(spec)

    def empty_cache(batch: int) -> tuple:
        z = torch.zeros(batch, k1 - k0, 0, spec.head_dim, dtype=dtype, device=device)
        return tuple((z, z) for _ in range(spec.num_hidden_layers))

    return module, empty_cache


@dataclass(frozen=True)
class RankCache:
    """The KV cache of a ParallelEngine call, as the generation loop sees it: each rank keeps its own KV heads'
    cache in its process under `handle` (0: empty, of `batch` rows). A handle is consumed by the step it feeds."""

    handle: int
    batch: int


def _next_command(commands, parent: int):
    """The parent's next message; None when it sends None or is gone (killed: no atexit ran to stop us)."""
    import os
    import queue

    while True:
        try:
            return commands.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _serve_rank(rank: int, artifact: Artifact, commands: list, results) -> None:
    """A rank's process: bind its part, then run steps as the parent sends them until it sends None."""
    import os

    from qwen3export.graphs.parallel import init_parallel_groups

    parent, p = os.getppid(), artifact.manifest["parallel"]
    try:
        init_parallel_groups(RankLayout(p["tp"], p["ep"], rank))
        step, empty_cache = load_rank_program(artifact, rank)
    except Exception as e:  # reported to the parent, which raises it as one line
        results.put((rank, "error", f"{type(e).__name__}: {e}"))
        return
    results.put((rank, "ready", None))
    caches: dict[int, tuple] = {}
    while (msg := _next_command(commands[rank], parent)) is not None:
        handle_in, handle_out, batch, ids, pos, mask = msg
        try:
            past = caches.pop(handle_in) if handle_in else empty_cache(batch)
            with torch.no_grad():
                logits, caches[handle_out] = step(torch.from_numpy(ids), torch.from_numpy(pos),
                                                  torch.from_numpy(mask), past)
        except Exception as e:
            results.put((rank, "error", f"{type(e).__name__}: {e}"))
            return
        results.put((rank, "ok", logits.numpy() if rank == 0 else None))  # every rank holds the full logits


class ParallelEngine:
    """A parallel artifact's N parts in N gloo processes, driven as one decoder step from this process.

    `engine(input_ids, position_ids, attention_mask, past) -> (logits [B, S, V], present)` has the decoder's
    signature, so generation.py's loops, parity.check_parity and the sampling graph drive it like any engine;
    each call sends the inputs to every rank and returns rank 0's logits (all ranks hold the same, gathered).
    `past`/`present` are RankCache handles: the caches stay in the rank processes. Use as a context manager
    (or close()); the processes are daemonic and also end with this process.
    """

    def __init__(self, artifact: Artifact, threads: int | None = None, load_timeout_s: float = 600.0):
        import atexit
        import multiprocessing as mp

        from .ranks import start_ranks

        m = artifact.manifest
        if m.get("backend") != BACKEND or "parallel" not in m:
            raise ArtifactError(f"{artifact.path} is not a parallel {BACKEND} artifact (backend {m.get('backend')!r})")
        self.spec, self.world = ModelSpec.from_dict(m["model"]["spec"]), m["parallel"]["world"]
        self.providers = [f"torch {torch.__version__}: {self.world} processes, gloo collectives"]
        ctx = mp.get_context("spawn")
        self._commands, self._results = [ctx.Queue() for _ in range(self.world)], ctx.Queue()
        self._next, self._closed = 1, False
        self._procs = start_ranks(_serve_rank, self.world, artifact, self._commands, self._results,
                                  threads=threads or 1)
        atexit.register(self.close)
        self._collect(load_timeout_s)

    def empty_cache(self, batch: int) -> RankCache:
        return RankCache(0, batch)

    def __call__(self, input_ids, position_ids, attention_mask, past: RankCache):
        if self._closed:
            raise ArtifactError("this ParallelEngine is closed; open the artifact again")
        handle, self._next = self._next, self._next + 1
        msg = (past.handle, handle, past.batch, input_ids.numpy(), position_ids.numpy(), attention_mask.numpy())
        for q in self._commands:
            q.put(msg)
        logits = self._collect(GLOO_STEP_TIMEOUT_S)
        return torch.from_numpy(logits), RankCache(handle, past.batch)

    def _collect(self, timeout_s: float):
        """Wait for one reply per rank -> rank 0's payload; a rank's error or death closes the engine."""
        import queue
        import time

        deadline, replies = time.monotonic() + timeout_s, {}
        while len(replies) < self.world:
            try:
                rank, kind, payload = self._results.get(timeout=1.0)
            except queue.Empty:
                dead = [i for i, p in enumerate(self._procs) if p.exitcode is not None]
                if dead or time.monotonic() > deadline:
                    self.close()
                    why = (f"rank {dead[0]} exited with code {self._procs[dead[0]].exitcode}" if dead
                           else f"no reply within {timeout_s:.0f} s")
                    raise ArtifactError(f"parallel engine failed: {why}; re-run with --debug") from None
                continue
            if kind == "error":
                self.close()
                raise ArtifactError(f"parallel engine rank {rank} failed: {payload.splitlines()[0] if payload else ''}")
            replies[rank] = payload
        return replies[0]

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for q, p in zip(self._commands, self._procs):
            if p.is_alive():
                q.put(None)
        for p in self._procs:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)

    def __enter__(self) -> "ParallelEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_parallel_artifact(path: str | Path, input_ids: torch.Tensor, attention_mask: torch.Tensor, steps: int,
                          threads: int | None = None) -> dict[str, torch.Tensor]:
    """Greedy generation on the artifact's N ranks -> {tokens [B, N], prefill [B, S, V], steps [B, N, V]}.
    Checksums are verified here, before a process starts."""
    from .generation import greedy_generate

    artifact = load_artifact(path)
    with ParallelEngine(artifact, threads) as engine:
        tokens, prefill, logits = greedy_generate(engine, engine.empty_cache(input_ids.shape[0]), input_ids,
                                                  attention_mask, steps, keep_logits=True)
    return {"tokens": tokens, "prefill": prefill, "steps": torch.stack(logits, 1)}
