"""Artifact folders: written atomically (temp folder, then rename), read back with every checksum verified.

Emit/verify stages write here; `run`, `verify` and `inspect` read from here. Layout:
`<out>/manifest.json` + engine files. The manifest lists every file with size and sha256 and carries
its own hash over its canonical JSON, so an edited or truncated manifest is caught as well.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from .errors import ArtifactError, InputError

SCHEMA = "qwen3export.artifact/1"
MANIFEST = "manifest.json"
_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def tool_versions() -> dict[str, str]:
    import platform

    out = {"python": platform.python_version()}
    for dist in ("qwen3export", "torch", "onnx", "onnxscript", "onnxruntime-gpu", "onnxruntime", "triton",
                 "optuna", "safetensors", "tokenizers", "numpy"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[dist] = metadata.version(dist)
    return out


@dataclass
class Artifact:
    """A verified artifact folder and its manifest."""

    path: Path
    manifest: dict[str, Any]

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    def save_manifest(self) -> None:
        """Rewrite manifest.json atomically (used by `verify` to update the parity report)."""
        write_manifest(self.path, self.manifest)


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, folder / MANIFEST)
    manifest.clear()
    manifest.update(body)


def file_entries(folder: Path) -> dict[str, dict[str, Any]]:
    """size and sha256 of every file in the folder except the manifest, by relative path."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp"):
            out[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def default_manifest(**fields: Any) -> dict[str, Any]:
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    return {"schema": SCHEMA, "created": now, "versions": tool_versions(), **fields}


@contextlib.contextmanager
def staging(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it is renamed to `out`, on any error removed.

    An existing `out` is refused unless force; with force it is replaced only after the new one is
    complete, so an interrupted build never leaves a folder that looks complete.
    """
    out = Path(out)
    if out.exists() and not force:
        raise InputError(f"output folder {out} already exists; pass --force to replace it or choose --out")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / MANIFEST).is_file():
            raise ArtifactError(f"internal: build of {out} finished without a manifest")
        if out.exists():
            old = out.parent / f".{out.name}.old-{os.getpid()}"
            os.rename(out, old)
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def seal(folder: Path, manifest: dict[str, Any]) -> None:
    """Record every file's size and checksum in the manifest and write it."""
    manifest["files"] = file_entries(folder)
    write_manifest(folder, manifest)


def load_artifact(path: str | Path, verify_checksums: bool = True) -> Artifact:
    """Open an artifact folder, checking schema, manifest hash, and each file's size and sha256."""
    folder = Path(path)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; build one with `qwen3export build`")
    if not mpath.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not a complete artifact; rebuild it")
    try:
        manifest = json.loads(mpath.read_text())
        assert isinstance(manifest, dict)
    except (json.JSONDecodeError, UnicodeDecodeError, AssertionError):
        raise ArtifactError(f"{mpath} is corrupt (not a JSON object); rebuild the artifact") from None
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{mpath} has schema {manifest.get('schema')!r}, expected {SCHEMA!r}; rebuild "
                            "the artifact with this version of qwen3export")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != manifest.get("manifest_sha256"):
        raise ArtifactError(f"{mpath} was modified after the build (its hash does not match); rebuild the "
                            "artifact")
    files = manifest.get("files") or {}
    if not files:
        raise ArtifactError(f"{mpath} lists no files; rebuild the artifact")
    if verify_checksums:
        for rel, entry in files.items():
            p = folder / rel
            if not p.is_file():
                raise ArtifactError(f"artifact file {rel} is missing from {folder}; rebuild the artifact")
            size = p.stat().st_size
            if size != entry["size"]:
                raise ArtifactError(f"artifact file {rel} has {size} bytes, the manifest says {entry['size']} "
                                    "(truncated or replaced); rebuild the artifact")
            if sha256_file(p) != entry["sha256"]:
                raise ArtifactError(f"artifact file {rel} does not match its sha256 in the manifest (tampered "
                                    "or corrupted); rebuild the artifact")
    return Artifact(folder, manifest)
