"""The server's life: overload and recovery, SIGTERM under load, artifacts it must refuse, a GPU provider that
did not load, usage errors. Real processes on loopback; every wait polls a condition with a deadline."""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from support.server import (
    SENTENCES,
    ServerProcess,
    counter,
    image_artifact,
    image_request,
    run_server,
    server_env,
    text_request,
    wait_in_flight,
)
from support.waiting import wait_for

from kiln_artifacts.contract import ExitCode

LONG = SENTENCES[3] * 3  # ~ the model's 64 tokens: the slowest request there is


def test_overload_answers_429_at_once_and_recovers(tmp_path: Path, text_uri: tuple[str, np.ndarray]):
    server = ServerProcess(
        tmp_path, text_uri[0], "--max-batch-size", "1", "--max-queue-size", "2", "--max-queue-delay-ms", "0"
    ).start()
    try:
        server.wait_ready()

        def call(_i: int) -> tuple[int, str | None, float]:
            started = time.monotonic()
            status, headers, _ = server.request(
                "POST", "/v2/models/m/infer", json.dumps(text_request([LONG])).encode(), timeout=60
            )
            return status, headers.get("retry-after"), time.monotonic() - started

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(call, range(48)))
        codes = [r[0] for r in results]
        assert set(codes) <= {200, 429}, codes
        assert codes.count(429) > 0, "a queue of 2 never filled"
        assert codes.count(200) >= 3
        rejected = [r for r in results if r[0] == 429]
        assert all(r[1] == "1" for r in rejected)  # Retry-After
        served = sorted(r[2] for r in results if r[0] == 200)
        # rejections are immediate, not queued: faster than the median served request
        assert min(r[2] for r in rejected) < served[len(served) // 2]
        metrics = server.metrics()
        assert counter(metrics, "kiln_server_requests_total", model="m", code="429") == codes.count(429)
        # recovery: once the burst is over, every request is served again
        for _ in range(3):
            status, doc = server.infer(text_request(["fine again"]))
            assert status == 200, doc
        assert counter(server.metrics(), "kiln_server_queue_depth", model="m") == 0
    finally:
        assert server.terminate() == 0, server.log


def test_sigterm_under_load_finishes_every_accepted_request(tmp_path: Path, text_uri: tuple[str, np.ndarray]):
    uri, expected = text_uri
    server = ServerProcess(
        tmp_path, uri, "--max-batch-size", "1", "--shutdown-delay-s", "1.5", "--grace-period-s", "60"
    ).start()
    try:
        server.wait_ready()
        burst = [[SENTENCES[3 + i % 2]] for i in range(24)]  # the longer sentences: about 20 ms each here
        with ThreadPoolExecutor(len(burst)) as pool:
            futures = [pool.submit(server.infer, text_request(texts)) for texts in burst]
            # every request accepted and waiting or running before the signal
            inflight = wait_in_flight(server, futures, 16)
            assert server.proc is not None
            server.proc.send_signal(15)
            # not ready at once, but still serving during the shutdown delay, and telling clients to go away
            wait_for(
                lambda: server.request("GET", "/v2/health/ready")[0] == 503, what="not ready after SIGTERM", timeout=5
            )
            status, headers, body = server.request(
                "POST", "/v2/models/m/infer", json.dumps(text_request([SENTENCES[0]])).encode()
            )
            assert status == 200, body
            assert headers.get("connection", "").lower() == "close"
            answers = [f.result(timeout=60) for f in futures]
        assert inflight >= 16, f"only {inflight} requests in flight at SIGTERM: the test did not test a drain"
        for (status, doc), texts in zip(answers, burst, strict=True):
            assert status == 200, doc
            np.testing.assert_allclose(doc["outputs"][0]["data"], expected[SENTENCES.index(texts[0])], atol=2e-4)
        assert server.proc.wait(60) == 0, server.log
        assert "drained; exiting" in server.log
        with pytest.raises(ConnectionRefusedError):
            http.client.HTTPConnection("127.0.0.1", server.port, timeout=5).connect()
    finally:
        server.kill()


def test_corrupted_artifact_refuses_to_start(tmp_path: Path, root: str):
    uri, _ = image_artifact(root)
    copy = tmp_path / "corrupted"
    shutil.copytree(uri.removeprefix("file://"), copy)
    onnx = copy / "model.onnx"
    data = bytearray(onnx.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    onnx.write_bytes(bytes(data))
    (tmp_path / "termination-log").write_text("")
    code, log, term = run_server(tmp_path, f"file://{copy}")
    assert code == ExitCode.ARTIFACT, log
    assert "model.onnx: sha256 mismatch" in log
    assert "cannot serve" in log
    assert "model.onnx" in term
    assert "ready" not in log.split("cannot serve")[0].lower().replace("not ready", "")


def test_not_a_servable_model_refuses_to_start(tmp_path: Path, root: str):
    import kiln_artifacts as ka

    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(image_artifact(root)[1], src / "model.onnx")
    art = ka.publish(src, f"file://{tmp_path}/no-spec", format="onnx", task="image-classification", durable=False)
    code, log, _ = run_server(tmp_path, art.uri)
    assert code == ExitCode.CONTRACT, log
    assert "has no kiln-model.json" in log
    (src / "kiln-model.json").write_text(json.dumps({"task": "image-classification", "imageShape": [3, 8, 8]}))
    art = ka.publish(src, f"file://{tmp_path}/bad-shape", format="onnx", task="image-classification", durable=False)
    code, log, _ = run_server(tmp_path, art.uri)
    assert code == ExitCode.RUNTIME, log  # the graph takes 1 channel: warm-up on the declared shape fails
    assert "warm-up failed" in log
    code, log, _ = run_server(tmp_path, f"file://{tmp_path}/nothing-here")
    assert code == ExitCode.ARTIFACT, log
    assert "ArtifactNotFoundError" in log


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA: nothing fails to load"
)
def test_requested_gpu_provider_missing_means_never_ready(tmp_path: Path, root: str):
    server = ServerProcess(tmp_path, image_artifact(root)[0], "--provider", "cuda").start()
    try:

        def loaded() -> bool:
            assert server.proc is not None
            assert server.proc.poll() is None, server.log
            try:
                return counter(server.metrics(), "kiln_server_model_load_seconds", model="m") > 0
            except OSError:
                return False

        wait_for(loaded, what="model loaded", timeout=60, interval=0.1)
        assert server.request("GET", "/v2/health/live")[0] == 200
        status, _, body = server.request("GET", "/v2/health/ready")
        assert status == 503
        assert "CUDAExecutionProvider is not active" in json.loads(body)["reason"]
        assert server.request("GET", "/v2/models/m/ready")[0] == 503
        status, _ = server.infer(image_request(np.zeros((1, 1, 8, 8), dtype=np.float32)))
        assert status == 503
        metrics = server.metrics()
        assert counter(metrics, "kiln_server_model_ready", model="m") == 0
        assert counter(metrics, "kiln_server_execution_provider_info", model="m", provider="CPUExecutionProvider") == 1
    finally:
        assert server.terminate() == 0, server.log


def test_usage_errors_exit_2_naming_the_flag():
    p = subprocess.run(
        [sys.executable, "-m", "kiln_server", "--model-uri", "file:///x", "--max-queue-size", "0"],
        env=server_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2
    assert "--max-queue-size: must be >= 1 (got '0')" in p.stderr


def test_sigterm_while_idle_exits_promptly(tmp_path: Path, root: str):
    server = ServerProcess(tmp_path, image_artifact(root)[0], "--shutdown-delay-s", "0").start()
    try:
        server.wait_ready()
        started = time.monotonic()
        assert server.terminate(timeout=30) == 0, server.log
        assert time.monotonic() - started < 10
    finally:
        server.kill()
