"""Generation loop shared by eager PyTorch, ExportedPrograms and engines: prefill, then decode through
the explicit KV cache. A `Step` is any callable with the decoder's signature; arrays are torch tensors.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from qwen3export.graphs.sampling import sample_step

from .errors import InputError

Step = Callable[..., tuple[torch.Tensor, tuple]]  # (ids, pos, mask, past) -> (logits, present)


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
    every row gets N tokens, which is what parity checks compare.
    """
    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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


@torch.no_grad()
def sample_generate(step: Step, empty_cache: tuple, sampler, prompt: list[int], params: dict[str, torch.Tensor],
                    state: dict[str, torch.Tensor], max_new_tokens: int, rng, stop_ids=()):
    """Prefill, then one sampling-graph step per new token (graphs/sampling.py does penalties, filtering,
    thinking control); stops after a token in `stop_ids` (kept) or `max_new_tokens`.

    -> (new token ids, final sampling state).
    """

    if max_new_tokens <= 0:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
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
