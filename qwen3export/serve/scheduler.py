"""Continuous batching: one engine thread owns the SlotDecoder (cache_engine.CacheEngine) and the artifact's
sampling graph; requests wait in a bounded queue, join at a token boundary into a free slot (prefilled alone, as
`run` prefills), and every step decodes all active slots together and samples them in one sampling-graph call
with per-row parameters, state and uniforms (each row's own seeded generator, one uniform per step, as `run`
draws them). A finished or cancelled (client gone) request frees its slot before the next step.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from qwen3export.graphs.sampling import (INPUT_NAMES, PARAM_DTYPES, PARAM_NAMES, SamplingParams, check_logits,
                                         initial_state, pad_ids)

from ..errors import Qwen3ExportError
from .reasoning import OutputSplitter


class QueueFull(Qwen3ExportError):
    """More requests wait than --max-queue allows."""


@dataclass
class Request:
    prompt: list[int]
    params: SamplingParams
    max_tokens: int
    seed: int | None
    stop_ids: frozenset[int]
    splitter: OutputSplitter
    loop: asyncio.AbstractEventLoop | None = None
    events: "asyncio.Queue[dict[str, Any]] | None" = None
    on_event: Callable[[dict[str, Any]], None] | None = None  # called from the engine thread (tests, benchmarks)
    cancelled: bool = False
    # filled by the engine thread
    tokens: list[int] = field(default_factory=list)
    submitted: float = field(default_factory=time.perf_counter)
    times: list[float] = field(default_factory=list)  # perf_counter at each token
    finish_reason: str | None = None

    def cancel(self) -> None:
        self.cancelled = True


@dataclass
class _Row:
    req: Request
    slot: int
    rng: np.random.Generator
    seen: list[int]
    generated: list[int]
    in_think: bool
    think_spent: int = 0
    forced_pos: int = -1
    logits: torch.Tensor | None = None  # set by prefill; else the last token is decoded first


class Scheduler:
    """The engine loop. `engine`: a SlotDecoder (max_batch slots); `sampler`: the artifact's sampling graph
    (SamplingSession or the aoti package's module), `vocab`: its SamplingVocab. `metrics`: an object with
    observe_* hooks (app.Metrics) or None."""

    def __init__(self, engine, sampler, vocab, max_queue: int, metrics=None):
        self.engine, self.sampler, self.vocab, self.metrics = engine, sampler, vocab, metrics
        self.max_batch, self.max_queue = engine.max_batch, max_queue
        self.pending: collections.deque[Request] = collections.deque()
        self.rows: dict[int, _Row] = {}
        self.cv = threading.Condition()
        self.stopping = False
        self.error: BaseException | None = None
        self.steps = 0
        self.thread = threading.Thread(target=self._loop, name="qwen3export-engine", daemon=True)

    # ------------------------------------------------------------------ outside the engine thread
    def start(self) -> "Scheduler":
        self.thread.start()
        return self

    def stop(self) -> None:
        with self.cv:
            self.stopping = True
            self.cv.notify_all()
        self.thread.join(timeout=30)

    def submit(self, req: Request) -> None:
        with self.cv:
            if self.error is not None:
                raise Qwen3ExportError(f"the engine loop stopped: {self.error}")
            if len(self.pending) >= self.max_queue:
                raise QueueFull(f"{len(self.pending)} requests are waiting (--max-queue {self.max_queue}); retry later")
            self.pending.append(req)
            self.cv.notify_all()
        self._gauges()

    def queue_depth(self) -> int:
        return len(self.pending)

    def active(self) -> int:
        return len(self.rows)

    # ------------------------------------------------------------------ the engine thread
    def _emit(self, req: Request, event: dict[str, Any]) -> None:
        if req.on_event is not None:
            req.on_event(event)
        if req.loop is not None and req.events is not None:
            try:
                req.loop.call_soon_threadsafe(req.events.put_nowait, event)
            except RuntimeError:  # the server's event loop is closed: nobody is listening
                req.cancel()

    def _gauges(self) -> None:
        if self.metrics is not None:
            self.metrics.gauges(len(self.pending), len(self.rows), self.max_batch)

    def _loop(self) -> None:
        try:
            while True:
                with self.cv:
                    while not self.stopping and not self.pending and not self.rows:
                        self.cv.wait()
                    if self.stopping:
                        break
                self._step()
        except BaseException as e:  # noqa: BLE001 - reported to every waiting request, then the loop ends
            self.error = e
            for req in [r.req for r in self.rows.values()] + list(self.pending):
                self._emit(req, {"error": f"the engine failed: {type(e).__name__}: {e}"})
            raise
        finally:
            for row in self.rows.values():
                self._emit(row.req, {"error": "the server is shutting down"})

    def _free(self, row: _Row) -> None:
        self.engine.release([row.slot])
        del self.rows[row.slot]

    def _admit(self) -> None:
        """Cancelled rows leave; waiting requests take free slots, each prefilled alone."""
        for row in [r for r in self.rows.values() if r.req.cancelled]:
            row.req.finish_reason = "cancelled"
            self._free(row)
        while True:
            with self.cv:
                free = [s for s in range(self.max_batch) if s not in self.rows]
                if not free or not self.pending:
                    break
                req = self.pending.popleft()
            if req.cancelled:
                continue
            slot = free[0]
            self.engine.release([slot])
            state = initial_state([req.prompt], self.vocab)
            row = _Row(req, slot, np.random.default_rng(req.seed), list(state["seen_ids"][0].tolist()), [],
                       bool(state["in_think"][0]))
            row.logits = self.engine.prefill([slot], [req.prompt])[0]
            self.rows[slot] = row

    def _step(self) -> None:
        self._admit()
        self._gauges()
        if not self.rows:
            return
        rows = [self.rows[s] for s in sorted(self.rows)]
        decode = [r for r in rows if r.logits is None]
        if decode:
            logits = self.engine.decode([r.slot for r in decode], torch.tensor([r.generated[-1] for r in decode]))
            for r, row_logits in zip(decode, logits):
                r.logits = row_logits
        tokens = self._sample(rows)
        now = time.perf_counter()
        self.steps += 1
        for row, token in zip(rows, tokens):
            self._advance(row, int(token), now)
        self._gauges()

    def _sample(self, rows: Sequence[_Row]) -> torch.Tensor:
        """One sampling-graph call over the rows: per-row parameters, state as id lists, one uniform each."""
        # rows stacked by numpy: torch.stack of [V] rows took ~40 ms for 8 x 151,936 on a busy 2-core machine
        # (its intra-op pool), numpy ~2 ms
        logits = torch.from_numpy(np.stack([r.logits.float().numpy() for r in rows]))
        check_logits(logits, self.vocab.vocab_size)
        params = {n: torch.tensor([getattr(r.req.params, n) for r in rows], dtype=d) for n, d in PARAM_DTYPES.items()}
        state = {"seen_ids": pad_ids([r.seen for r in rows]), "generated_ids": pad_ids([r.generated for r in rows]),
                 "in_think": torch.tensor([r.in_think for r in rows]),
                 "think_spent": torch.tensor([r.think_spent for r in rows], dtype=torch.int64),
                 "forced_pos": torch.tensor([r.forced_pos for r in rows], dtype=torch.int64)}
        uniforms = torch.from_numpy(np.array([r.rng.random(1, dtype=np.float32)[0] for r in rows], np.float32))
        feed = {"logits": logits, **state, **params, "uniforms": uniforms}
        with torch.no_grad():
            out = self.sampler(*(feed[n] for n in INPUT_NAMES))
        token, _, _, in_think, spent, forced = out
        for i, r in enumerate(rows):
            r.in_think, r.think_spent, r.forced_pos = bool(in_think[i]), int(spent[i]), int(forced[i])
            r.logits = None
        return token

    def _advance(self, row: _Row, token: int, now: float) -> None:
        req = row.req
        row.seen.append(token)
        row.generated.append(token)
        req.tokens.append(token)
        req.times.append(now)
        if self.metrics is not None:
            self.metrics.token(req, now)
        reasoning, content = req.splitter.add(token)
        done = None
        if req.splitter.stopped or token in req.stop_ids:
            done = "stop"
        elif len(req.tokens) >= req.max_tokens:
            done = "length"
        elif req.cancelled:
            done = "cancelled"
        if done is not None:
            r2, c2 = req.splitter.flush()
            reasoning, content = reasoning + r2, content + c2
        self._emit(req, {"token": token, "reasoning": reasoning, "content": content})
        if done is not None:
            req.finish_reason = done
            self._free(row)
            self._emit(req, {"finish_reason": done})


class StepSlots:
    """A decoder with the Step signature (aoti, the standard ONNX flavour, --tp/--ep parallel engines: they
    carry their cache between calls) as a SlotDecoder of one slot: such artifacts are served one request at a
    time (max batch 1), each request in turn."""

    max_batch = 1

    def __init__(self, step, max_seq: int):
        self.step, self.spec, self.max_seq = step, step.spec, max_seq
        self.past, self.length = None, 0

    def reserve(self, batch: int, seq: int) -> None:
        pass

    def release(self, slots: Sequence[int]) -> None:
        self.past, self.length = None, 0

    @torch.no_grad()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], all_logits: bool = False):
        ids = torch.tensor([list(prompts[0])], dtype=torch.int64)
        mask = torch.ones_like(ids)
        pos = torch.arange(ids.shape[1])[None]
        logits, self.past = self.step(ids, pos, mask, self.step.empty_cache(1))
        self.length = ids.shape[1]
        return logits[:, -1].float()

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens) -> torch.Tensor:
        tok = torch.as_tensor(tokens, dtype=torch.int64).reshape(1, 1)
        mask = torch.ones(1, self.length + 1, dtype=torch.int64)
        logits, self.past = self.step(tok, torch.tensor([[self.length]]), mask, self.past)
        self.length += 1
        return logits[:, -1].float()
