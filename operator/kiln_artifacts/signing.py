"""Signatures over artifact manifests: who published an artifact, and proof that nothing in its manifest changed.

The digest covers an artifact's files only, so metrics, lineage and annotations could be edited unnoticed. A
signature covers the whole manifest: Ed25519 over ``SIGNATURE_CONTEXT`` followed by the canonical JSON of the
manifest object without its ``signatures`` member (sorted keys, no spaces, UTF-8), as read from the store, so
fields this library does not know are covered too. The manifest carries its signatures in a top-level list
``[{"keyId", "algorithm": "ed25519", "publicKey", "signature"}]``; the embedded public key lets anyone check a
signature and see who made it (``signers``), and trust is whether that key is among the reader's trusted keys
(``verify_manifest``), whose own bytes are used to verify.

Keys are PEM files: the private key PKCS8 (``openssl genpkey -algorithm ed25519``), public keys
SubjectPublicKeyInfo (``openssl pkey -pubout``). ``cryptography`` is imported when a key is first used, so that
importing kiln_artifacts stays cheap for the programs that never sign.

CLI: ``python -m kiln_artifacts.signing keygen --out DIR`` and ``... verify URI --trusted-keys DIR``.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import (
    ArtifactError,
    InvalidManifestError,
    KeyFileError,
    SignatureMismatchError,
    UnsignedArtifactError,
    UntrustedKeyError,
)
from .manifest import MAX_MANIFEST_BYTES, Signature, parse_signatures, raw_key_id

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

SIGNATURE_CONTEXT = b"kiln-manifest-signature-v1\n"
PRIVATE_KEY_FILE = "private-key.pem"  # the key a Secret holds for the trainer and the compressor
PUBLIC_KEY_FILE = "public-key.pem"
_MAX_KEY_FILE = 64 << 10  # a PEM key is a few hundred bytes; anything far larger is the wrong file
_PEM_BEGIN = b"-----BEGIN "


def key_id(public: Ed25519PublicKey | bytes) -> str:
    """``"ed25519:"`` and the first 16 hex digits of the sha256 of the raw 32-byte public key."""
    if isinstance(public, bytes):
        if len(public) != 32:
            raise ValueError(f"public: a raw Ed25519 public key has 32 bytes, got {len(public)}")
        return raw_key_id(public)
    return raw_key_id(_raw_public(public))


def signed_bytes(manifest_doc: Mapping[str, Any]) -> bytes:
    """What a signature covers: the context line, then the manifest object without ``signatures`` as canonical
    JSON. Every other member counts, known to this library or not."""
    body = {k: v for k, v in manifest_doc.items() if k != "signatures"}
    return SIGNATURE_CONTEXT + json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


# ------------------------------------------------------------------------------------------------------- keys


def _raw_public(public: Ed25519PublicKey) -> bytes:
    from cryptography.hazmat.primitives import serialization

    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def _describe(key: object) -> str:
    """A key's type in words, for the message that refuses it."""
    from cryptography.hazmat.primitives.asymmetric import dsa, ec, ed448, rsa, x448, x25519

    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"an RSA-{key.key_size} key"
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return f"an EC key on {key.curve.name}"
    if isinstance(key, ed448.Ed448PrivateKey | ed448.Ed448PublicKey):
        return "an Ed448 key"
    if isinstance(key, x25519.X25519PrivateKey | x25519.X25519PublicKey | x448.X448PrivateKey | x448.X448PublicKey):
        return "an X25519/X448 (key agreement) key"
    if isinstance(key, dsa.DSAPrivateKey | dsa.DSAPublicKey):
        return "a DSA key"
    return f"a {type(key).__name__}"


def _read_key_file(path: Path, where: str) -> bytes:
    try:
        size = path.stat().st_size
        if size > _MAX_KEY_FILE:
            raise KeyFileError(f"{where}: {size} bytes is not a PEM key (at most {_MAX_KEY_FILE} bytes)")
        return path.read_bytes()
    except OSError as e:
        raise KeyFileError(f"{where}: cannot read: {e.strerror or e}") from None


