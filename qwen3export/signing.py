"""Signed manifests: an Ed25519 signature over an artifact's manifest.json, written beside it as manifest.sig
(`build --sign KEY`) and checked before anything is loaded (`run/verify/inspect --trust KEY`).

manifest.json lists every file's size and sha256 and carries its own hash, so a signature over its exact
bytes covers every file; what a signature adds is who: anyone can reseal a manifest, only the key's holder
can sign one. The crypto is `cryptography`'s Ed25519 (RFC 8032); nothing here is hand-made.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .artifact import MANIFEST, SIGNATURE_FILE, load_artifact
from .errors import ArtifactError, InputError

SIGNATURE_SCHEMA = "qwen3export.signature/1"
ALGORITHM = "ed25519"
# Domain separation: the signed message is this prefix + the exact bytes of manifest.json, so a signature made
# with the same key for anything else can never pass as an artifact signature.
SIGNED_PREFIX = b"qwen3export.artifact-manifest/1\n"
SIGNED = "b'qwen3export.artifact-manifest/1\\n' + the exact bytes of manifest.json"
_MAX_SMALL_FILE = 64 << 10  # a PEM key or a manifest.sig is well under 1 KiB; refuse to read megabytes
_KEY_FIX = "give the file written by `qwen3export keys`"


def _read_small(path: Path, what: str, error: type, fix: str) -> bytes:
    """A key or signature file's bytes; one-line `error` when it cannot be read or is absurdly large."""
    try:
        size = path.stat().st_size
        if size > _MAX_SMALL_FILE:
            raise error(f"{path} is {size} bytes, too large for a {what}; {fix}")
        return path.read_bytes()
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror or e}; {fix}") from None


def _raw_public(public_key) -> bytes:
    return public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def fingerprint_of(public_key) -> str:
    """sha256 hex of the 32 raw Ed25519 public key bytes (what manifest.sig names the signer by)."""
    return hashlib.sha256(_raw_public(public_key)).hexdigest()


def load_public_key(path: str | Path):
    """An Ed25519 public key from a PEM (SubjectPublicKeyInfo) file; one-line InputError otherwise."""
    path = Path(path)
    data = _read_small(path, "public key file", InputError, _KEY_FIX)
    if b"PRIVATE KEY" in data:
        raise InputError(f"{path} is a private key; --trust takes the public key (the .pub.pem written by "
                         "`qwen3export keys`), which is safe to share")
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError) as e:
        raise InputError(f"{path} is not a PEM public key ({str(e).split('.')[0]}); give the public key written by "
                         "`qwen3export keys`") from None
    except UnsupportedAlgorithm as e:  # a key type this cryptography build does not know
        raise InputError(f"{path} holds an unsupported key ({type(e).__name__}); give an Ed25519 public key "
                         "written by `qwen3export keys`") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InputError(f"{path} holds a {type(key).__name__.lstrip('_')}, not an Ed25519 public key; give the "
                         "public key written by `qwen3export keys`")
    return key


def load_private_key(path: str | Path):
    """An Ed25519 private key from an unencrypted PEM (PKCS8) file; one-line InputError otherwise."""
    path = Path(path)
    data = _read_small(path, "private key file", InputError, _KEY_FIX)
    if b"PRIVATE KEY" not in data and b"PUBLIC KEY" in data:
        raise InputError(f"{path} is a public key; --sign takes the private key written by `qwen3export keys`")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # "Password was not given but private key is encrypted"
        raise InputError(f"{path} is an encrypted private key; give an unencrypted Ed25519 key (e.g. from "
                         "`qwen3export keys`) and protect it with file permissions") from None
    except ValueError as e:
        raise InputError(f"{path} is not a PEM private key ({str(e).split('.')[0]}); give the private key written "
                         "by `qwen3export keys`") from None
    except UnsupportedAlgorithm as e:
        raise InputError(f"{path} holds an unsupported key ({type(e).__name__}); give an Ed25519 private key "
                         "written by `qwen3export keys`") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InputError(f"{path} holds a {type(key).__name__.lstrip('_')}, not an Ed25519 private key; make one "
                         "with `qwen3export keys`")
    return key


def key_fingerprint(path: str | Path) -> str:
    """The fingerprint of the public key in `path`, or of the public half of the private key in `path`."""
    data = _read_small(Path(path), "key file", InputError, _KEY_FIX)
    key = load_private_key(path).public_key() if b"PRIVATE KEY" in data else load_public_key(path)
    return fingerprint_of(key)


