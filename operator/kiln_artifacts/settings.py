"""Where the library finds things on this machine: the variables it reads, read here only."""

from __future__ import annotations

import os
from pathlib import Path

# pvc:// URIs resolve under this folder: in a workload pod the operator mounts each claim at <root>/<claim>.
PVC_ROOT_ENV = "KILN_PVC_ROOT"
DEFAULT_PVC_ROOT = "/mnt/kiln/pvc"
# Verified copies of remote (s3://, hf://) artifacts.
CACHE_ENV = "KILN_ARTIFACT_CACHE"


def pvc_root() -> Path:
    return Path(os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "kiln" / "artifacts")
