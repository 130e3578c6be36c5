"""From a URI to an fsspec filesystem and a path in it.

file:// and pvc:// are local paths (a pvc:// URI resolves under $KILN_PVC_ROOT, where the operator mounts the
claim); s3:// goes through s3fs with credentials read from the environment only (the operator fills it from a
referenced Secret). s3fs is imported lazily: the operator's base install has fsspec but not s3fs.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import ArtifactError, CredentialsError
from .uri import ArtifactURI, parse_uri

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

S3_KEY_ENV = "AWS_ACCESS_KEY_ID"
S3_SECRET_ENV = "AWS_SECRET_ACCESS_KEY"
S3_TOKEN_ENV = "AWS_SESSION_TOKEN"
S3_ENDPOINT_ENVS = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
S3_REGION_ENVS = ("AWS_REGION", "AWS_DEFAULT_REGION")


@dataclass(frozen=True)
class Location:
    """A resolved URI: the filesystem and the path in that filesystem's own terms."""

    uri: ArtifactURI
    fs: AbstractFileSystem
    path: str  # local: absolute path; s3: "bucket/key"

    @property
    def local(self) -> Path | None:
        return Path(self.path) if self.uri.scheme in ("file", "pvc") else None

    def child(self, rel: str) -> str:
        return f"{self.path.rstrip('/')}/{rel}" if self.path.rstrip("/") else rel


def s3_options_from_env(env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """s3fs options from AWS_* variables; refuses to fall back to other credential sources (instance metadata)."""
    env = os.environ if env is None else env
    key, secret = env.get(S3_KEY_ENV), env.get(S3_SECRET_ENV)
    if not key or not secret:
        missing = [name for name in (S3_KEY_ENV, S3_SECRET_ENV) if not env.get(name)]
        raise CredentialsError(
            f"S3 credentials missing: set {' and '.join(missing)} in the environment (in a cluster they come from "
            "the Secret referenced by the resource, never from the URI)"
        )
    client: dict[str, Any] = {}
    endpoint = next((env[name] for name in S3_ENDPOINT_ENVS if env.get(name)), None)
    if endpoint:
        client["endpoint_url"] = endpoint
    client["region_name"] = next((env[name] for name in S3_REGION_ENVS if env.get(name)), "us-east-1")
    options: dict[str, Any] = {
        "key": key,
        "secret": secret,
        "client_kwargs": client,
        # Several processes publish and promote concurrently: a cached listing would hide their writes.
        "use_listings_cache": False,
    }
    if env.get(S3_TOKEN_ENV):
        options["token"] = env[S3_TOKEN_ENV]
    return options


def s3_filesystem(env: Mapping[str, str] | None = None) -> AbstractFileSystem:
    try:
        import s3fs
    except ImportError as e:  # the operator's base install has no s3fs
        raise ArtifactError("s3:// needs s3fs: install kiln[artifacts]") from e
    # fsspec caches instances by their arguments, so this is cheap after the first call.
    return s3fs.S3FileSystem(**s3_options_from_env(env))


def resolve(uri: str | ArtifactURI, *, field: str = "uri") -> Location:
    parsed = parse_uri(uri, field=field)
    if parsed.scheme in ("file", "pvc"):
        from fsspec.implementations.local import LocalFileSystem

        local = parsed.local_path()
        assert local is not None
        return Location(parsed, LocalFileSystem(), str(local))
    if parsed.scheme == "s3":
        return Location(parsed, s3_filesystem(), f"{parsed.authority}/{parsed.path}".rstrip("/"))
    raise ArtifactError(f'"{parsed}": hf:// is a read-only model source; use load() to fetch it')