def _create(path: Path, data: bytes, mode: int) -> None:
    """Write a new file with exactly `mode` (O_EXCL: never over an existing file, not even in a race)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.fchmod(fd, mode)  # the umask can only narrow the mode; make it exact
        os.write(fd, data)
    finally:
        os.close(fd)


def generate_keypair(private_path: str | Path, public_path: str | Path) -> dict[str, Any]:
    """A new Ed25519 key pair: the private key as PEM PKCS8 (unencrypted, mode 0600), the public key as PEM
    SubjectPublicKeyInfo (mode 0644). Refuses to overwrite either file. -> {fingerprint, private, public}."""
    private_path, public_path = Path(private_path), Path(public_path)
    if private_path.resolve() == public_path.resolve():
        raise InputError(f"the private and public key paths are both {private_path}; give two file names")
    for p in (private_path, public_path):
        if p.exists() or p.is_symlink():
            raise InputError(f"{p} already exists; keys are never overwritten: choose another name or remove it "
                             "yourself")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        _create(private_path, private_pem, 0o600)
    except OSError as e:
        raise InputError(f"cannot write private key {private_path}: {e.strerror or e}; choose a writable path"
                         ) from None
    try:
        _create(public_path, public_pem, 0o644)
    except OSError as e:
        private_path.unlink()  # no half pair left behind
        raise InputError(f"cannot write public key {public_path}: {e.strerror or e}; choose a writable path"
                         ) from None
    return {"fingerprint": fingerprint_of(key.public_key()), "private": str(private_path),
            "public": str(public_path)}


def sign_artifact(folder: str | Path, private_key_path: str | Path, *, verify_checksums: bool = True
                  ) -> dict[str, Any]:
    """Sign `folder`'s manifest.json with the Ed25519 key in `private_key_path` and write manifest.sig.

    The artifact is loaded first (manifest hash, and with verify_checksums every file's size and sha256), so a
    damaged or altered artifact is never signed; a build that has just sealed may pass verify_checksums=False.
    -> the record written to manifest.sig.
    """
    folder = Path(folder)
    key = load_private_key(private_key_path)  # key errors before any artifact work
    load_artifact(folder, verify_checksums=verify_checksums)
    body = (folder / MANIFEST).read_bytes()
    record = {"schema": SIGNATURE_SCHEMA, "algorithm": ALGORITHM, "public_key_fingerprint": fingerprint_of(
              key.public_key()), "signed": SIGNED, "manifest_sha256": json.loads(body)["manifest_sha256"],
              "manifest_file_sha256": hashlib.sha256(body).hexdigest(),
              "signature": base64.b64encode(key.sign(SIGNED_PREFIX + body)).decode()}
    tmp = folder / (SIGNATURE_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, folder / SIGNATURE_FILE)
    return record


def _read_signature(folder: Path) -> tuple[dict[str, Any], bytes]:
    """manifest.sig's record and its 64 signature bytes; one-line ArtifactError when absent or malformed."""
    path = folder / SIGNATURE_FILE
    if not path.is_file():
        raise ArtifactError(f"{folder} is unsigned (no {SIGNATURE_FILE}); build with --sign KEY or drop --trust")
    fix = "re-sign the artifact with --sign KEY or rebuild it"
    data = _read_small(path, SIGNATURE_FILE, ArtifactError, fix)
    try:
        record = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        raise ArtifactError(f"{path} is malformed (not JSON); {fix}") from None
    if not isinstance(record, dict):
        raise ArtifactError(f"{path} is malformed (not a JSON object); {fix}")
    if record.get("algorithm") != ALGORITHM:
        raise ArtifactError(f"{path} names algorithm {record.get('algorithm')!r}; only {ALGORITHM!r} is accepted: "
                            f"{fix}")
    fp, sig = record.get("public_key_fingerprint"), record.get("signature")
    if not (isinstance(fp, str) and len(fp) == 64 and all(c in "0123456789abcdef" for c in fp)):
        raise ArtifactError(f"{path} is malformed (public_key_fingerprint is not a sha256 hex digest); {fix}")
    try:
        raw = base64.b64decode(sig, validate=True) if isinstance(sig, str) else b""
    except ValueError:
        raw = b""
    if len(raw) != 64:
        raise ArtifactError(f"{path} is malformed (signature is not 64 base64-encoded bytes); {fix}")
    return record, raw


def check_signature(folder: str | Path, public_key_path: str | Path) -> dict[str, Any]:
    """Check that manifest.sig is a valid Ed25519 signature of `folder`'s manifest.json by the key in
    `public_key_path`; one-line InputError (key file) or ArtifactError (artifact) otherwise.

    Checks the manifest's bytes only: the caller then loads the artifact (load_artifact checks every file
    against the manifest) and should compare that manifest's manifest_sha256 with the one returned here.
    -> {algorithm, fingerprint, manifest_sha256, signature_file}.
    """
    folder = Path(folder)
    key = load_public_key(public_key_path)  # key errors first: they are the user's flag, not the artifact
    trusted = fingerprint_of(key)
    mpath = folder / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{folder} has no {MANIFEST}: not an artifact folder; give an artifact built by "
                            "`qwen3export build`")
    record, raw = _read_signature(folder)
    if record["public_key_fingerprint"] != trusted:
        raise ArtifactError(f"{folder} is signed by key {record['public_key_fingerprint'][:16]}..., not by the trusted "
                            f"key {trusted[:16]}... ({public_key_path}); --trust the signer's public key or rebuild "
                            "with --sign YOUR_KEY")
    body = mpath.read_bytes()
    try:
        key.verify(raw, SIGNED_PREFIX + body)
    except InvalidSignature:
        raise ArtifactError(f"{mpath} does not match its signature in {SIGNATURE_FILE} (changed after signing); "
                            "do not trust it: rebuild and re-sign the artifact") from None
    try:
        manifest_sha256 = json.loads(body).get("manifest_sha256")
    except (ValueError, AttributeError):  # signed, yet not a JSON object: load_artifact refuses it next
        manifest_sha256 = None
    return {"algorithm": ALGORITHM, "fingerprint": trusted, "manifest_sha256": manifest_sha256,
            "signature_file": SIGNATURE_FILE}