def _one_pem_block(pem: bytes, where: str, kind: str) -> None:
    blocks = pem.count(_PEM_BEGIN)
    if blocks == 0:
        raise KeyFileError(f"{where}: not PEM (no '-----BEGIN' line); {kind}")
    if blocks > 1:
        raise KeyFileError(f"{where}: holds {blocks} PEM blocks; one key per file ({kind})")


def load_private_key(pem: bytes, *, where: str = "private key") -> Ed25519PrivateKey:
    """An Ed25519 private key from PEM (PKCS8, unencrypted); KeyFileError names ``where`` and the rule."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    rule = "expected an unencrypted Ed25519 private key in PKCS8 PEM (openssl genpkey -algorithm ed25519)"
    _one_pem_block(pem, where, rule)
    if b"PUBLIC KEY-----" in pem:
        raise KeyFileError(f"{where}: holds a public key; signing needs the private key ({rule})")
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except TypeError:  # cryptography's way of saying the key is encrypted
        raise KeyFileError(f"{where}: the private key is encrypted; {rule}") from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{where}: not a usable PEM private key ({e}); {rule}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise KeyFileError(f"{where}: {_describe(key)}; Kiln signs with Ed25519 only ({rule})")
    return key


def load_public_key(pem: bytes, *, where: str = "public key") -> Ed25519PublicKey:
    """An Ed25519 public key from PEM (SubjectPublicKeyInfo); KeyFileError names ``where`` and the rule."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    rule = "expected an Ed25519 public key in SubjectPublicKeyInfo PEM (openssl pkey -pubout)"
    _one_pem_block(pem, where, rule)
    if b"PRIVATE KEY-----" in pem:
        # A private key in a trust set (a ConfigMap) would be readable by anyone who can read the ConfigMap.
        raise KeyFileError(f"{where}: holds a private key; trusted keys are public keys only ({rule})")
    try:
        key = serialization.load_pem_public_key(pem)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise KeyFileError(f"{where}: not a usable PEM public key ({e}); {rule}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise KeyFileError(f"{where}: {_describe(key)}; Kiln verifies Ed25519 signatures only ({rule})")
    return key


class Signer:
    """Signs manifests with one Ed25519 private key."""

    def __init__(self, private_key: Ed25519PrivateKey) -> None:
        self._key = private_key
        self.public_key: bytes = _raw_public(private_key.public_key())  # raw 32 bytes
        self.key_id: str = raw_key_id(self.public_key)

    def __repr__(self) -> str:
        return f"Signer({self.key_id})"

    @classmethod
    def from_pem(cls, pem: bytes, *, where: str = "private key") -> Signer:
        return cls(load_private_key(pem, where=where))

    @classmethod
    def from_file(cls, path: str | os.PathLike[str], *, what: str = "signing key") -> Signer:
        """``what`` names the key's source in errors (the flag or variable that gave ``path``)."""
        path = Path(path)
        return cls.from_pem(_read_key_file(path, f"{what} {path}"), where=f"{what} {path}")

    @classmethod
    def generate(cls) -> Signer:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def signature(self, manifest_doc: Mapping[str, Any]) -> Signature:
        """This key's signature over ``manifest_doc`` (its ``signatures`` member is not covered)."""
        return Signature(self.key_id, self.public_key, self._key.sign(signed_bytes(manifest_doc)))

    def sign(self, manifest_doc: Mapping[str, Any]) -> dict[str, Any]:
        """A copy of ``manifest_doc`` with this key's signature in ``signatures``: added beside the signatures of
        other keys (signing with two keys during a rotation), replacing an older one by this key."""
        doc = copy.deepcopy(dict(manifest_doc))
        kept = [
            s for s in doc.get("signatures") or [] if not (isinstance(s, Mapping) and s.get("keyId") == self.key_id)
        ]
        doc["signatures"] = [*kept, self.signature(doc).to_dict()]
        return doc


@dataclass(frozen=True)
class TrustedKeys:
    """The public keys a reader trusts, by key id (raw 32-byte keys); never empty."""

    keys: Mapping[str, bytes]
    source: str  # where they came from, for messages

    def __post_init__(self) -> None:
        if not self.keys:
            raise KeyFileError(f"trusted keys {self.source}: no keys; at least one Ed25519 public key is required")

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(sorted(self.keys))

    def __contains__(self, key: object) -> bool:
        return key in self.keys

    @classmethod
    def from_pem(cls, *pems: bytes, source: str = "(PEM)") -> TrustedKeys:
        keys = {}
        for i, pem in enumerate(pems):
            raw = _raw_public(load_public_key(pem, where=f"trusted key {source}[{i}]"))
            keys[raw_key_id(raw)] = raw
        return cls(keys, source)

    @classmethod
    def from_dir(cls, path: str | os.PathLike[str], *, what: str = "trusted keys") -> TrustedKeys:
        """Every entry of ``path`` is one PEM public key, as a ConfigMap or Secret volume mounts them: names starting
        with "." (the kubelet's ``..data`` and ``..<timestamp>`` folders, dotfiles) are skipped, and the visible
        entries, symlinks into ``..data``, are followed. ``what`` names the source in errors (a flag, a variable)."""
        folder = Path(path)
        try:
            keys = _keys_in(folder)
        except KeyFileError as e:
            raise KeyFileError(f"{what} {folder}: {e}") from None
        return cls(keys, str(folder))


def _keys_in(folder: Path) -> dict[str, bytes]:
    """The keys of a trusted-keys directory by id; KeyFileError says what is wrong, relative to ``folder``."""
    if not folder.is_dir():
        why = "does not exist" if not folder.exists() else "is not a directory"
        raise KeyFileError(f"{why}; expected a directory of PEM public keys, one per file")
    keys = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if not entry.is_file():
            raise KeyFileError(f"{entry.name}: not a regular file; the directory holds one PEM key per file")
        raw = _raw_public(load_public_key(_read_key_file(entry, entry.name), where=entry.name))
        keys[raw_key_id(raw)] = raw
    if not keys:
        raise KeyFileError("holds no keys; at least one Ed25519 public key (PEM) is required")
    return keys


def trusted_keys_option(text: str) -> str:
    """The parser of a program's --trusted-keys flag or variable: the directory is loaded at once, so that a bad
    key is a usage error at start; the ValueError says what is wrong (the caller names the flag and the value)."""
    if not text:
        raise ValueError("must not be empty")
    try:
        _keys_in(Path(text))
    except KeyFileError as e:
        raise ValueError(str(e)) from None
    return text


# -------------------------------------------------------------------------------------------------- verifying


def manifest_object(raw: bytes | str | Mapping[str, Any], where: str) -> Mapping[str, Any]:
    """The manifest as a JSON object, from its stored bytes (or an object already decoded)."""
    if isinstance(raw, Mapping):
        return raw
    if len(raw) > MAX_MANIFEST_BYTES:
        raise InvalidManifestError(where, [f"larger than {MAX_MANIFEST_BYTES} bytes"])
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidManifestError(where, [f"not valid JSON ({e})"]) from None
    if not isinstance(doc, Mapping):
        raise InvalidManifestError(where, [f"must be a JSON object, got {type(doc).__name__}"])
    return doc


def _verifies(public_key: bytes, signature: bytes, message: bytes) -> bool:
    from cryptography.exceptions import InvalidSignature
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, message)
    except InvalidSignature:
        return False
    return True


