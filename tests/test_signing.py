"""Signed manifests (qwen3export/signing.py): real Ed25519 keys on a small sealed folder (no engine build).
A good signature passes; another key, no signature, a manifest or file changed and resealed, a malformed
manifest.sig and a bad key file each fail with one line naming the problem and the fix."""

from __future__ import annotations

import base64
import json
import stat

import pytest

from qwen3export.artifact import MANIFEST, load_artifact, new_manifest, seal
from qwen3export.errors import ArtifactError, InputError
from qwen3export.manifest import VariantFields
from qwen3export.signing import (SIGNATURE_FILE, check_signature, generate_keypair, key_fingerprint,
                                 sign_artifact)
from qwen3export.spec import preset
from qwen3export.targets import get_target


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Two key pairs: "a" signs, "b" is someone else's."""
    folder = tmp_path_factory.mktemp("keys")
    out = {}
    for name in "ab":
        rec = generate_keypair(folder / f"{name}.pem", folder / f"{name}.pub.pem")
        out[name] = (folder / f"{name}.pem", folder / f"{name}.pub.pem", rec["fingerprint"])
    return out


def make_artifact(folder):
    folder.mkdir()
    (folder / "engine.bin").write_bytes(bytes(range(256)))
    spec = preset("tiny")
    manifest = new_manifest({"ref": {}, "spec": spec.to_dict(), "param_count": spec.param_count()},
                            get_target("cpu").to_dict(), "aoti", VariantFields(dtype="fp32"))
    manifest["engine"] = {"file": "engine.bin", "sampling_file": "engine.bin", "device": "cpu", "torch": "test"}
    seal(folder, manifest)
    return folder


def one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg and msg
    return msg


def test_keypair_files(tmp_path, keys):
    private, public, fp = keys["a"]
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    assert private.read_text().startswith("-----BEGIN PRIVATE KEY-----")  # PKCS8
    assert public.read_text().startswith("-----BEGIN PUBLIC KEY-----")  # SubjectPublicKeyInfo
    assert key_fingerprint(public) == key_fingerprint(private) == fp and len(fp) == 64
    for existing in ((private, tmp_path / "new.pub.pem"), (tmp_path / "new.pem", public)):
        before = existing[0].read_bytes() if existing[0].exists() else None
        with pytest.raises(InputError, match="already exists; keys are never overwritten") as e:
            generate_keypair(*existing)
        one_line(e)
        assert not (tmp_path / "new.pem").exists() and not (tmp_path / "new.pub.pem").exists()
        if before is not None:
            assert existing[0].read_bytes() == before


def test_good_signature_passes(tmp_path, keys):
    private, public, fp = keys["a"]
    folder = make_artifact(tmp_path / "art")
    written = sign_artifact(folder, private)
    assert written["algorithm"] == "ed25519" and written["public_key_fingerprint"] == fp
    assert json.loads((folder / SIGNATURE_FILE).read_text()) == written
    rec = check_signature(folder, public)
    assert rec["fingerprint"] == fp and rec["algorithm"] == "ed25519"
    assert rec["manifest_sha256"] == load_artifact(folder).manifest["manifest_sha256"]  # manifest.sig not a file entry


def test_unsigned_and_wrong_key(tmp_path, keys):
    folder = make_artifact(tmp_path / "art")
    with pytest.raises(ArtifactError, match=r"is unsigned \(no manifest.sig\); build with --sign KEY or drop --trust"
                       ) as e:
        check_signature(folder, keys["a"][1])
    one_line(e)
    sign_artifact(folder, keys["a"][0])
    with pytest.raises(ArtifactError, match=f"signed by key {keys['a'][2][:16]}..., not by the trusted key "
                                            f"{keys['b'][2][:16]}") as e:
        check_signature(folder, keys["b"][1])
    one_line(e)


def _edit_manifest(folder):
    """Change a value and reseal: manifest_sha256 is recomputed, so only the signature can catch it."""
    m = json.loads((folder / MANIFEST).read_text())
    m["dtype"] = "fp16"
    seal(folder, m)


def _edit_file(folder):
    """Flip a byte of a listed file and reseal: checksums match again, the signature does not."""
    data = bytearray((folder / "engine.bin").read_bytes())
    data[7] ^= 1
    (folder / "engine.bin").write_bytes(bytes(data))
    seal(folder, json.loads((folder / MANIFEST).read_text()))


