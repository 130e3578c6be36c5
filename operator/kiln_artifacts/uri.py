"""Artifact URIs: parsing, validation and the one canonical spelling of each.

Supported schemes (README "Artifacts"):

- ``file:///absolute/path``: local runs and tests.
- ``pvc://<claim>/<path>``: a PersistentVolumeClaim; in a pod it is mounted at ``$KILN_PVC_ROOT/<claim>``.
- ``s3://<bucket>/<prefix>``: any S3-compatible store; credentials come from the environment only.
- ``hf://<org>/<name>[@<revision>]``: a Hugging Face Hub model, read-only.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from pathlib import Path

from .errors import InvalidURIError, ReadOnlyStoreError

# Also importable from here, where code that maps pvc:// URIs onto pods looks for them.
from .settings import pvc_root

SCHEMES = ("file", "pvc", "s3", "hf")

MAX_URI_LENGTH = 4096
MAX_SEGMENT_BYTES = 255
MAX_S3_KEY_BYTES = 1024

_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = re.compile(rf"^{_DNS_LABEL}(\.{_DNS_LABEL})*$")
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4 = re.compile(r"^\d{1,3}(\.\d{1,3}){3}$")
_HF_PART = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")
_HF_REVISION = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/-]{0,254}$")
_FORBIDDEN = re.compile(r"[\x00-\x20\x7f\\?#%]")


@dataclass(frozen=True)
class ArtifactURI:
    """A validated URI. ``path`` is relative ('' is the root) for pvc/s3, absolute for file, ``org/name`` for hf."""

    scheme: str
    authority: str  # pvc: the claim; s3: the bucket; file and hf: ''
    path: str
    revision: str | None = None  # hf only

    def __str__(self) -> str:
        if self.scheme == "file":
            return f"file://{self.path}"
        if self.scheme == "hf":
            return f"hf://{self.path}" + (f"@{self.revision}" if self.revision else "")
        return f"{self.scheme}://{self.authority}" + (f"/{self.path}" if self.path else "")

    @property
    def read_only(self) -> bool:
        return self.scheme == "hf"

    @property
    def name(self) -> str:
        """The last path segment ('' at a root)."""
        return self.path.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> ArtifactURI:
        """A URI below this one; each part may hold several '/'-separated segments, each validated."""
        if self.scheme == "hf":
            raise InvalidURIError(f'invalid URI "{self}": hf URIs name a repository and have no sub-paths')
        segments = [s for part in parts for s in part.split("/")]
        for segment in segments:
            _check_segment(str(self), segment, "path")
        if self.scheme == "file":
            base = self.path.rstrip("/")
            return replace(self, path=base + "/" + "/".join(segments))
        path = "/".join([self.path, *segments] if self.path else segments)
        return _checked(replace(self, path=path))

    @property
    def parent(self) -> ArtifactURI:
        if self.scheme == "hf":
            raise InvalidURIError(f'invalid URI "{self}": hf URIs have no parent')
        if self.scheme == "file":
            return replace(self, path=str(Path(self.path).parent))
        return replace(self, path=self.path.rsplit("/", 1)[0] if "/" in self.path else "")

    def is_within(self, other: ArtifactURI) -> bool:
        """True when this URI is ``other`` or below it (same scheme and authority)."""
        if (self.scheme, self.authority) != (other.scheme, other.authority) or self.scheme == "hf":
            return False
        mine, theirs = self.path.rstrip("/"), other.path.rstrip("/")
        return not theirs or mine == theirs or mine.startswith(theirs + "/")

    def local_path(self) -> Path | None:
        """Where a file:// or pvc:// URI lives on this machine (pvc: under $KILN_PVC_ROOT); None otherwise."""
        if self.scheme == "file":
            return Path(self.path)
        if self.scheme == "pvc":
            root = pvc_root()
            return root / self.authority / self.path if self.path else root / self.authority
        return None


def parse_uri(value: object, *, field: str = "uri") -> ArtifactURI:
    """Parse and validate ``value``; raises InvalidURIError naming ``field`` and the broken rule."""
    if isinstance(value, ArtifactURI):
        return value
    if not isinstance(value, str):
        raise InvalidURIError(f"{field}: must be a string URI, got {type(value).__name__}")
    shown = value if len(value) <= 200 else value[:200] + "..."
    prefix = f'{field}: invalid URI "{shown}"'
    if not value:
        raise InvalidURIError(f"{field}: must not be empty (expected file://, pvc://, s3:// or hf://)")
    if len(value) > MAX_URI_LENGTH:
        raise InvalidURIError(f"{prefix}: longer than {MAX_URI_LENGTH} characters")
    if "://" not in value:
        raise InvalidURIError(
            f"{prefix}: missing scheme; expected one of file://, pvc://, s3://, hf:// (a local path is file:///abs/path)"
        )
    scheme, rest = value.split("://", 1)
    if scheme not in SCHEMES:
        raise InvalidURIError(f'{prefix}: unsupported scheme "{scheme}" (supported: {", ".join(SCHEMES)})')
    bad = _FORBIDDEN.search(rest)
    if bad:
        what = {
            "?": "a query string",
            "#": "a fragment",
            "%": "percent-encoding",
            "\\": "a backslash",
        }.get(bad.group(), "whitespace or control characters")
        raise InvalidURIError(f"{prefix}: must not contain {what}")
    parse = {"file": _parse_file, "pvc": _parse_pvc, "s3": _parse_s3, "hf": _parse_hf}[scheme]
    return parse(prefix, rest)


