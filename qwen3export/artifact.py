"""Artifact folders: written atomically (temp folder, then rename), read back with every checksum verified.

Emit/verify stages write here; `run`, `verify` and `inspect` read from here. Layout:
`<out>/manifest.json` + engine files. The manifest lists every file with size and sha256 and carries
its own hash over its canonical JSON, so an edited or truncated manifest is caught as well.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import errno
import fcntl
import hashlib
import itertools
import json
import os
import platform
import shutil
import typing
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any, Iterator, Mapping

from .errors import ArtifactError, InputError
from .manifest import (SCHEMA, FileEntry, Manifest, ManifestShapeError, ModelRecord, TargetRecord, VariantFields,
                       check_manifest)

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
    manifest: Manifest

    def has_signature(self) -> bool:
        return (self.path / SIGNATURE_FILE).is_file()

    def has(self, name: str) -> bool:
        return name in (self.manifest.get("files") or {})

    def file(self, name: str) -> Path:
        """The path of a file the manifest lists (so checked: relative, inside the folder, checksummed). A name
        the manifest does not list (an engine.file pointing elsewhere) is refused."""
        if not self.has(name):
            raise ArtifactError(f"the manifest of {self.path} names {name!r}, which is not one of its listed files; "
                                "rebuild the artifact")
        return self.path / name

    def onnx_file(self, name: str) -> Path:
        """`file(name)` for an ONNX model, after checking that every external-data location it names is a listed
        file of this artifact (an ONNX file can point its weights at any path on the machine)."""
        import onnx  # lazy: onnx (0.1 s to import) for ONNX engines only; locks, staging, `inspect` stay light

        path = self.file(name)
        try:
            model = onnx.load(str(path), load_external_data=False)
        except Exception as e:  # protobuf's DecodeError and onnx's own errors share no base class
            raise ArtifactError(f"{name} is not a readable ONNX model ({type(e).__name__}); rebuild the artifact"
                                ) from None
        base = PurePosixPath(name).parent
        tensors = itertools.chain(_onnx_tensors(model.graph), *(_node_tensors(f.node) for f in model.functions))
        for tensor in tensors:
            if tensor.data_location != onnx.TensorProto.EXTERNAL:
                continue
            location = next((e.value for e in tensor.external_data if e.key == "location"), "")
            check_relative_path(self.path, location)
            rel = (base / location).as_posix()
            if not self.has(rel):
                raise ArtifactError(f"{name} reads tensor {tensor.name} from {location!r}, which is not a listed "
                                    "file of the artifact; rebuild the artifact")
        return path

    @property
    def backend(self) -> str:
        return self.manifest["backend"]

    def save_manifest(self) -> None:
        """Rewrite manifest.json atomically (used by `verify` to update the parity report)."""
        write_manifest(self.path, self.manifest)


def staged_artifact(folder: Path, manifest: Manifest) -> Artifact:
    """An artifact still being built (its staging folder, before `seal`): the files written so far are listed
    (without checksums) in a copy of the manifest, so `Artifact.file` can name them while the build verifies."""
    listed = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size} for p in sorted(Path(folder).rglob("*"))
              if p.is_file() and not p.is_symlink() and p.name not in (MANIFEST, MANIFEST + ".tmp", SIGNATURE_FILE)}
    staged = Manifest(**manifest)  # a copy: the build's own manifest gets checksums only at seal
    staged["files"] = typing.cast(dict[str, FileEntry], listed)  # no sha256 yet: nothing reads it before seal
    return Artifact(Path(folder), staged)


def write_manifest(folder: Path, manifest: Manifest) -> None:
    body: dict[str, Any] = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    body["manifest_sha256"] = hashlib.sha256(_canonical(body)).hexdigest()
    tmp = folder / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(body, indent=2, sort_keys=True, allow_nan=False) + "\n")
    os.replace(tmp, folder / MANIFEST)
    manifest["manifest_sha256"] = body["manifest_sha256"]


def file_entries(folder: Path) -> dict[str, FileEntry]:
    """size and sha256 of every file in the folder except the manifest, by relative path."""
    out: dict[str, FileEntry] = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in (MANIFEST, MANIFEST + ".tmp", SIGNATURE_FILE):
            out[p.relative_to(folder).as_posix()] = {"size": p.stat().st_size, "sha256": sha256_file(p)}
    return out


def new_manifest(model: ModelRecord, target: TargetRecord, backend: str, fields: VariantFields) -> Manifest:
    """The manifest skeleton: schema, provenance, what was built; the pipeline's stages add the rest."""
    now = _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()
    manifest = Manifest(schema=SCHEMA, created=now, versions=tool_versions(), model=model, target=target,
                        backend=backend, dtype=fields["dtype"])
    manifest.update(fields)
    return manifest


