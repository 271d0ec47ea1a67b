"""Parallel artifacts: a tp x ep decoder as one part per rank (its weight shard as safetensors) plus a manifest
describing the ranks; and the runner, ParallelEngine: the N parts in N gloo processes, stepped from the
caller's process as one decoder.

Layout: `<out>/manifest.json`, `<out>/rank<r>/weights.safetensors`, nothing else per rank. No program is
stored: a pickled torch.export program (.pt2) runs code when loaded, so each rank process re-captures its
program on the meta device from the manifest's spec and parallel layout (graphs/parallel.py
meta_rank_decoder + capture_rank, seconds for a toy) and binds the shard, checked name by name against the
program's state_dict. The build holds one rank's shard at a time and never a whole model.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.export.passes import move_to_device_pass

from qwen3export.graph_capture import capture_rank
from qwen3export.graphs.parallel import (TP_GROUP, WORLD_GROUP, RankLayout, init_parallel_groups, layouts,
                                         meta_rank_decoder, rank_tensors)
from qwen3export.graphs.rope import rope_parameters

from .artifact import Artifact
from .errors import ArtifactError, Qwen3ExportError
from .manifest import ParallelRecord
from .ranks import start_ranks
from .spec import ModelSpec
from .weights import parse_dtype

BACKEND = "torch-export"
WEIGHTS_FILE = "weights.safetensors"
PROGRAM_RECORD = "re-captured from the manifest's spec at load (no code stored)"  # the manifest's engine.program
LEGACY_PROGRAM_FILE = "decoder.pt2"  # parts written before issue 16: a pickled program, refused, never loaded
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}
GLOO_STEP_TIMEOUT_S = 180  # one step's reply; above ranks.GLOO_TIMEOUT_S so a stuck collective errors first


def part_folder(rank: int) -> str:
    return f"rank{rank}"


def parallel_record(tp: int, ep: int) -> ParallelRecord:
    """The manifest's `parallel` entry."""
    return {"tp": tp, "ep": ep, "world": tp * ep, "rank_order": "rank = ep_rank * tp + tp_rank",
            "collectives": "torch.distributed functional collectives (_c10d_functional all_reduce, "
                           "all_gather_into_tensor): gloo on CPU (what ParallelEngine runs); NCCL on CUDA is not "
                           "run by this runner",
            "groups": {TP_GROUP: "the rank's tp ranks (same ep_rank)", WORLD_GROUP: "all ranks"}}


def write_parts(folder: Path, spec: ModelSpec, source: Any, ranks: list[RankLayout], dtype: torch.dtype,
                progress=lambda s: None) -> list[dict[str, Any]]:
    """Each rank's weight shard into `folder` (one full source tensor read at a time, sliced); no program:
    the runner re-captures it (load_rank_program). -> the manifest's `ranks` entries."""
    entries = []
    for layout in ranks:
        part = folder / part_folder(layout.rank)
        part.mkdir()
        progress(f"  rank {layout.rank}: tp_rank {layout.tp_rank}, ep_rank {layout.ep_rank}: shard")
        save_file({n: t.contiguous() for n, t in rank_tensors(spec, source, layout, dtype)},
                  str(part / WEIGHTS_FILE), metadata={"format": "pt"})
        entries.append({**layout.to_dict(spec), "files": [f"{part_folder(layout.rank)}/{WEIGHTS_FILE}"]})
    return entries


def check_parts(artifact: Artifact) -> list[RankLayout]:
    """The artifact's rank layouts, after checking, from the manifest and the disk alone (no process, no
    tensor read), that each part folder (rank<N>/) holds exactly its weights.safetensors: a program file there
    (an older build's pickled decoder.pt2, or anything else) is refused, never loaded."""
    m, rebuild = artifact.manifest, "rebuild the artifact with this version of qwen3export (`qwen3export build --tp N`)"
    try:
        spec, p = ModelSpec.from_dict(m["model"]["spec"]), m["parallel"]
        tp, ep = p["tp"], p["ep"]
        if type(tp) is not int or type(ep) is not int or p.get("world") != tp * ep:
            raise ArtifactError(f"parallel tp {tp!r} x ep {ep!r} != world {p.get('world')!r}")
        ranks = layouts(spec, tp, ep)
    except (KeyError, TypeError, AttributeError, Qwen3ExportError) as e:
        raise ArtifactError(f"{artifact.path}: the manifest's model spec / parallel record is unusable "
                            f"({type(e).__name__}: {e}); {rebuild}") from None
    wanted = {f"{part_folder(r.rank)}/{WEIGHTS_FILE}" for r in ranks}
    listed = set(m.get("files") or {})
    on_disk = {f.relative_to(artifact.path).as_posix() for d in artifact.path.glob("rank*") if d.is_dir()
               for f in d.rglob("*")}
    in_parts = {r for r in listed | on_disk if re.fullmatch(r"rank\d+", r.split("/")[0])}
    for rel in sorted(in_parts - wanted):
        if rel.endswith(LEGACY_PROGRAM_FILE):
            raise ArtifactError(f"{artifact.path}/{rel}: a stored torch.export program (pickle, which can run "
                                f"code) from an older build; parts now hold only weights and the program is "
                                f"re-captured from the spec, so it is never loaded: {rebuild}")
        raise ArtifactError(f"{artifact.path}/{rel}: a part folder holds only {WEIGHTS_FILE}; remove the file "
                            f"or {rebuild}")
    missing = sorted(wanted - on_disk)  # listing and checksums are load_artifact's (a build checks before sealing)
    if missing:
        raise ArtifactError(f"{artifact.path}: part file {missing[0]} is missing; {rebuild}")
    return ranks


