"""Generation loop shared by eager PyTorch, ExportedPrograms and engines: prefill, then decode.

Two kinds of decoder drive it. A `Step` is any callable with the decoder's signature, the KV cache passed in and
returned (eager PyTorch, AOTInductor, the standard-flavour ONNX engine). A `SlotDecoder` owns its cache and steps
slots of it (cache_engine.CacheEngine: prefill(slots, prompts) / decode(slots, tokens)), which is what continuous
batching needs. Arrays are torch tensors.
"""

from __future__ import annotations

from typing import Callable, Protocol, Sequence, runtime_checkable

import torch

from qwen3export.graphs.sampling import sample_step

from .errors import InputError

Step = Callable[..., tuple[torch.Tensor, tuple]]  # (ids, pos, mask, past) -> (logits, present)


@runtime_checkable
class SlotDecoder(Protocol):
    """A decoder that owns its KV cache: rows (slots) of max_batch x max_seq, each with its own length."""

    max_batch: int

    def reserve(self, batch: int, seq: int) -> None: ...

    def release(self, slots: Sequence[int]) -> None: ...

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]], all_logits: bool = False): ...

    def decode(self, slots: Sequence[int], tokens) -> torch.Tensor: ...


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count only real tokens; pads get 1 (transformers' generate convention for left padding)."""
    pos = attention_mask.long().cumsum(-1) - 1
    return pos.masked_fill(attention_mask == 0, 1)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch prompts of different lengths with left padding -> (input_ids [B, S], attention_mask [B, S])."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("every prompt needs at least one token id")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.int64)
    mask = torch.zeros((len(prompts), width), dtype=torch.int64)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(list(p), dtype=torch.int64)
        mask[i, width - len(p):] = 1
    return ids, mask


def check_token_ids(ids: torch.Tensor, vocab_size: int) -> None:
    if ids.numel() == 0:
        raise InputError("the prompt is empty: give at least one token id")
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise InputError(f"token id {bad} is out of range: ids must be in 0..{vocab_size - 1} for this model")


@torch.no_grad()
def greedy_generate(step: Step, empty_cache: tuple, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    max_new_tokens: int, keep_logits: bool = False):
    """Greedy decode -> (new token ids [B, N], prefill logits [B, S, V], per-step last logits).

    The per-step list holds [B, V] for each of the N choices (only when keep_logits). No early stop:
    every row gets N tokens, which is what parity checks compare. A SlotDecoder computes the prefill's logits at
    every position only when keep_logits (else [B, 1, V], the last one: all that generation needs).
    """
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(step, SlotDecoder):
        return _greedy_slots(step, input_ids, attention_mask, max_new_tokens, keep_logits)
    mask = attention_mask.long()
    logits, past = step(input_ids, position_ids_from_mask(mask), mask, empty_cache)
    prefill_logits, steps, out = logits, [], []
    for i in range(max_new_tokens):
        last = logits[:, -1]
        if keep_logits:
            steps.append(last.clone())
        nxt = last.argmax(-1)
        out.append(nxt)
        if i == max_new_tokens - 1:
            break
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        pos = position_ids_from_mask(mask)[:, -1:]
        logits, past = step(nxt[:, None], pos, mask, past)
    return torch.stack(out, 1), prefill_logits, steps


def _greedy_slots(engine: SlotDecoder, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                  keep_logits: bool):
    """greedy_generate on a SlotDecoder: each row's real tokens (mask != 0) prefilled into a slot, groups of at most
    max_batch rows. The prefill logits come back where the mask has real tokens ([B, S, V], zeros at padding) when
    keep_logits, else the last position's only ([B, 1, V]): generation never computes the others."""
    mask = attention_mask.bool()
    prompts = [input_ids[b][mask[b]].tolist() for b in range(input_ids.shape[0])]
    if any(not p for p in prompts):
        raise InputError("every prompt needs at least one token id")
    tokens, prefill, steps = [], [], []
    for first in range(0, len(prompts), engine.max_batch):
        group = prompts[first:first + engine.max_batch]
        slots = list(range(len(group)))
        engine.reserve(len(group), max(map(len, group)) + max_new_tokens)
        engine.release(slots)
        rows = engine.prefill(slots, group, all_logits=keep_logits)
        last = torch.stack([r[-1] for r in rows]) if keep_logits else rows
        if keep_logits:
            full = torch.zeros(len(group), mask.shape[1], last.shape[-1])
            for j, r in enumerate(rows):
                full[j, mask[first + j]] = r
            prefill.append(full)
        else:
            prefill.append(last[:, None])
        out, kept = [], []
        for i in range(max_new_tokens):
            if keep_logits:
                kept.append(last.clone())
            nxt = last.argmax(-1)
            out.append(nxt)
            if i < max_new_tokens - 1:
                last = engine.decode(slots, nxt)
        engine.release(slots)
        tokens.append(torch.stack(out, 1))
        steps.append(kept)
    joined = [torch.cat([s[i] for s in steps]) for i in range(len(steps[0]))] if keep_logits else []
    return torch.cat(tokens), torch.cat(prefill), joined


@torch.no_grad()
def sample_generate(step: Step, empty_cache: tuple, sampler, prompt: list[int], params: dict[str, torch.Tensor],
                    state: dict[str, torch.Tensor], max_new_tokens: int, rng, stop_ids=()):
    """Prefill, then one sampling-graph step per new token (graphs/sampling.py does penalties, filtering,
    thinking control); stops after a token in `stop_ids` (kept) or `max_new_tokens`.

    -> (new token ids, final sampling state).
    """

    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if isinstance(step, SlotDecoder):
        return _sample_slot(step, empty_cache[0], sampler, prompt, params, state, max_new_tokens, rng, stop_ids)
    ids = torch.tensor([prompt], dtype=torch.int64)
    mask = torch.ones_like(ids)
    logits, past = step(ids, position_ids_from_mask(mask), mask, empty_cache)
    out: list[int] = []
    stop = set(stop_ids)
    while True:
        token, state = sample_step(sampler, logits[:, -1].float(), state, params, rng)
        out.append(int(token[0]))
        if out[-1] in stop or len(out) == max_new_tokens:
            return out, state
        mask = torch.cat((mask, torch.ones_like(mask[:, :1])), dim=1)
        logits, past = step(token[:, None], torch.tensor([[mask.shape[1] - 1]]), mask, past)


def _sample_slot(engine: SlotDecoder, slot: int, sampler, prompt: list[int], params, state, max_new_tokens: int, rng,
                 stop_ids) -> tuple[list[int], dict[str, torch.Tensor]]:
    """sample_generate on one slot of a SlotDecoder: the prefill computes the last position's logits only."""
    engine.reserve(slot + 1, len(prompt) + max_new_tokens)
    engine.release([slot])
    logits = engine.prefill([slot], [prompt])
    out: list[int] = []
    stop = set(stop_ids)
    try:
        while True:
            token, state = sample_step(sampler, logits.float(), state, params, rng)
            out.append(int(token[0]))
            if out[-1] in stop or len(out) == max_new_tokens:
                return out, state
            logits = engine.decode([slot], token)
    finally:
        engine.release([slot])