SIGNATURE_FILE = "manifest.sig"  # qwen3export.signing: a signature over manifest.json, outside the manifest
_PARTIAL, _OLD, _LOCK = ".partial-", ".old-", ".lock"


MAX_MANIFEST_BYTES = 64 << 20  # a 235B manifest is ~100 KB; anything near this is not one


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN / Infinity: strict JSON only


def read_json(path: Path, what: str, fix: str, max_bytes: int = MAX_MANIFEST_BYTES) -> Any:
    """A JSON file as a Python value, or a one-line ArtifactError: too large, not UTF-8, not JSON, nested too
    deep, a number Python refuses to parse (`[[[...` x 200,000 or a 5,000-digit integer)."""
    try:
        size = path.stat().st_size
        if size > max_bytes:
            raise ArtifactError(f"{path} is {size:,} bytes, larger than any {what} ({max_bytes:,}); {fix}")
        return json.loads(path.read_bytes(), parse_constant=_no_constant)
    except (ValueError, RecursionError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ArtifactError(f"{path} is not a valid {what} ({type(e).__name__}: {str(e)[:80]}); {fix}") from None


def replaceable_reason(folder: Path) -> str | None:
    """None when `--force` may replace `folder`: an empty folder, or an artifact of this schema holding exactly
    the files its manifest lists (its checksums are not checked: a damaged artifact may still be rebuilt over).
    Otherwise why not: a folder with user files in it is never deleted."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink() and not any(folder.iterdir()):
        return None
    try:
        manifest = read_json(folder / MANIFEST, "manifest", "")
    except (ArtifactError, OSError):
        return f"{folder} is not a qwen3export artifact (no readable manifest.json)"
    if not isinstance(manifest, dict) or manifest.get("schema") != SCHEMA:
        return f"{folder} is not a qwen3export artifact (its manifest.json does not name schema {SCHEMA})"
    files = manifest.get("files")
    try:
        check_layout(folder, files if isinstance(files, dict) else {})
    except ArtifactError as e:
        return f"{folder} is an artifact with other files in it ({e})"
    return None


def is_artifact_folder(folder: Path) -> bool:
    return replaceable_reason(folder) is None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_partials(out: Path) -> list[Path]:
    """`.NAME.partial-PID` / `.NAME.old-PID` folders beside `out` whose build process is gone (a killed build
    leaves them): removed. Only names of exactly that form are touched."""
    removed: list[Path] = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        for tag in (_PARTIAL, _OLD):
            prefix = f".{out.name}{tag}"
            if p.name.startswith(prefix) and p.name[len(prefix):].isdigit() and p.is_dir() and not p.is_symlink():
                pid = int(p.name[len(prefix):])
                if pid != os.getpid() and not _pid_alive(pid):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(p)
    return removed


def check_replaceable(out: Path, force: bool, check_lock: bool = True) -> None:
    """Before any work: an existing `out` needs --force, and --force replaces only a qwen3export artifact."""
    if out.is_symlink():
        raise InputError(f"output {out} is a symlink; give a real folder path (nothing was written)")
    if check_lock and _locked(out):
        raise InputError(f"another build is writing {out} now (lock {out.parent / f'.{out.name}{_LOCK}'}); wait "
                         "for it to finish or choose another --out")
    if out.exists() and not force:
        raise InputError(f"output folder {out} already exists; pass --force to replace it or choose --out")
    ancestor = out.parent
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise InputError(f"cannot create {out}: {ancestor} is a file, not a folder (errno {errno.ENOTDIR}, "
                         f"{os.strerror(errno.ENOTDIR)}); choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InputError(f"cannot create {out}: {ancestor} is not writable (errno {errno.EACCES}, "
                         f"{os.strerror(errno.EACCES)}); choose another --out or fix its permissions")
    here = Path.cwd().resolve()
    if out.resolve() == here or out.resolve() in here.parents:
        raise InputError(f"{out} is the current folder or one of its parents; name a new folder for the artifact")
    reason = replaceable_reason(out) if out.exists() else None
    if reason:
        raise InputError(f"{reason}: --force replaces only an artifact as it was built (or an empty folder); "
                         "choose another --out or move those files out yourself")


def _locked(out: Path) -> bool:
    """Whether a running build holds `out`'s lock (checked before any work; build_lock takes it for real)."""
    path = out.parent / f".{out.name}{_LOCK}"
    if path in _HELD:  # this build's own lock
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


_HELD: set[Path] = set()  # lock files this process holds
_SCOPES: list[contextlib.ExitStack] = []


@contextlib.contextmanager
def lock_scope() -> Iterator[None]:
    """The span of one build: locks taken with `hold_build_lock` inside it are released when it ends (and parent
    folders they had to create are removed again if still empty)."""
    with contextlib.ExitStack() as stack:
        _SCOPES.append(stack)
        try:
            yield
        finally:
            _SCOPES.pop()


def hold_build_lock(out: Path) -> None:
    """Take `out`'s build lock now, right after the build's checks and before its work, and hold it to the end of
    the enclosing lock_scope: two builds to one folder started together cannot both run."""
    if not _SCOPES:
        raise RuntimeError("hold_build_lock outside lock_scope")
    created = []
    for parent in reversed(Path(out).parents):
        if not parent.exists():
            created.append(parent)
    _SCOPES[-1].enter_context(build_lock(out))
    if created:
        _SCOPES[-1].callback(_remove_if_empty, created)


def _remove_if_empty(created: list[Path]) -> None:
    for folder in reversed(created):
        with contextlib.suppress(OSError):
            folder.rmdir()  # only an empty folder this build made


@contextlib.contextmanager
def build_lock(out: Path) -> Iterator[None]:
    """An exclusive lock on `.NAME.lock` beside `out`: a second build to the same folder is refused at once
    instead of silently replacing the first one's result. Re-entrant within this process (staging inside a build
    that already holds it). The lock file is removed on release; a build that opened it just before that holds
    a lock on the removed file, which the rename-into-place check (check_replaceable) still covers."""
    path = out.parent / f".{out.name}{_LOCK}"
    if path in _HELD:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise InputError(f"another build is writing {out} now (lock {path}); wait for it to finish or choose "
                             "another --out") from None
        _HELD.add(path)
        try:
            yield
        finally:
            _HELD.discard(path)
            with contextlib.suppress(OSError):
                os.unlink(path)
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def staging(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp folder beside `out`; on success it is renamed to `out`, on any error removed.

    An existing `out` is refused unless force, and with force unless it is a qwen3export artifact; it is
    replaced only after the new one is complete, so an interrupted build never leaves a folder that looks
    complete. A lock beside `out` refuses a concurrent build to the same folder; stale temp folders of killed
    builds are removed first. A signed build signs inside the staging folder (signing.sign_artifact), so it
    never appears unsigned.
    """
    out = Path(out)
    check_replaceable(out, force)
    with build_lock(out):
        remove_stale_partials(out)
        tmp = out.parent / f".{out.name}{_PARTIAL}{os.getpid()}"
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        try:
            yield tmp
            if not (tmp / MANIFEST).is_file():
                raise ArtifactError(f"internal: build of {out} finished without a manifest")
            check_replaceable(out, force, check_lock=False)  # it may have appeared while this build ran
            if out.exists():
                old = out.parent / f".{out.name}{_OLD}{os.getpid()}"
                os.rename(out, old)
                os.rename(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)


def seal(folder: Path, manifest: Manifest) -> None:
    """Record every file's size and checksum in the manifest and write it. The manifest must match its definition
    (manifest.py): a stage that writes a field of the wrong shape fails the build here, not a reader later."""
    manifest["files"] = file_entries(folder)
    try:
        check_manifest({**manifest, "manifest_sha256": ""})
    except ManifestShapeError as e:
        raise AssertionError(f"this build made a manifest that does not match qwen3export/manifest.py: {e} (a "
                             "new field is declared there first)") from None
    write_manifest(folder, manifest)


def _onnx_tensors(graph) -> Iterator[Any]:
    """Every TensorProto of an ONNX graph: initializers (dense and sparse), Constant/attribute tensors (dense and
    sparse), subgraphs (If branches)."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    yield from _node_tensors(graph.node)


def _node_tensors(nodes) -> Iterator[Any]:
    for node in nodes:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            for sparse in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                yield from (sparse.values, sparse.indices)
            for g in ([a.g] if a.HasField("g") else []) + list(a.graphs):
                yield from _onnx_tensors(g)


def check_relative_path(folder: Path, rel: Any) -> None:
    """A manifest path: a relative POSIX path with no `..`, resolving inside the folder."""
    pure = PurePosixPath(rel) if isinstance(rel, str) else None
    if (pure is None or not rel or pure.is_absolute() or "\\" in rel or ".." in pure.parts
            or PureWindowsPath(rel).drive or rel != pure.as_posix()):
        raise ArtifactError(f"the manifest of {folder} lists the path {rel!r}, which is not a plain relative path "
                            "inside the artifact; refusing to read it (rebuild the artifact)")


def _named_paths(manifest: Mapping[str, Any]) -> Iterator[tuple[str, Any]]:
    """The files a manifest names outside its `files` table (the engine and sampler a runner opens)."""
    for section, keys in (("engine", ("file", "sampling_file")), ("sampling", ("file",))):
        entry = manifest.get(section)
        if isinstance(entry, dict):
            for key in keys:
                if key in entry:
                    yield f"{section}.{key}", entry[key]


_OWN_FILES = (MANIFEST, SIGNATURE_FILE, MANIFEST + ".tmp", SIGNATURE_FILE + ".tmp")  # never listed, never run


def check_layout(folder: Path, files: dict[str, Any]) -> None:
    """Every listed path relative and inside `folder`; no symlink anywhere in the folder; no file on disk that
    the manifest does not list (manifest.json and manifest.sig aside). Run before any file is read."""
    root = folder.resolve()
    for rel in files:
        check_relative_path(folder, rel)
    listed = set(files)
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=False):
        base = Path(dirpath)
        for name in [*dirnames, *filenames]:
            p = base / name
            rel = p.relative_to(folder).as_posix()
            if p.is_symlink():
                target = os.path.realpath(p)
                leaves = not Path(target).is_relative_to(root)
                raise ArtifactError(f"artifact {folder} holds a symlink {rel} -> {os.readlink(p)}"
                                    f"{' (outside the artifact)' if leaves else ''}; artifacts hold plain files "
                                    "only: rebuild the artifact")
        for name in filenames:
            rel = (base / name).relative_to(folder).as_posix()
            if rel not in listed and rel not in _OWN_FILES:
                raise ArtifactError(f"artifact {folder} holds {rel}, which the manifest does not list (added after "
                                    "the build?); remove it or rebuild the artifact")


_HEX = frozenset("0123456789abcdef")


def check_manifest_types(mpath: Path, manifest: dict[str, Any]) -> Manifest:
    """The manifest's shape against its one definition (manifest.py), and the values every reader relies on
    (a listed file's size and sha256, the named paths); a resealed manifest of the wrong shape is refused here in
    one line, not as a KeyError later."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{mpath} is malformed ({what}); rebuild the artifact")

    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise bad("it lists no files")
    for rel, entry in files.items():
        if not (isinstance(entry, dict) and isinstance(entry.get("size"), int) and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str) and len(entry["sha256"]) == 64
                and set(entry["sha256"]) <= _HEX):
            raise bad(f"the entry of {str(rel)[:80]!r} is not {{size, sha256}}")
    for where, rel in _named_paths(manifest):
        if not isinstance(rel, str):
            raise bad(f"'{where}' is not a path")
    try:
        return check_manifest(manifest)
    except ManifestShapeError as e:
        raise bad(str(e)) from None


def load_artifact(path: str | Path, verify_checksums: bool = True) -> Artifact:
    """Open an artifact folder, checking schema, manifest hash, and each file's size and sha256."""
    folder = Path(path)
    mpath = folder / MANIFEST
    if not folder.is_dir():
        raise ArtifactError(f"artifact folder {folder} does not exist; build one with `qwen3export build`")
    if not mpath.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not a complete artifact; rebuild it")
    manifest = read_json(mpath, "manifest", "rebuild the artifact")
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{mpath} is corrupt (not a JSON object); rebuild the artifact")
    if manifest.get("schema") != SCHEMA:
        raise ArtifactError(f"{mpath} has schema {manifest.get('schema')!r}, expected {SCHEMA!r}; rebuild "
                            "the artifact with this version of qwen3export")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != manifest.get("manifest_sha256"):
        raise ArtifactError(f"{mpath} was modified after the build (its hash does not match); rebuild the "
                            "artifact")
    manifest = check_manifest_types(mpath, manifest)
    files = manifest["files"]
    check_layout(folder, files)
    for where, rel in _named_paths(manifest):
        if rel not in files:
            raise ArtifactError(f"the manifest of {folder} names {rel!r} as {where}, which is not one of its listed "
                                "files; refusing it (rebuild the artifact)")
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