def _read_shard(path: Path, rel: str, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The shard's tensors, after its safetensors header (names, shapes, dtypes) matched `expected` (the
    re-captured program's state_dict, meta tensors); data-only: safetensors runs no code."""
    fix = "rebuild the artifact with this version of qwen3export"
    try:
        with safe_open(str(path), framework="pt") as f:
            names = set(f.keys())
            if names != set(expected):
                diff = {"missing": sorted(set(expected) - names)[:3], "unexpected": sorted(names - set(expected))[:3]}
                raise ArtifactError(f"{rel} does not hold the tensors of the rank program re-captured from the "
                                    f"manifest's spec ({', '.join(f'{k} {v}' for k, v in diff.items() if v)}); {fix}")
            for name in sorted(names):
                s, want = f.get_slice(name), expected[name]
                dtype = SAFETENSORS_DTYPES.get(want.dtype, str(want.dtype))
                if list(s.get_shape()) != list(want.shape) or s.get_dtype() != dtype:
                    raise ArtifactError(f"{rel} tensor {name} is {s.get_dtype()} {list(s.get_shape())}, the rank "
                                        f"program re-captured from the manifest's spec wants {dtype} "
                                        f"{list(want.shape)}; {fix}")
            return {name: f.get_tensor(name) for name in names}
    except (SafetensorError, OSError, ValueError) as e:
        raise ArtifactError(f"{rel} is not a readable safetensors file ({e}); {fix}") from None


def load_rank_program(artifact: Artifact, rank: int, device: str | torch.device = "cpu"):
    """The rank's program with its shard bound, on `device`: (callable with the decoder's signature,
    empty_cache). The program is re-captured here on meta from the manifest's spec and layout (nothing
    executable is read from the artifact); its weights, its RoPE constant and the device of the tensors it
    creates are all bound here (torch.export.passes.move_to_device_pass)."""
    layout = check_parts(artifact)[rank]
    m = artifact.manifest
    spec, dtype = ModelSpec.from_dict(m["model"]["spec"]), parse_dtype(m["dtype"])
    rel = f"{part_folder(rank)}/{WEIGHTS_FILE}"
    program = capture_rank(meta_rank_decoder(spec, layout, dtype))
    program.example_inputs = None  # meta tensors: nothing to move to `device`
    tied = spec.tie_word_embeddings and "lm_head.weight" in program.state_dict  # stored once, as the embedding
    tensors = _read_shard(artifact.path / rel, rel,
                          {n: t for n, t in program.state_dict.items() if not (tied and n == "lm_head.weight")})
    if tied:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"]  # one tensor, both names: still tied
    params: dict[int, torch.nn.Parameter] = {}
    for name in program.state_dict:
        t = tensors[name]
        program.state_dict[name] = params.setdefault(id(t), torch.nn.Parameter(t, requires_grad=False))
    if set(program.constants) != {"inv_freq"}:  # our own capture: a change in graphs/parallel.py lands here
        raise ArtifactError(f"the re-captured rank program has constants {sorted(program.constants)}; this "
                            "runner binds only inv_freq (internal: graphs/parallel.py changed)")
    program.constants["inv_freq"] = rope_parameters(spec.head_dim, spec.rope_theta, spec.rope_scaling)[0]  # fp32
    module = move_to_device_pass(program, device).module()
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
    while True:
        try:
            return commands.get(timeout=5.0)
        except queue.Empty:
            if os.getppid() != parent:
                return None


def _serve_rank(rank: int, artifact: Artifact, commands: list, results) -> None:
    """A rank's process: bind its part, then run steps as the parent sends them until it sends None."""
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
        m = artifact.manifest
        if m.get("backend") != BACKEND or "parallel" not in m:
            raise ArtifactError(f"{artifact.path} is not a parallel {BACKEND} artifact (backend {m.get('backend')!r})")
        check_parts(artifact)  # an old or altered part is refused here, before any process starts
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
        deadline, replies = time.monotonic() + timeout_s, dict[int, Any]()
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