def _reformat_manifest(folder):
    """The same JSON, other bytes (no reseal needed: the manifest's own hash is over canonical JSON)."""
    (folder / MANIFEST).write_text(json.dumps(json.loads((folder / MANIFEST).read_text()), indent=1))


@pytest.mark.parametrize("tamper", [_edit_manifest, _edit_file, _reformat_manifest])
def test_changed_after_signing_fails(tmp_path, keys, tamper):
    folder = make_artifact(tmp_path / "art")
    sign_artifact(folder, keys["a"][0])
    tamper(folder)
    load_artifact(folder)  # resealed: the checksums alone accept it
    with pytest.raises(ArtifactError, match=r"manifest.json does not match its signature in manifest.sig \(changed "
                                            r"after signing\); do not trust it") as e:
        check_signature(folder, keys["a"][1])
    one_line(e)


@pytest.mark.parametrize("edit,needle", [
    (lambda r: "{not json", r"is malformed \(not JSON\)"),
    (lambda r: "[1, 2]", r"is malformed \(not a JSON object\)"),
    (lambda r: {**r, "algorithm": "rsa"}, "names algorithm 'rsa'; only 'ed25519' is accepted"),
    (lambda r: {k: v for k, v in r.items() if k != "signature"}, "signature is not 64 base64-encoded bytes"),
    (lambda r: {**r, "signature": "@@@"}, "signature is not 64 base64-encoded bytes"),
    (lambda r: {**r, "signature": base64.b64encode(b"x" * 63).decode()}, "signature is not 64 base64-encoded"),
    (lambda r: {**r, "public_key_fingerprint": 7}, "public_key_fingerprint is not a sha256 hex digest"),
    (lambda r: {**r, "signature": base64.b64encode(bytes(64)).decode()}, "does not match its signature"),
])
def test_malformed_signature_file(tmp_path, keys, edit, needle):
    folder = make_artifact(tmp_path / "art")
    record = sign_artifact(folder, keys["a"][0])
    new = edit(dict(record))
    (folder / SIGNATURE_FILE).write_text(new if isinstance(new, str) else json.dumps(new))
    with pytest.raises(ArtifactError, match=needle) as e:
        check_signature(folder, keys["a"][1])
    assert "re-sign" in one_line(e) or "rebuild" in one_line(e)


def _ec_public_pem() -> bytes:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    return ec.generate_private_key(ec.SECP256R1()).public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


@pytest.mark.parametrize("content,needle", [
    (b"not a key at all", "is not a PEM public key"),
    (None, "is not a PEM public key"),  # the real key, truncated mid-body
    (b"", "is not a PEM public key"),
    ("private", "is a private key; --trust takes the public key"),
    ("ec", "not an Ed25519 public key"),
    ("missing", "cannot read public key file"),
    ("folder", "cannot read public key file"),
])
def test_bad_trust_key_is_one_line(tmp_path, keys, content, needle):
    folder = make_artifact(tmp_path / "art")
    sign_artifact(folder, keys["a"][0])
    key = tmp_path / "key.pem"
    if content is None:
        key.write_bytes(keys["a"][1].read_bytes()[:60])
    elif content == "private":
        key = keys["a"][0]
    elif content == "ec":
        key.write_bytes(_ec_public_pem())
    elif content == "folder":
        key.mkdir()
    elif content != "missing":
        key.write_bytes(content)
    with pytest.raises(InputError, match=needle) as e:
        check_signature(folder, key)
    one_line(e)


@pytest.mark.parametrize("content,needle", [
    (b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n", "is not a PEM private key"),
    ("public", "is a public key; --sign takes the private key"),
])
def test_bad_signing_key_is_one_line_and_writes_nothing(tmp_path, keys, content, needle):
    folder = make_artifact(tmp_path / "art")
    key = keys["a"][1] if content == "public" else tmp_path / "key.pem"
    if content != "public":
        key.write_bytes(content)
    with pytest.raises(InputError, match=needle) as e:
        sign_artifact(folder, key)
    one_line(e)
    assert not (folder / SIGNATURE_FILE).exists()


def test_damaged_artifact_is_never_signed(tmp_path, keys):
    folder = make_artifact(tmp_path / "art")
    (folder / "engine.bin").write_bytes(b"swapped")
    with pytest.raises(ArtifactError, match="engine.bin has 7 bytes"):
        sign_artifact(folder, keys["a"][0])
    assert not (folder / SIGNATURE_FILE).exists()
