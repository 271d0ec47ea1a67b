"""Output text per request, split as vLLM's Qwen3 reasoning parser does: tokens inside <think>…</think> go to
`reasoning_content`, the rest to `content`; the markers themselves go to neither.

The split is made on token ids (the sampling graph's own notion of being inside thinking), so a streamed response
and a non-streamed one are cut at the same tokens. Each channel is detokenized incrementally (the whole channel
decoded again, the new suffix emitted; a trailing U+FFFD, half a UTF-8 character, is held back), and stop strings
cut a channel's text at their first occurrence (text that could still become a stop string is held back while
streaming).
"""

from __future__ import annotations

from typing import Callable, Sequence

Decode = Callable[[list[int]], str]


def ids_text(ids: list[int]) -> str:
    """The text of an artifact without a tokenizer: the token ids, space-separated."""
    return " ".join(map(str, ids))


class Channel:
    """One channel's token ids and the part of its text already emitted."""

    def __init__(self, decode: Decode, stops: Sequence[str]):
        self.decode, self.stops = decode, [s for s in stops if s]
        self.ids: list[int] = []
        self.sent = 0  # characters of the text emitted
        self.stopped = False
        self.text = ""

    def add(self, token: int) -> str:
        """Append a token -> the text that may be emitted now ('' while held back)."""
        self.ids.append(token)
        self.text = self.decode(self.ids)
        for s in self.stops:
            at = self.text.find(s)
            if at >= 0:
                self.text, self.stopped = self.text[:at], True
        if self.stopped:
            return self.flush()
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        hold = max((len(s) - 1 for s in self.stops), default=0)
        for k in range(min(hold, safe), 0, -1):  # a suffix that begins a stop string waits
            if any(s.startswith(self.text[safe - k:safe]) for s in self.stops):
                safe -= k
                break
        out, self.sent = self.text[self.sent:max(safe, self.sent)], max(safe, self.sent)
        return out

    def flush(self) -> str:
        out, self.sent = self.text[self.sent:], len(self.text)
        return out


class OutputSplitter:
    """A request's generated tokens -> (reasoning delta, content delta) per token. `split` false (completions):
    everything is content, markers included as the tokenizer decodes them."""

    def __init__(self, decode: Decode, stops: Sequence[str], think_id: int | None, end_think_id: int | None,
                 in_think: bool, split: bool, skip: Sequence[int] = ()):
        self.reasoning, self.content = Channel(decode, stops), Channel(decode, stops)
        self.think_id, self.end_think_id = (think_id, end_think_id) if split else (None, None)
        self.in_think, self.skip = in_think and split, set(skip)
        self.reasoning_tokens = 0

    @property
    def stopped(self) -> bool:
        return self.reasoning.stopped or self.content.stopped

    def add(self, token: int) -> tuple[str, str]:
        if token == self.think_id and not self.in_think:
            self.in_think = True
            return "", ""
        if token == self.end_think_id and self.in_think:
            self.in_think = False
            return self.reasoning.flush(), ""
        if token in self.skip:
            return "", ""
        if self.in_think:
            self.reasoning_tokens += 1
            return self.reasoning.add(token), ""
        return "", self.content.add(token)

    def flush(self) -> tuple[str, str]:
        return self.reasoning.flush(), self.content.flush()
