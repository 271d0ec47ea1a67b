"""Host side of the sampling graph's state: the thinking-token ids, the forced early-stop sequence and
the per-row state a generation starts from (built from the prompt), plus the logits check the runner
makes before each sampling step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch

from qwen3export import tokens
from qwen3export.errors import ConfigError, InputError

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from qwen3export.spec import ModelSpec

# State tensors, in the graph's input order (the graph returns them updated, same order):
#   seen_ids      [B, S] int64  ids that appeared in the prompt (each once) or the output (each step appends
#                               its token), -1 as padding; the repetition penalty gathers/scatters these only
#   generated_ids [B, G] int64  ids of the output (each step appends its token), -1 as padding, G >= 1; the
#                               presence penalty
#   in_think      [B]    bool   inside an open <think> block
#   think_spent   [B]    int64  tokens the model sampled inside <think> in this generation (forced ones excluded)
#   forced_pos    [B]    int64  position of the next forced early-stop token, -1 when not forcing
STATE_NAMES = ("seen_ids", "generated_ids", "in_think", "think_spent", "forced_pos")
PAD_ID = -1


# Qwen's documented early stop for a thinking budget (Qwen3 model card, "thinking budget"; DESIGN §6):
# at the budget, append this text and continue generating.
EARLY_STOP_TEXT = ("\n\nConsidering the limited time by the user, I have to give the solution based on the "
                   "thinking directly now.\n</think>\n\n")


@dataclass(frozen=True)
class SamplingVocab:
    """The vocabulary facts the sampling graph is built for. A think id of None: no thinking control."""

    vocab_size: int
    think_id: int | None = tokens.THINK
    end_think_id: int | None = tokens.END_THINK

    def __post_init__(self) -> None:
        if (self.think_id is None) != (self.end_think_id is None):
            raise ConfigError("sampling vocabulary needs both <think> and </think> ids, or neither")
        for name in ("think_id", "end_think_id"):
            v = getattr(self, name)
            if v is not None and not 0 <= v < self.vocab_size:
                raise ConfigError(f"sampling vocabulary: {name} {v} is outside 0..{self.vocab_size - 1}")

    @property
    def has_thinking(self) -> bool:
        return self.think_id is not None

    @classmethod
    def from_spec(cls, spec: "ModelSpec") -> "SamplingVocab":
        return cls(spec.vocab_size, spec.think_token_id, spec.end_think_token_id)


def as_vocab(spec_or_vocab: "ModelSpec | SamplingVocab") -> SamplingVocab:
    return spec_or_vocab if isinstance(spec_or_vocab, SamplingVocab) else SamplingVocab.from_spec(spec_or_vocab)


def check_early_stop(ids: Sequence[int], vocab: SamplingVocab) -> tuple[int, ...]:
    """Validate a forced early-stop sequence: non-empty, in the vocabulary, ends with the only `</think>`
    and holds no `<think>` (so forcing ends exactly when thinking does)."""
    ids = tuple(int(i) for i in ids)
    if not vocab.has_thinking:
        raise ConfigError("this vocabulary has no <think>/</think> tokens: no early-stop sequence applies")
    if not ids or ids[-1] != vocab.end_think_id or ids.count(vocab.end_think_id) != 1:
        raise ConfigError(f"the early-stop sequence must end with </think> ({vocab.end_think_id}) and hold it "
                          f"once; got {list(ids)[:8]}{'…' if len(ids) > 8 else ''}")
    if vocab.think_id in ids:
        raise ConfigError(f"the early-stop sequence must not contain <think> ({vocab.think_id})")
    bad = [i for i in ids if not 0 <= i < vocab.vocab_size]
    if bad:
        raise ConfigError(f"early-stop token ids {bad} are outside 0..{vocab.vocab_size - 1}")
    return ids


def early_stop_ids(tokenizer: "Tokenizer | None", vocab: SamplingVocab,
                   text: str = EARLY_STOP_TEXT) -> tuple[int, ...]:
    """Token ids of the forced early-stop sequence: `text` encoded up to and including `</think>`.

    Qwen's text goes on with "\\n\\n" after `</think>`; that tail is left to the model, which writes it
    itself (every Qwen3 chat-template turn has "</think>\\n\\n"), so forcing and thinking end together.
    Without a tokenizer (presets with random weights: no text is meaningful) the sequence is the single
    token `</think>`, i.e. the budget closes the block and nothing else is forced.
    """
    if not vocab.has_thinking:
        raise ConfigError("this vocabulary has no <think>/</think> tokens: no early-stop sequence applies")
    if tokenizer is None:
        return (vocab.end_think_id,)
    end_think = tokenizer.token_to_id("</think>")
    if end_think != vocab.end_think_id:
        raise ConfigError(f"the tokenizer's </think> id ({end_think}) differs from the model's "
                          f"({vocab.end_think_id}); use the checkpoint's own tokenizer.json")
    ids = tokenizer.encode(text, add_special_tokens=False).ids
    if end_think not in ids:
        raise ConfigError("the early-stop text must contain </think> (it closes the thinking block)")
    return check_early_stop(ids[: ids.index(end_think) + 1], vocab)


def initial_state(prompts: Sequence[Sequence[int]], spec_or_vocab: "ModelSpec | SamplingVocab",
                  ) -> dict[str, torch.Tensor]:
    """The state a generation starts from, one row per prompt.

    Prompt tokens count as seen for the repetition penalty (transformers and vLLM both penalise the
    prompt) but not for the presence penalty (vLLM and the OpenAI API penalise output tokens only). A
    prompt whose last `<think>` is not closed starts inside thinking (Qwen3-*-Thinking-2507 templates
    open `<think>` themselves); its budget counts generated tokens only, as in Qwen's documented recipe.
    """
    vocab = as_vocab(spec_or_vocab)
    v = vocab.vocab_size
    if not prompts:
        raise InputError("initial_state needs at least one prompt")
    b = len(prompts)
    seen: list[list[int]] = []
    in_think = torch.zeros(b, dtype=torch.bool)  # [B]
    for row, prompt in enumerate(prompts):
        ids = torch.as_tensor(list(prompt), dtype=torch.int64)
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise InputError(f"prompt {row}: token id {bad} is out of range: ids must be in 0..{v - 1}")
        seen.append(torch.unique(ids).tolist())
        if vocab.has_thinking:
            opens = (ids == vocab.think_id).nonzero()
            closes = (ids == vocab.end_think_id).nonzero()
            last_open = int(opens[-1]) if len(opens) else -1
            last_close = int(closes[-1]) if len(closes) else -1
            in_think[row] = last_open > last_close
    return {
        "seen_ids": pad_ids(seen),  # [B, S]
        "generated_ids": torch.full((b, 1), PAD_ID, dtype=torch.int64),  # [B, 1]: nothing generated yet
        "in_think": in_think,
        "think_spent": torch.zeros(b, dtype=torch.int64),  # [B]
        "forced_pos": torch.full((b,), -1, dtype=torch.int64),  # [B]
    }


def pad_ids(rows: Sequence[Sequence[int]]) -> torch.Tensor:
    """Rows of token ids -> [B, max(1, longest)] int64, padded with PAD_ID (the state's id-list layout)."""
    out = torch.full((len(rows), max(1, *(len(r) for r in rows))), PAD_ID, dtype=torch.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = torch.as_tensor(list(r), dtype=torch.int64)
    return out


def mask_ids(mask: torch.Tensor) -> torch.Tensor:
    """A [B, V] bool mask of tokens -> its ids as the state's [B, N] padded id list (pad_ids)."""
    return pad_ids([torch.nonzero(row).flatten().tolist() for row in mask])


def check_logits(logits: torch.Tensor, vocab_size: int | None = None) -> None:
    """Host-side check before a sampling step: [B, V] float32, no NaN or +inf, one finite value per row.

    -inf is allowed (a masked token). The graph itself has no way to report an error, so the runner
    calls this first.
    """
    if logits.dim() != 2 or (vocab_size is not None and logits.shape[1] != vocab_size):
        raise InputError(f"logits must be [batch, {vocab_size or 'vocab'}], got {list(logits.shape)}")
    if logits.dtype != torch.float32:
        raise InputError(f"logits must be float32 for the sampling graph, got {logits.dtype}")
    # one single-threaded numpy pass (a torch reduction would wake torch's OpenMP pool, whose spinning
    # threads then slow the ONNX Runtime session that runs next on the same cores): NaN propagates
    # through max, +inf is the max, an all -inf row stays -inf
    if np.isfinite(logits.detach().cpu().numpy().max(axis=1)).all():
        return
    bad = torch.isnan(logits) | (logits == float("inf"))
    if bool(bad.any()):
        row = int(bad.any(dim=1).nonzero()[0])
        raise InputError(f"logits row {row} holds NaN or +inf: the decoder produced non-finite values "
                         "(check the engine's dtype; fp16 overflows on Qwen3 activations)")
    dead = ~torch.isfinite(logits).any(dim=1)
    if bool(dead.any()):
        raise InputError(f"logits row {int(dead.nonzero()[0])} is all -inf: no token can be sampled")
