"""The artifact manifest: schema, validation (every problem named by its field) and the artifact digest.

An artifact is a directory holding its files and ``kiln-manifest.json``. The artifact digest is computed from
the file list alone (path, size, sha256 of each file), so two artifacts with the same bytes have the same digest
whatever their metrics or lineage say. The optional ``signatures`` cover the whole manifest instead; this module
checks their form only, ``kiln_artifacts.signing`` makes and verifies them.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from .errors import InvalidManifestError, InvalidNameError

MANIFEST_NAME = "kiln-manifest.json"
MANIFEST_VERSION = 1
RESERVED_PREFIX = ".kiln"  # staging folders and lock markers; never artifact files
MAX_MANIFEST_BYTES = 16 << 20
KINDS = ("model", "checkpoint", "dataset")
# Well-known values; others are accepted when they are tokens (see _TOKEN), so new formats need no release.
KNOWN_FORMATS = ("hf-transformers", "sentence-transformers", "onnx", "safetensors", "pytorch", "idx")

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TOKEN = re.compile(r"^[a-z0-9][a-z0-9.+-]{0,62}$")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:/-]{0,127}$")
_K8S_KIND = re.compile(r"^[A-Z][A-Za-z0-9]{0,62}$")
_K8S_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f\\]")
_DIGEST_PREAMBLE = b"kiln-artifact-v1\n"
SIGNATURE_ALGORITHM = "ed25519"
MAX_SIGNATURES = 16  # rotation needs two or three; a bound keeps a hostile manifest from costing many verifications
KEY_ID = re.compile(r"^ed25519:[0-9a-f]{16}$")
_SIGNATURE_FIELDS = ("keyId", "algorithm", "publicKey", "signature")


def check_relative_path(path: object, what: str = "path") -> str:
    """A file path inside an artifact: relative POSIX, no '.', '..' or empty segments, not reserved."""
    if not isinstance(path, str) or not path:
        raise InvalidNameError(f"{what}: must be a non-empty string")
    if path.startswith("/"):
        raise InvalidNameError(f'{what} "{path}": must be relative (no leading "/")')
    if _CONTROL.search(path):
        raise InvalidNameError(f"{what} {path!r}: must not contain control characters or backslashes")
    if len(path.encode()) > 900:
        raise InvalidNameError(f'{what} "{path[:80]}...": longer than 900 bytes')
    for segment in path.split("/"):
        if segment in ("", ".", ".."):
            raise InvalidNameError(f"{what} \"{path}\": must not contain empty, '.' or '..' segments")
        if len(segment.encode()) > 255:
            raise InvalidNameError(f'{what} "{path}": segment longer than 255 bytes')
    top = path.split("/", 1)[0]
    if path == MANIFEST_NAME or top.startswith(RESERVED_PREFIX):
        raise InvalidNameError(
            f'{what} "{path}": {MANIFEST_NAME} and names starting with "{RESERVED_PREFIX}" are reserved'
        )
    return path


@dataclass(frozen=True)
class FileEntry:
    path: str
    size: int
    sha256: str  # hex

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "size": self.size, "sha256": self.sha256}


def compute_digest(files: Iterable[FileEntry]) -> str:
    """The artifact digest: sha256 over the sorted lines "<sha256> <size> <path>" of its files."""
    h = hashlib.sha256(_DIGEST_PREAMBLE)
    for entry in sorted(files, key=lambda f: f.path):
        h.update(f"{entry.sha256} {entry.size} {entry.path}\n".encode())
    return "sha256:" + h.hexdigest()


def raw_key_id(public_key: bytes) -> str:
    """The id of a raw 32-byte Ed25519 public key: "ed25519:" and the first 16 hex digits of its sha256."""
    return f"{SIGNATURE_ALGORITHM}:" + hashlib.sha256(public_key).hexdigest()[:16]


@dataclass(frozen=True)
class Signature:
    """One signature over the manifest (kiln_artifacts.signing): who signed (the key id and the embedded raw public
    key) and the 64-byte Ed25519 signature."""

    key_id: str
    public_key: bytes
    signature: bytes
    algorithm: str = SIGNATURE_ALGORITHM

    def to_dict(self) -> dict[str, Any]:
        return {
            "keyId": self.key_id,
            "algorithm": self.algorithm,
            "publicKey": base64.b64encode(self.public_key).decode(),
            "signature": base64.b64encode(self.signature).decode(),
        }


@dataclass(frozen=True)
class Producer:
    """The custom resource that produced the artifact."""

    kind: str
    namespace: str
    name: str
    uid: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "namespace": self.namespace, "name": self.name, "uid": self.uid}


@dataclass(frozen=True)
class DatasetRef:
    uri: str
    revision: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"uri": self.uri, "revision": self.revision}


@dataclass(frozen=True)
class Lineage:
    """Where an artifact came from: enough to audit it and to re-run what produced it."""

    producer: Producer | None = None
    image: str | None = None
    parents: tuple[str, ...] = ()  # digests of the artifacts it was made from (base model, teacher, ...)
    dataset: DatasetRef | None = None
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    libraries: Mapping[str, str] = field(default_factory=dict)
    source: str | None = None  # for imported artifacts: where the bytes came from (hf://..., pypi:...)

    def to_dict(self) -> dict[str, Any]:
        return {
            "producer": self.producer.to_dict() if self.producer else None,
            "image": self.image,
            "parents": list(self.parents),
            "dataset": self.dataset.to_dict() if self.dataset else None,
            "hyperparameters": dict(self.hyperparameters),
            "libraries": dict(self.libraries),
            "source": self.source,
        }


@dataclass(frozen=True)
class Manifest:
    kind: str
    format: str
    files: tuple[FileEntry, ...]
    digest: str
    created_at: datetime
    task: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    lineage: Lineage = field(default_factory=Lineage)
    annotations: Mapping[str, str] = field(default_factory=dict)
    signatures: tuple[Signature, ...] = ()

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, path: str) -> FileEntry:
        for entry in self.files:
            if entry.path == path:
                return entry
        raise KeyError(path)

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "manifestVersion": MANIFEST_VERSION,
            "kind": self.kind,
            "digest": self.digest,
            "format": self.format,
            "task": self.task,
            "createdAt": format_time(self.created_at),
            "files": [f.to_dict() for f in sorted(self.files, key=lambda f: f.path)],
            "metrics": dict(self.metrics),
            "lineage": self.lineage.to_dict(),
            "annotations": dict(self.annotations),
        }
        if self.signatures:  # absent when unsigned, so unsigned manifests read as they always have
            doc["signatures"] = [sig.to_dict() for sig in self.signatures]
        return doc

    def to_json(self) -> bytes:
        return manifest_json(self.to_dict())

    @classmethod
    def build(
        cls,
        files: Iterable[FileEntry],
        *,
        kind: str,
        format: str,
        task: str | None = None,
        metrics: Mapping[str, float] | None = None,
        lineage: Lineage | Mapping[str, Any] | None = None,
        annotations: Mapping[str, str] | None = None,
        created_at: datetime | None = None,
    ) -> Manifest:
        """A manifest for ``files``, validated exactly as a manifest read from a store would be."""
        entries = tuple(sorted(files, key=lambda f: f.path))
        if isinstance(lineage, Lineage):
            lineage_dict: Any = lineage.to_dict()
        else:
            lineage_dict = dict(lineage or {})
        data = {
            "manifestVersion": MANIFEST_VERSION,
            "kind": kind,
            "digest": compute_digest(entries),
            "format": format,
            "task": task,
            "createdAt": format_time(created_at or datetime.now(UTC)),
            "files": [f.to_dict() for f in entries],
            "metrics": dict(metrics or {}),
            "lineage": lineage_dict,
            "annotations": dict(annotations or {}),
        }
        return parse_manifest(data, where="(new)")


def manifest_json(doc: Mapping[str, Any]) -> bytes:
    """The bytes of ``kiln-manifest.json`` for a manifest object (signed or not)."""
    return (json.dumps(doc, indent=2, allow_nan=False, ensure_ascii=False) + "\n").encode()


def format_time(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError("timestamps must be timezone-aware")
    return t.astimezone(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def parse_time(value: str) -> datetime:
    t = datetime.fromisoformat(value)
    if t.tzinfo is None:
        raise ValueError("no timezone")
    return t.astimezone(UTC)


def parse_manifest(data: bytes | str | Mapping[str, Any], *, where: str = "") -> Manifest:
    """Validate and parse a manifest; InvalidManifestError lists every problem as '<field>: <rule>'."""
    if isinstance(data, bytes | str):
        if len(data) > MAX_MANIFEST_BYTES:
            raise InvalidManifestError(where, [f"larger than {MAX_MANIFEST_BYTES} bytes"])
        try:
            data = json.loads(data)
        except (ValueError, UnicodeDecodeError) as e:
            raise InvalidManifestError(where, [f"not valid JSON ({e})"]) from None
    if not isinstance(data, Mapping):
        raise InvalidManifestError(where, [f"must be a JSON object, got {type(data).__name__}"])
    v = _Validator()
    version = data.get("manifestVersion")
    if version != MANIFEST_VERSION:
        shown = "missing" if version is None else f"unsupported version {version!r}"
        raise InvalidManifestError(where, [f"manifestVersion: {shown} (this library reads {MANIFEST_VERSION})"])
    known = {"manifestVersion", "kind", "digest", "format", "task", "createdAt", "files", "metrics", "lineage"}
    known.update(("annotations", "signatures"))
    for key in data:
        if key not in known:
            v.problem(str(key), f"unknown field (manifest version {MANIFEST_VERSION} has: {', '.join(sorted(known))})")

    kind = v.required_str(data, "kind")
    if kind is not None and kind not in KINDS:
        v.problem("kind", f'"{kind}" is not one of {", ".join(KINDS)}')
    fmt = v.required_str(data, "format")
    if fmt is not None and not _TOKEN.match(fmt):
        v.problem("format", f'"{fmt}" must be a lowercase token (letters, digits, ".", "+", "-"), e.g. hf-transformers')
    task = data.get("task")
    if task is not None and (not isinstance(task, str) or not _TOKEN.match(task)):
        v.problem("task", f"{task!r} must be null or a lowercase token, e.g. text-classification")
    created = v.required_str(data, "createdAt")
    created_at = datetime.fromtimestamp(0, UTC)
    if created is not None:
        try:
            created_at = parse_time(created)
        except ValueError:
            v.problem(
                "createdAt", f'"{created}" must be an RFC 3339 timestamp with a timezone, e.g. 2026-01-02T03:04:05Z'
            )

    files = _files(v, data.get("files"))
    digest = v.required_str(data, "digest")
    if digest is not None:
        if not _DIGEST.match(digest):
            v.problem("digest", f'"{digest}" must be "sha256:" followed by 64 lowercase hex characters')
        elif files is not None and not v.problems:
            computed = compute_digest(files)
            if computed != digest:
                v.problem("digest", f"does not match the file list (computed {computed})")

    metrics = _metrics(v, data.get("metrics", {}))
    lineage = _lineage(v, data.get("lineage", {}))
    annotations = data.get("annotations", {})
    if not isinstance(annotations, Mapping) or not all(
        isinstance(k, str) and _KEY.match(k) and isinstance(val, str) for k, val in annotations.items()
    ):
        v.problem("annotations", "must be an object of string keys (letters, digits, '_.:/-') to string values")
        annotations = {}
    signatures = _signatures(v, data.get("signatures", []))
    if v.problems:
        raise InvalidManifestError(where, v.problems)
    assert kind is not None
    assert fmt is not None
    assert digest is not None
    assert files is not None
    return Manifest(
        kind=kind,
        format=fmt,
        files=tuple(files),
        digest=digest,
        created_at=created_at,
        task=task,
        metrics=metrics,
        lineage=lineage,
        annotations=dict(annotations),
        signatures=signatures,
    )


def parse_signatures(data: Mapping[str, Any], *, where: str = "") -> tuple[Signature, ...]:
    """The ``signatures`` of a manifest object, checked for form only (not verified); InvalidManifestError names
    each problem as ``signatures[i].<field>: <rule>``."""
    v = _Validator()
    signatures = _signatures(v, data.get("signatures", []))
    if v.problems:
        raise InvalidManifestError(where, v.problems)
    return signatures


class _Validator:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def problem(self, field_name: str, rule: str) -> None:
        self.problems.append(f"{field_name}: {rule}")

    def required_str(self, data: Mapping[str, Any], key: str) -> str | None:
        value = data.get(key)
        if value is None:
            self.problem(key, "required")
            return None
        if not isinstance(value, str) or not value:
            self.problem(key, f"must be a non-empty string, got {value!r}")
            return None
        return value


def _files(v: _Validator, raw: object) -> list[FileEntry] | None:
    if not isinstance(raw, list):
        v.problem("files", "required: a list of {path, size, sha256}")
        return None
    if not raw:
        v.problem("files", "must list at least one file")
        return None
    out: list[FileEntry] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        at = f"files[{i}]"
        if not isinstance(item, Mapping):
            v.problem(at, "must be an object {path, size, sha256}")
            continue
        extra = set(item) - {"path", "size", "sha256"}
        if extra:
            v.problem(at, f"unknown field(s) {', '.join(sorted(map(str, extra)))}")
        path, size, sha = item.get("path"), item.get("size"), item.get("sha256")
        ok = True
        try:
            check_relative_path(path, f"{at}.path")
        except InvalidNameError as e:
            v.problems.append(str(e))
            ok = False
        else:
            assert isinstance(path, str)
            if path in seen:
                v.problem(f"{at}.path", f'"{path}" is listed twice')
                ok = False
            seen.add(path)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            v.problem(f"{at}.size", f"must be a non-negative integer, got {size!r}")
            ok = False
        if not isinstance(sha, str) or not _HEX64.match(sha):
            v.problem(f"{at}.sha256", f"must be 64 lowercase hex characters, got {sha!r}")
            ok = False
        if ok:
            out.append(FileEntry(str(path), int(size), str(sha)))  # type: ignore[arg-type]
    # A file and a folder of the same name cannot both exist on a filesystem.
    for path in seen:
        if any(other.startswith(path + "/") for other in seen):
            v.problem("files", f'"{path}" is both a file and a folder')
    return out


def _base64(value: object, size: int) -> bytes | None:
    if not isinstance(value, str):
        return None
    try:
        decoded = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return decoded if len(decoded) == size else None


def _shown(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 100 else text[:97] + "..."


def _signatures(v: _Validator, raw: object) -> tuple[Signature, ...]:
    if not isinstance(raw, list):
        v.problem("signatures", "must be a list of {keyId, algorithm, publicKey, signature}")
        return ()
    if len(raw) > MAX_SIGNATURES:
        v.problem("signatures", f"at most {MAX_SIGNATURES} signatures, got {len(raw)}")
        return ()
    out: list[Signature] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        at = f"signatures[{i}]"
        if not isinstance(item, Mapping):
            v.problem(at, "must be an object {keyId, algorithm, publicKey, signature}")
            continue
        extra = set(item) - set(_SIGNATURE_FIELDS)
        if extra:
            v.problem(at, f"unknown field(s) {', '.join(sorted(map(str, extra)))}")
        key_id, algorithm = item.get("keyId"), item.get("algorithm")
        ok = True
        if algorithm != SIGNATURE_ALGORITHM:
            v.problem(f"{at}.algorithm", f'must be "{SIGNATURE_ALGORITHM}", got {algorithm!r}')
            ok = False
        public_key = _base64(item.get("publicKey"), 32)
        if public_key is None:
            shown = _shown(item.get("publicKey"))
            v.problem(f"{at}.publicKey", f"must be the base64 of a raw 32-byte Ed25519 public key, got {shown}")
            ok = False
        signature = _base64(item.get("signature"), 64)
        if signature is None:
            v.problem(
                f"{at}.signature",
                f"must be the base64 of a 64-byte Ed25519 signature, got {_shown(item.get('signature'))}",
            )
            ok = False
        if not isinstance(key_id, str) or not KEY_ID.match(key_id):
            v.problem(f"{at}.keyId", f'must be "ed25519:" followed by 16 lowercase hex digits, got {key_id!r}')
            ok = False
        elif public_key is not None and raw_key_id(public_key) != key_id:
            v.problem(f"{at}.keyId", f'"{key_id}" is not the id of publicKey (which is {raw_key_id(public_key)})')
            ok = False
        elif key_id in seen:
            v.problem(f"{at}.keyId", f'"{key_id}" signs twice')
            ok = False
        if isinstance(key_id, str):
            seen.add(key_id)
        if ok:
            assert public_key is not None
            assert signature is not None
            out.append(Signature(str(key_id), public_key, signature))
    return tuple(out)


def _metrics(v: _Validator, raw: object) -> dict[str, float]:
    if not isinstance(raw, Mapping):
        v.problem("metrics", "must be an object of name to number")
        return {}
    out: dict[str, float] = {}
    for key, value in raw.items():
        if not isinstance(key, str) or not _KEY.match(key):
            v.problem(f"metrics.{key}", "name must be letters, digits and '_.:/-' (at most 128)")
        elif isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            v.problem(f"metrics.{key}", f"must be a finite number, got {value!r}")
        else:
            out[key] = value
    return out


def _lineage(v: _Validator, raw: object) -> Lineage:
    if not isinstance(raw, Mapping):
        v.problem("lineage", "must be an object")
        return Lineage()
    known = {"producer", "image", "parents", "dataset", "hyperparameters", "libraries", "source"}
    for key in raw:
        if key not in known:
            v.problem(f"lineage.{key}", f"unknown field (known: {', '.join(sorted(known))})")
    producer = None
    p = raw.get("producer")
    if p is not None:
        if not isinstance(p, Mapping):
            v.problem("lineage.producer", "must be an object {kind, namespace, name, uid}")
        else:
            kind, ns, name, uid = p.get("kind"), p.get("namespace"), p.get("name"), p.get("uid", "")
            if not isinstance(kind, str) or not _K8S_KIND.match(kind):
                v.problem("lineage.producer.kind", f"must be a Kubernetes kind such as TrainingJob, got {kind!r}")
            if not isinstance(ns, str) or not _K8S_NAME.match(ns):
                v.problem("lineage.producer.namespace", f"must be a Kubernetes namespace name, got {ns!r}")
            if not isinstance(name, str) or not _K8S_NAME.match(name):
                v.problem("lineage.producer.name", f"must be a Kubernetes object name, got {name!r}")
            if not isinstance(uid, str) or len(uid) > 128:
                v.problem("lineage.producer.uid", f"must be a string, got {uid!r}")
            producer = Producer(str(kind), str(ns), str(name), str(uid))
    image = raw.get("image")
    if image is not None and (not isinstance(image, str) or not image or _CONTROL.search(image) or " " in image):
        v.problem("lineage.image", f"must be an image reference without spaces, got {image!r}")
    parents = raw.get("parents", [])
    if not isinstance(parents, list) or not all(isinstance(d, str) and _DIGEST.match(d) for d in parents):
        v.problem("lineage.parents", 'must be a list of artifact digests "sha256:<64 hex>"')
        parents = []
    dataset = None
    d = raw.get("dataset")
    if d is not None:
        if not isinstance(d, Mapping) or not isinstance(d.get("uri"), str) or not d.get("uri"):
            v.problem("lineage.dataset", "must be an object {uri, revision} with a non-empty uri")
        elif d.get("revision") is not None and not isinstance(d.get("revision"), str):
            v.problem("lineage.dataset.revision", f"must be a string or null, got {d.get('revision')!r}")
        else:
            dataset = DatasetRef(d["uri"], d.get("revision"))
    hyper = raw.get("hyperparameters", {})
    if not isinstance(hyper, Mapping):
        v.problem("lineage.hyperparameters", "must be an object")
        hyper = {}
    else:
        try:
            json.dumps(hyper, allow_nan=False)
        except (TypeError, ValueError) as e:
            v.problem("lineage.hyperparameters", f"must be plain JSON without NaN or infinity ({e})")
            hyper = {}
    libraries = raw.get("libraries", {})
    if not isinstance(libraries, Mapping) or not all(
        isinstance(k, str) and isinstance(val, str) for k, val in libraries.items()
    ):
        v.problem("lineage.libraries", "must be an object of library name to version string")
        libraries = {}
    source = raw.get("source")
    if source is not None and (not isinstance(source, str) or not source):
        v.problem("lineage.source", f"must be a non-empty string or null, got {source!r}")
    return Lineage(
        producer=producer,
        image=image if isinstance(image, str) else None,
        parents=tuple(parents),
        dataset=dataset,
        hyperparameters=dict(hyper),
        libraries=dict(libraries),
        source=source if isinstance(source, str) else None,
    )


def library_versions(*names: str) -> dict[str, str]:
    """Installed versions of ``names`` (plus Python), read from package metadata without importing them."""
    import platform
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return out