def verify_manifest(raw: bytes | str | Mapping[str, Any], trusted: TrustedKeys, *, where: str) -> str:
    """Check the manifest's signatures against ``trusted`` and return the id of the trusted key that verified.

    ``raw`` is the manifest as stored (bytes, or the object json.loads made of them). One valid signature by a
    trusted key suffices, but a signature by a trusted key that does not verify is an error whatever else is there:
    the manifest was changed after that key signed it. ``where`` (the artifact's URI) names it in every error:
    UnsignedArtifactError, SignatureMismatchError (also for a malformed ``signatures`` member, naming the field:
    no signer writes one, so it was edited), UntrustedKeyError; InvalidManifestError when it is not JSON."""
    doc = manifest_object(raw, where)
    try:
        signatures = parse_signatures(doc, where=where)
    except InvalidManifestError as e:
        raise SignatureMismatchError(
            where, f"signature invalid: the signatures cannot be checked: {'; '.join(e.problems)}"
        ) from None
    if not signatures:
        raise UnsignedArtifactError(
            where, f"unsigned: the manifest has no signatures; a signature by one of {_ids(trusted.ids)} is required"
        )
    message = signed_bytes(doc)
    verified: str | None = None
    for sig in signatures:
        trusted_key = trusted.keys.get(sig.key_id)
        if trusted_key is None:
            continue
        if trusted_key != sig.public_key or not _verifies(trusted_key, sig.signature, message):
            raise SignatureMismatchError(
                where,
                f"signature invalid: the signature by trusted key {sig.key_id} does not verify; the manifest was "
                "changed after it was signed",
            )
        verified = verified or sig.key_id
    if verified is None:
        raise UntrustedKeyError(
            where,
            f"untrusted key: signed by {_ids(s.key_id for s in signatures)}, none of them trusted "
            f"(trusted: {_ids(trusted.ids)})",
        )
    return verified


