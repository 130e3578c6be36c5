"""Shared fixtures and helpers of the kiln_artifacts tests (imported by the other test_artifacts_* modules)."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
from kiln_artifacts.testing import S3TestServer

# The fixtures, for `from test_artifacts_support import *` (pytest finds fixtures in the module namespace).
__all__ = ["cache", "s3_bucket", "s3_server", "store"]


@pytest.fixture(scope="module")
def s3_server():
    with S3TestServer() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server, monkeypatch) -> str:
    """A fresh bucket on the loopback S3 server, with its credentials in the environment; returns s3://bucket."""
    bucket = f"kiln-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{bucket}"


@pytest.fixture(params=["file", "pvc", "s3"])
def store(request, tmp_path, monkeypatch) -> str:
    """The root URI of an empty store of each kind; pvc:// resolves under a fake mount root, as in a pod."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if request.param == "pvc":
        monkeypatch.setenv("KILN_PVC_ROOT", str(tmp_path / "mnt"))
        (tmp_path / "mnt" / "models").mkdir(parents=True)
        return "pvc://models/store"
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("KILN_ARTIFACT_CACHE", str(path))
    return path


def make_model(folder: Path, seed: int = 0, big: int = 300_000) -> Path:
    """A small model-like folder: a config, a nested tokenizer file and a weights file."""
    rng = __import__("random").Random(seed)
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"model_type": "bert", "seed": {seed}}}\n')
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(200)))
    (folder / "model.safetensors").write_bytes(rng.randbytes(big))
    return folder


def local_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def s3_keys(uri: str) -> set[str]:
    from kiln_artifacts.storage import resolve

    loc = resolve(uri)
    try:
        return {k[len(loc.path) + 1 :] for k in loc.fs.find(loc.path + "/")}
    except FileNotFoundError:
        return set()


def env_for_child() -> dict[str, str]:
    return dict(os.environ)