def writable(uri: ArtifactURI) -> ArtifactURI:
    if uri.read_only:
        raise ReadOnlyStoreError(f'"{uri}": hf:// is a read-only source; publish to file://, pvc:// or s3://')
    return uri


def _check_segment(prefix: str, segment: str, what: str) -> None:
    if segment == "":
        raise InvalidURIError(f"{prefix}: {what} has an empty segment ('//')")
    if segment in (".", ".."):
        raise InvalidURIError(f"{prefix}: {what} must not contain '{segment}' segments")
    if len(segment.encode()) > MAX_SEGMENT_BYTES:
        raise InvalidURIError(f"{prefix}: {what} segment longer than {MAX_SEGMENT_BYTES} bytes")
    if _FORBIDDEN.search(segment):
        raise InvalidURIError(f"{prefix}: {what} segment {segment!r} has a forbidden character")


def _split_path(prefix: str, path: str, what: str) -> str:
    path = path[:-1] if path.endswith("/") else path  # one trailing slash means the same directory
    if not path:
        return ""
    for segment in path.split("/"):
        _check_segment(prefix, segment, what)
    return path


def _parse_file(prefix: str, rest: str) -> ArtifactURI:
    host, slash, path = rest.partition("/")
    if host not in ("", "localhost"):
        raise InvalidURIError(f'{prefix}: file URIs must not name a host ("{host}"); use file:///absolute/path')
    if not slash:
        raise InvalidURIError(f"{prefix}: file URIs need an absolute path: file:///absolute/path")
    rel = _split_path(prefix, path, "path")
    return ArtifactURI("file", "", "/" + rel)


def _parse_pvc(prefix: str, rest: str) -> ArtifactURI:
    claim, _, path = rest.partition("/")
    if not claim:
        raise InvalidURIError(f"{prefix}: missing claim name: pvc://<claim>/<path>")
    if len(claim) > 253 or not _DNS_SUBDOMAIN.match(claim):
        raise InvalidURIError(
            f'{prefix}: claim "{claim}" must be a DNS-1123 subdomain (at most 253 lowercase letters, digits, '
            "'-' and '.', starting and ending with a letter or digit)"
        )
    return ArtifactURI("pvc", claim, _split_path(prefix, path, "path"))


def _parse_s3(prefix: str, rest: str) -> ArtifactURI:
    bucket, _, key = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise InvalidURIError(
            f"{prefix}: credentials and endpoints do not belong in the URI; reference a Secret (environment)"
        )
    if not bucket:
        raise InvalidURIError(f"{prefix}: missing bucket: s3://<bucket>/<prefix>")
    if not _BUCKET.match(bucket) or ".." in bucket or _IPV4.match(bucket):
        raise InvalidURIError(
            f"{prefix}: bucket \"{bucket}\" must be 3-63 lowercase letters, digits, '.' and '-', start and end with "
            "a letter or digit, and not look like an IP address"
        )
    path = _split_path(prefix, key, "key prefix")
    if len(path.encode()) > MAX_S3_KEY_BYTES - 100:  # room for the file names below the prefix
        raise InvalidURIError(f"{prefix}: key prefix longer than {MAX_S3_KEY_BYTES - 100} bytes")
    return ArtifactURI("s3", bucket, path)


def _parse_hf(prefix: str, rest: str) -> ArtifactURI:
    repo, at, revision = rest.partition("@")
    parts = repo.split("/")
    if len(parts) != 2:
        raise InvalidURIError(f"{prefix}: hf URIs name a repository: hf://<org>/<name>[@<revision>]")
    for what, part in zip(("org", "name"), parts, strict=True):
        if not part or len(part) > 96 or not _HF_PART.match(part) or "--" in part or ".." in part:
            raise InvalidURIError(
                f"{prefix}: {what} \"{part}\" must be 1-96 letters, digits, '-', '_' and '.', start and end with a "
                "letter or digit, without '--' or '..'"
            )
    if at and (not _HF_REVISION.match(revision) or ".." in revision or revision.endswith("/")):
        raise InvalidURIError(
            f"{prefix}: revision \"{revision}\" must be a branch, tag or commit (letters, digits, '.', '_', '-', "
            "'/'; no '..')"
        )
    return ArtifactURI("hf", "", repo, revision or None)


def _checked(uri: ArtifactURI) -> ArtifactURI:
    if uri.scheme == "s3" and len(uri.path.encode()) > MAX_S3_KEY_BYTES:
        raise InvalidURIError(f'invalid URI "{uri}": key longer than {MAX_S3_KEY_BYTES} bytes')
    return uri
