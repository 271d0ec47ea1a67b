"""The build's progress, as numbered stages with timings, and its debug dumps (`--dump-ir`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Callable

Progress = Callable[[str], None]


class Stages:
    """Numbered progress lines with timings: `[2/4] capture: torch.export ... done in 3.1 s`."""

    def __init__(self, total: int, progress: Progress):
        self.total, self.progress, self.n = total, progress, 0

    def run(self, name: str, what: str, fn: Callable[[], Any]) -> Any:
        self.n += 1
        self.progress(f"[{self.n}/{self.total}] {name}: {what} ...")
        t0 = time.perf_counter()
        out = fn()
        self.progress(f"[{self.n}/{self.total}] {name}: done in {time.perf_counter() - t0:.1f} s")
        return out


def dump_ir(folder: Path | None, name: str, text: str) -> None:
    """`--dump-ir DIR`: one phase's graph as text."""
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
