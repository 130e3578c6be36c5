"""What the operator adds to a workload pod so that the library finds an artifact there (pure functions, dicts).

- pvc://<claim>/<path>: the claim mounted at ``$KILN_PVC_ROOT/<claim>`` (default /mnt/kiln/pvc/<claim>).
- s3://: AWS_* variables from a Secret the resource references (secretKeyRef), never literal credentials.
- hf://: HF_TOKEN from a Secret, for private repositories.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any

from .errors import InvalidNameError
from .settings import DEFAULT_PVC_ROOT, PVC_ROOT_ENV
from .storage import S3_KEY_ENV, S3_SECRET_ENV, S3_TOKEN_ENV
from .uri import ArtifactURI, parse_uri

_SECRET = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def pvc_volume(uri: str | ArtifactURI, *, read_only: bool, field: str = "uri") -> dict[str, Any]:
    """The volume, its mount and the env var for a pvc:// URI, plus the path the artifact has in the pod."""
    parsed = parse_uri(uri, field=field)
    if parsed.scheme != "pvc":
        raise InvalidNameError(f'{field}: "{parsed}" is not a pvc:// URI')
    claim = parsed.authority
    # Volume names are DNS labels (63): long claim names get a stable hash suffix.
    name = f"kiln-pvc-{claim}".replace(".", "-")
    if len(name) > 63:
        name = f"{name[:52]}-{hashlib.sha256(claim.encode()).hexdigest()[:10]}"
    mount_path = f"{DEFAULT_PVC_ROOT}/{claim}"
    return {
        "volume": {"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}},
        "volumeMount": {"name": name, "mountPath": mount_path, "readOnly": read_only},
        "env": [{"name": PVC_ROOT_ENV, "value": DEFAULT_PVC_ROOT}],
        "path": f"{mount_path}/{parsed.path}" if parsed.path else mount_path,
    }


def _check_secret(secret_name: str) -> None:
    if not isinstance(secret_name, str) or not _SECRET.match(secret_name):
        raise InvalidNameError(f"secret name {secret_name!r}: must be a DNS-1123 subdomain")


def s3_env(
    secret_name: str,
    *,
    endpoint_url: str | None = None,
    region: str | None = None,
    access_key_key: str = S3_KEY_ENV,
    secret_key_key: str = S3_SECRET_ENV,
    session_token_key: str | None = None,
) -> list[dict[str, Any]]:
    """Container env entries giving the library S3 credentials from ``secret_name`` (keys configurable)."""
    _check_secret(secret_name)

    def ref(var: str, key: str) -> dict[str, Any]:
        return {"name": var, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}

    env = [ref(S3_KEY_ENV, access_key_key), ref(S3_SECRET_ENV, secret_key_key)]
    if session_token_key:
        env.append(ref(S3_TOKEN_ENV, session_token_key))
    if endpoint_url:
        env.append({"name": "AWS_ENDPOINT_URL_S3", "value": endpoint_url})
    if region:
        env.append({"name": "AWS_REGION", "value": region})
    return env


def hf_env(secret_name: str | None, *, key: str = "HF_TOKEN") -> list[dict[str, Any]]:
    if secret_name is None:
        return []
    _check_secret(secret_name)
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret_name, "key": key}}}]
