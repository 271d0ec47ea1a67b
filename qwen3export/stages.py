"""The build's progress, as numbered stages with timings, and its debug dumps (`--dump-ir`)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:  # types only: the manifest's definition, and the plan's output (options imports torch)
    from .manifest import Manifest, VariantFields
    from .options import BuildPlan, Output

Progress = Callable[[str], None]


class VariantSteps(Protocol):
    """What a build variant (in_memory.InMemorySteps, streaming.StreamedSteps, parallel_build.ShardedSteps) gives
    the pipeline: how programs are obtained (prepare) and how weights reach each artifact (emit, verify)."""

    gated: str  # what parity_gate names when the check fails ("engine", "streamed engine", ...)

    def __init__(self, plan: "BuildPlan") -> None: ...

    def stage_count(self) -> int: ...

    def prepare(self, stages: "Stages", progress: Progress) -> None: ...

    def manifest_fields(self, output: "Output") -> "VariantFields": ...

    def emit(self, stages: "Stages", output: "Output", folder: Path, manifest: "Manifest", sampling_ep: Any) -> None: ...

    def verify(self, stages: "Stages", output: "Output", folder: Path, manifest: "Manifest",
               progress: Progress) -> dict[str, Any]: ...


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
