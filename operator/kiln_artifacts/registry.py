"""The promotion registry: human-readable names and versions pointing at artifact digests.

Layout under the registry root (any writable store)::

    models/<name>/versions/<n>.json     one immutable record per promotion, n = 1, 2, 3, ...

A record points at the artifact (its URI and digest); no bytes are copied. Version numbers are taken with an
exclusive create (link(2) of a complete temporary file locally, a conditional PUT with If-None-Match: * on S3):
two concurrent promotions never get the same number, the loser retries with the next one, and no version is lost.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .errors import (
    ArtifactError,
    IntegrityError,
    InvalidManifestError,
    InvalidNameError,
    NotPromotedError,
)
from .load import LoadedArtifact, Verify, load, read_manifest_bytes
from .manifest import KEY_ID, MANIFEST_NAME, RESERVED_PREFIX, format_time, parse_manifest, parse_time
from .storage import Location, resolve
from .uri import ArtifactURI, parse_uri, writable

RECORD_VERSION = 1
MAX_ATTEMPTS = 1000
_NAME = re.compile(r"^[a-z0-9]([a-z0-9._-]{0,126}[a-z0-9])?$")
_VERSION_FILE = re.compile(r"^([1-9][0-9]{0,17})\.json$")


def check_model_name(name: object) -> str:
    if not isinstance(name, str) or not _NAME.match(name) or ".." in name:
        raise InvalidNameError(
            f"model name {name!r}: must be 1-128 lowercase letters, digits, '.', '_' and '-', starting and ending "
            "with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class ModelVersion:
    """One promotion: ``name`` version ``version`` is the artifact ``digest`` found at ``uri``."""

    name: str
    version: int
    digest: str
    uri: str
    promoted_at: datetime
    promoted_by: str | None = None
    note: str | None = None
    format: str | None = None
    task: str | None = None
    metrics: Mapping[str, float] = field(default_factory=dict)
    # Key ids whose signatures verified on the manifest when it was promoted (kiln_artifacts.signing.signers);
    # empty for an unsigned artifact. A record of who signed, not a judgement of trust.
    signed_by: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        doc = {
            "recordVersion": RECORD_VERSION,
            "name": self.name,
            "version": self.version,
            "digest": self.digest,
            "uri": self.uri,
            "promotedAt": format_time(self.promoted_at),
            "promotedBy": self.promoted_by,
            "note": self.note,
            "format": self.format,
            "task": self.task,
            "metrics": dict(self.metrics),
        }
        if self.signed_by:  # absent when unsigned, as in records written before signatures existed
            doc["signedBy"] = list(self.signed_by)
        return doc

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str) -> ModelVersion:
        problems = []
        if data.get("recordVersion") != RECORD_VERSION:
            problems.append(f"recordVersion: must be {RECORD_VERSION}, got {data.get('recordVersion')!r}")
        for key, kind in (("name", str), ("version", int), ("digest", str), ("uri", str), ("promotedAt", str)):
            if not isinstance(data.get(key), kind):
                problems.append(f"{key}: required {kind.__name__}")
        signed_by = data.get("signedBy")
        signed_by = [] if signed_by is None else signed_by
        if not isinstance(signed_by, list) or not all(isinstance(k, str) and KEY_ID.match(k) for k in signed_by):
            problems.append(f'signedBy: must be a list of key ids "ed25519:<16 hex>", got {signed_by!r}')
        if problems:
            raise InvalidManifestError(where, problems)
        return cls(
            name=data["name"],
            version=data["version"],
            digest=data["digest"],
            uri=data["uri"],
            promoted_at=parse_time(data["promotedAt"]),
            promoted_by=data.get("promotedBy"),
            note=data.get("note"),
            format=data.get("format"),
            task=data.get("task"),
            metrics=dict(data.get("metrics") or {}),
            signed_by=list(signed_by),
        )


class Registry:
    """Promoted versions of models, kept in a store at ``root`` (file://, pvc:// or s3://)."""

    def __init__(self, root: str | ArtifactURI) -> None:
        self.loc: Location = resolve(writable(parse_uri(root, field="registry")), field="registry")

    def __repr__(self) -> str:
        return f"Registry({str(self.loc.uri)!r})"

    def _dir(self, name: str) -> str:
        return self.loc.child(f"models/{check_model_name(name)}/versions")

    def version_numbers(self, name: str) -> list[int]:
        folder = self._dir(name)
        try:
            entries = self.loc.fs.ls(folder, detail=False)
        except FileNotFoundError:
            return []
        numbers = []
        for entry in entries:
            m = _VERSION_FILE.match(str(entry).rstrip("/").rsplit("/", 1)[-1])
            if m:
                numbers.append(int(m.group(1)))
        return sorted(numbers)

    def get(self, name: str, version: int) -> ModelVersion:
        key = f"{self._dir(name)}/{version}.json"
        try:
            data = self.loc.fs.cat_file(key)
        except FileNotFoundError:
            raise NotPromotedError(f"model {name!r} has no version {version} in {self.loc.uri}") from None
        try:
            return ModelVersion.from_dict(json.loads(data), where=key)
        except ValueError as e:
            raise InvalidManifestError(key, [f"not valid JSON ({e})"]) from None

    def versions(self, name: str) -> list[ModelVersion]:
        """The history: every promoted version of ``name``, oldest first."""
        return [self.get(name, n) for n in self.version_numbers(name)]

    def latest(self, name: str) -> ModelVersion:
        """The latest promoted version of ``name``; NotPromotedError if there is none."""
        numbers = self.version_numbers(name)
        if not numbers:
            raise NotPromotedError(f"model {name!r} has no promoted version in {self.loc.uri}")
        return self.get(name, numbers[-1])

    def models(self) -> list[str]:
        try:
            entries = self.loc.fs.ls(self.loc.child("models"), detail=False)
        except FileNotFoundError:
            return []
        names = [str(e).rstrip("/").rsplit("/", 1)[-1] for e in entries]
        return sorted(n for n in names if _NAME.match(n))

    def referenced_digests(self) -> set[str]:
        """Every digest some promoted version points at: retention never deletes these."""
        return {v.digest for name in self.models() for v in self.versions(name)}

    def promote(
        self,
        artifact: str | ArtifactURI,
        name: str,
        *,
        expected_digest: str | None = None,
        promoted_by: str | None = None,
        note: str | None = None,
        unless_latest: bool = False,
    ) -> ModelVersion:
        """Record the complete artifact at ``artifact`` as the next version of ``name`` (no bytes copied).

        ``unless_latest`` makes a retried promotion idempotent: if the latest version already points at this
        digest, that version is returned instead of a new one. The record's ``signed_by`` lists the keys whose
        signatures verify on the artifact's manifest as it is now.
        """
        from .signing import signers

        check_model_name(name)
        uri = parse_uri(artifact, field="artifact")
        if uri.scheme == "hf":
            raise ArtifactError(f'artifact "{uri}": promote a published artifact, not an hf:// source')
        raw, where = read_manifest_bytes(uri)
        manifest = parse_manifest(raw, where=f"{where}/{MANIFEST_NAME}")
        signed_by = signers(raw, where=where)
        if expected_digest is not None and manifest.digest != expected_digest:
            raise IntegrityError(str(uri), None, f"holds artifact {manifest.digest}, expected {expected_digest}")
        numbers = self.version_numbers(name)
        if unless_latest and numbers:
            latest = self.get(name, numbers[-1])
            if latest.digest == manifest.digest:
                return latest
        candidate = (numbers[-1] if numbers else 0) + 1
        for _ in range(MAX_ATTEMPTS):
            record = ModelVersion(
                name=name,
                version=candidate,
                digest=manifest.digest,
                uri=str(uri),
                promoted_at=datetime.now(UTC),
                promoted_by=promoted_by,
                note=note,
                format=manifest.format,
                task=manifest.task,
                metrics=dict(manifest.metrics),
                signed_by=signed_by,
            )
            body = (json.dumps(record.to_dict(), indent=2) + "\n").encode()
            if self._create(f"{self._dir(name)}/{candidate}.json", body):
                return record
            # Someone took this number: retry after the highest one now present.
            numbers = self.version_numbers(name)
            candidate = max(candidate, numbers[-1] if numbers else 0) + 1
        raise ArtifactError(f"model {name!r}: could not take a version number after {MAX_ATTEMPTS} attempts")

    def _create(self, key: str, body: bytes) -> bool:
        """Create ``key`` with ``body`` only if it does not exist; False if it does."""
        if self.loc.local is not None:
            folder = Path(key).parent
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f"{RESERVED_PREFIX}-tmp-{uuid.uuid4().hex}"
            try:
                with open(tmp, "xb") as f:
                    f.write(body)
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, key)  # atomic, fails if taken, and the record is complete when it appears
                except FileExistsError:
                    return False
                return True
            finally:
                tmp.unlink(missing_ok=True)
        try:
            self.loc.fs.pipe_file(key, body, mode="create")
        except FileExistsError:
            return False
        return True

    def load(self, name: str, version: int | None = None, *, verify: Verify = "full", **kwargs: Any) -> LoadedArtifact:
        """Load a promoted version (the latest by default), pinned to the digest it was promoted with."""
        record = self.latest(name) if version is None else self.get(name, version)
        return load(record.uri, verify=verify, expected_digest=record.digest, **kwargs)