def signers(raw: bytes | str | Mapping[str, Any], *, where: str = "") -> list[str]:
    """The key ids whose signatures verify against their own embedded public key, trusting nobody: who signed
    this manifest as it is now. A signature that no longer verifies (the manifest changed) is left out."""
    doc = manifest_object(raw, where)
    message = signed_bytes(doc)
    return [s.key_id for s in parse_signatures(doc, where=where) if _verifies(s.public_key, s.signature, message)]


def _ids(ids: Iterable[str]) -> str:
    return ", ".join(ids)


# ------------------------------------------------------------------------------------------------------- CLI


def _keygen(out: Path) -> int:
    signer = Signer.generate()
    out.mkdir(parents=True, exist_ok=True)
    private = out / PRIVATE_KEY_FILE
    # Created with mode 0600 in one step: the private key is never readable by others, not even briefly.
    fd = os.open(private, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(signer.private_pem())
    (out / PUBLIC_KEY_FILE).write_bytes(signer.public_pem())
    print(signer.key_id)
    return 0


def _verify(uri: str, trusted_dir: str) -> int:
    from .load import read_manifest_bytes

    trusted = TrustedKeys.from_dir(trusted_dir)
    raw, where = read_manifest_bytes(uri)
    print(verify_manifest(raw, trusted, where=where))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m kiln_artifacts.signing", description="Sign and verify Kiln artifacts (docs/artifacts.md)."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    keygen = sub.add_parser("keygen", help="make an Ed25519 key pair; prints its key id")
    keygen.add_argument("--out", required=True, help=f"folder for {PRIVATE_KEY_FILE} (mode 0600) and {PUBLIC_KEY_FILE}")
    verify = sub.add_parser("verify", help="check an artifact's signature; prints the trusted key id that verified")
    verify.add_argument("uri", help="the artifact (file://, pvc://, s3://)")
    verify.add_argument("--trusted-keys", required=True, help="a directory of PEM public keys, one per file")
    args = parser.parse_args(argv)
    try:
        if args.command == "keygen":
            private = Path(args.out) / PRIVATE_KEY_FILE
            if private.exists():
                print(f"keygen: {private}: exists; a key is never overwritten", file=sys.stderr)
                return 2
            return _keygen(Path(args.out))
        return _verify(args.uri, args.trusted_keys)
    except (ArtifactError, OSError) as e:
        print(f"{args.command}: {type(e).__name__}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
