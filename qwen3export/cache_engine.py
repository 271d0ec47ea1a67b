"""Runtime: an ONNX Runtime decoder that owns its KV cache (the ort flavour's interface, backends/onnx.py
share_kv_buffer), one [max_batch, Hkv, max_seq, D] buffer per layer and K/V, allocated once and updated in place.

Each row of the buffers is a slot holding one sequence with its own length, right-padded: what continuous
batching needs (a request takes a free slot, prefills it, then decodes with the others; leaving frees the slot).
Past and present are bound to the same OrtValue (I/O binding), so GroupQueryAttention writes the new positions
into the buffer and no cache is copied between steps. Steps over several slots run one session call per
contiguous run of slots (a run of rows is one contiguous view of the buffer).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .errors import InputError
from .spec import ModelSpec

# GroupQueryAttention's per-row lengths, computed inside the shared-buffer decoder from attention_mask, and the
# decoder's optional input naming the positions whose logits a step returns (backends/onnx.py share_kv_buffer)
SEQLENS, TOTAL_LENGTH, LOGITS_INDEX = "seqlens_k", "total_sequence_length", "logits_index"


def is_shared_buffer(session) -> bool:
    """Whether an ONNX Runtime session runs the shared-buffer decoder (it takes a logits_index, fed or not:
    ONNX Runtime lists an input that is also an initializer among the overridable initializers)."""
    return any(v.name == LOGITS_INDEX for v in (*session.get_inputs(), *session.get_overridable_initializers()))


def contiguous_runs(slots: Sequence[int]) -> list[tuple[int, int, int]]:
    """(first row in `slots`, first slot, number of slots) for each run of consecutive slot ids."""
    runs: list[tuple[int, int, int]] = []
    for row, slot in enumerate(slots):
        if runs and slot == runs[-1][1] + runs[-1][2]:
            first, start, n = runs[-1]
            runs[-1] = (first, start, n + 1)
        else:
            runs.append((row, slot, 1))
    return runs


class CacheEngine:
    """A decoder session over slots of one in-place KV cache.

    prefill(slots, prompts) -> logits [B, V] at each prompt's last token (all_logits: a list of [n_i, V], what
    parity compares); decode(slots, tokens [B]) -> logits [B, V] of the token appended to each slot.
    `lengths[slot]` is the number of positions a slot holds; release(slots) frees them.
    """

    def __init__(self, spec: ModelSpec, session, providers: list[str], max_batch: int, max_seq: int,
                 dtype=np.float32):
        """`session`: ONNX Runtime's over a shared-buffer decoder (runner.onnx_session); the buffers are allocated
        once at `max_batch` x `max_seq` (the artifact's serving limits) in the engine's `dtype`."""
        self.spec, self.session, self.providers, self.np_dtype = spec, session, providers, dtype
        self.buffers: list[np.ndarray] = []
        self.lengths = np.zeros(0, dtype=np.int64)
        self._allocate(max_batch, max_seq)

    # ------------------------------------------------------------------ the cache
    def _allocate(self, batch: int, seq: int) -> None:
        """Buffers of [batch, Hkv, seq, D] per layer and K/V, the old content copied in (only ever at start or from
        reserve, never during generation). np.zeros maps untouched pages lazily: a slot costs the memory of the
        positions it holds."""
        s = self.spec
        old, old_lengths = self.buffers, self.lengths
        self.buffers = [np.zeros((batch, s.num_key_value_heads, seq, s.head_dim), self.np_dtype)
                        for _ in range(2 * s.num_hidden_layers)]
        self.lengths = np.zeros(batch, dtype=np.int64)
        for new, prev in zip(self.buffers, old):
            b, n = min(batch, prev.shape[0]), min(seq, prev.shape[2])
            new[:b, :, :n] = prev[:b, :, :n]
        self.lengths[:len(old_lengths)] = np.minimum(old_lengths[:batch], seq)
        self.max_batch, self.max_seq = batch, seq
        self._views: dict[tuple[int, int], list] = {}

    def reserve(self, batch: int, seq: int) -> None:
        """Room for `batch` slots of `seq` positions: a check larger than the serving limits (parity's 2 x 48
        tokens on a --max-seq 40 build) grows the buffers here, before generation starts."""
        if batch > self.max_batch or seq > self.max_seq:
            self._allocate(max(batch, self.max_batch), max(seq, self.max_seq))

    def release(self, slots: Sequence[int]) -> None:
        self.lengths[list(slots)] = 0

    def empty_cache(self, batch: int) -> tuple[int, ...]:
        """Slots 0..batch-1, emptied: the handle generation.greedy_generate takes where a Step takes its cache."""
        self.reserve(batch, 1)
        slots = tuple(range(batch))
        self.release(slots)
        return slots

    def _cache_values(self, start: int, n: int) -> list:
        """OrtValues over rows [start, start + n) of every buffer (views: no copy), kept per run."""
        import onnxruntime as ort  # lazy: the engine is built on a session, so onnxruntime is loaded by now

        key = (start, n)
        if key not in self._views:
            self._views[key] = [ort.OrtValue.ortvalue_from_numpy(b[start:start + n]) for b in self.buffers]
        return self._views[key]

    # ------------------------------------------------------------------ steps
    def run_rows(self, start: int, ids: np.ndarray, positions: np.ndarray, totals: np.ndarray,
             logits_index: np.ndarray) -> np.ndarray:
        """One session call over slots [start, start + B): ids / positions [B, S], totals [B] (each row's length
        after the step), logits_index [B, N] -> logits [B, N, V]. The attention mask is right-padded: row b has
        ones at its first totals[b] positions (the graph's seqlens_k = totals - 1; its width, GQA's total length,
        is the longest row, at least S)."""
        import onnxruntime as ort  # lazy: the engine is built on a session, so onnxruntime is loaded by now

        b = ids.shape[0]
        binding = self.session.io_binding()
        width = max(int(totals.max()), ids.shape[1])
        mask = (np.arange(width)[None] < totals[:, None]).astype(np.int64)  # [B, width]
        for name, value in {"input_ids": ids, "position_ids": positions, "attention_mask": mask}.items():
            binding.bind_cpu_input(name, np.ascontiguousarray(value))
        # bind_cpu_input refuses logits_index (an overridable initializer: ONNX Runtime does not list it among the
        # session's inputs); an OrtValue over the array (kept alive until the run) binds it
        index = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(logits_index))
        binding.bind_ortvalue_input(LOGITS_INDEX, index)
        binding.bind_output("logits")
        for i, value in enumerate(self._cache_values(start, b)):  # past and present: the same buffer
            layer, kv = divmod(i, 2)
            which = ("key", "value")[kv]
            binding.bind_ortvalue_input(f"past_key_values.{layer}.{which}", value)
            binding.bind_ortvalue_output(f"present.{layer}.{which}", value)
        self.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()

    def _check_room(self, slots: Sequence[int], added: Sequence[int]) -> None:
        for slot, n in zip(slots, added):
            if not 0 <= slot < self.max_batch:
                raise InputError(f"slot {slot} is out of range: this engine has {self.max_batch} slots (--max-batch)")
            if self.lengths[slot] + n > self.max_seq:
                raise InputError(f"slot {slot} would hold {self.lengths[slot] + n} tokens, over the engine's "
                                 f"{self.max_seq} per sequence; rebuild with a larger --max-seq")

    @torch.no_grad()
    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], all_logits: bool = False,
                positions: Sequence[Sequence[int]] | None = None):
        """Append each prompt to its slot -> logits [B, V] at each prompt's last token, or (all_logits) a list of
        [n_i, V] at every prompt position. Empty slots prefill together, right-padded (GroupQueryAttention's
        first prompt); a slot that already holds tokens extends alone (ORT's GQA takes a multi-token step over a
        cache only at batch 1). `positions` (RoPE's, per prompt token) default to the slot's cache positions."""
        if len(slots) != len(prompts) or any(len(p) == 0 for p in prompts):
            raise InputError("prefill takes one non-empty prompt per slot")
        self._check_room(slots, [len(p) for p in prompts])
        out: list = [None] * len(slots)
        fresh = [r for r, s in enumerate(slots) if self.lengths[s] == 0]
        fresh_slots = [slots[r] for r in fresh]
        groups = [[fresh[first + j] for j in range(n)] for first, _, n in contiguous_runs(fresh_slots)]
        groups += [[r] for r in range(len(slots)) if r not in fresh]
        for rows in groups:
            start, width = slots[rows[0]], max(len(prompts[r]) for r in rows)
            past = self.lengths[start:start + len(rows)].copy()  # 0 for a fresh group
            ids = np.zeros((len(rows), width), np.int64)
            for j, r in enumerate(rows):
                ids[j, :len(prompts[r])] = prompts[r]
            n = np.array([len(prompts[r]) for r in rows])
            pos = past[:, None] + np.arange(width)[None]
            if positions is not None:
                for j, r in enumerate(rows):
                    pos[j, :len(prompts[r])] = positions[r]
            index = np.arange(width)[None].repeat(len(rows), 0) if all_logits else (n - 1)[:, None]
            logits = self.run_rows(start, ids, pos, past + n, index)
            self.lengths[start:start + len(rows)] = past + n
            for j, r in enumerate(rows):
                out[r] = torch.from_numpy(logits[j, :n[j]] if all_logits else logits[j, 0]).float()
        return out if all_logits else torch.stack(out)

    @torch.no_grad()
    def decode(self, slots: Sequence[int], tokens, positions=None) -> torch.Tensor:
        """Append one token per slot -> logits [B, V]. Each run of consecutive slots is one session call.
        `positions` [B] (RoPE's) default to the slots' lengths."""
        tokens = np.asarray(tokens, dtype=np.int64).reshape(-1)
        if len(tokens) != len(slots):
            raise InputError(f"decode takes one token per slot: {len(tokens)} tokens for {len(slots)} slots")
        self._check_room(slots, [1] * len(slots))
        if any(self.lengths[s] == 0 for s in slots):
            raise InputError("decode needs a prefilled slot: prefill it first")
        out = np.empty((len(slots), self.spec.vocab_size), np.float32)
        for first, start, n in contiguous_runs(slots):
            past = self.lengths[start:start + n].copy()
            pos = past if positions is None else np.asarray(positions, np.int64).reshape(-1)[first:first + n]
            logits = self.run_rows(start, tokens[first:first + n, None], pos[:, None], past + 1, np.zeros((n, 1), np.int64))
            self.lengths[start:start + n] = past + 1
            out[first:first + n] = logits[:, 0]
        return torch.from_numpy(out)

    def __call__(self, input_ids: torch.Tensor, position_ids: torch.Tensor, attention_mask: torch.Tensor,
                 past: Sequence[int]):
        """The decoder's Step signature over slots, for code written against concatenating decoders: `past` is the
        slots (empty_cache's), returned as `present`; a row's new tokens are those whose attention_mask column (the
        last S) is nonzero, at their position_ids. -> (logits [B, S, V], zeros at padding; slots). A prefill this
        way computes logits at every position: generation uses prefill / decode, which compute the last only."""
        slots, s = tuple(past), input_ids.shape[1]
        real = attention_mask[:, -s:] != 0
        if s == 1 and all(self.lengths[x] > 0 for x in slots):
            return self.decode(slots, input_ids[:, 0], position_ids[:, 0])[:, None], slots
        rows = self.prefill(slots, [input_ids[b][real[b]].tolist() for b in range(len(slots))], all_logits=True,
                            positions=[position_ids[b][real[b]].tolist() for b in range(len(slots))])
        logits = torch.zeros(len(slots), s, self.spec.vocab_size)
        for b, r in enumerate(rows):
            logits[b, real[b]] = r
        return logits, slots
