"""Monitoring in real server processes on loopback: drift of live traffic from the artifact's reference profile
(in distribution: every score under its threshold; shifted: over it within one window, the numbers in
/metrics), anomalies and predictions by class counted, a reference built from traffic when the artifact has
none, --reference-uri, a reference that does not fit the model refused at start, and the JSON access log."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import tritonclient.grpc as tg
from support.server import (
    DIGIT_LABELS,
    TEXT_LABELS,
    ServerProcess,
    counter,
    digits_pixels,
    image_artifact,
    image_artifact_without_profile,
    image_request,
    nonwords,
    reviews,
    run_server,
    text_request,
)
from support.waiting import wait_for

from kiln_artifacts import profile as P
from kiln_artifacts.contract import ExitCode

THRESHOLD = 0.2
ACCESS_FIELDS = {
    "time",
    "request_id",
    "model",
    "model_digest",
    "deployment",
    "revision",
    "protocol",
    "status",
    "latency_ms",
    "batch_size",
    "samples",
}


def in_distribution(n: int, seed: int) -> np.ndarray:
    """Digits the profile was not made of (the train split), in random order: the writers' blocks mixed, as
    traffic from many people would be."""
    _, other = digits_pixels()
    return other[np.random.default_rng(seed).permutation(len(other))[:n]]


def send_images(server: ServerProcess, pixels: np.ndarray, per_request: int = 10) -> list[dict]:
    answers = []
    for start in range(0, len(pixels), per_request):
        status, doc = server.infer(image_request(pixels[start : start + per_request]))
        assert status == 200, doc
        answers.append(doc)
    return answers


def scores(server: ServerProcess, metrics: dict[str, float] | None = None) -> dict[str, float]:
    m = metrics if metrics is not None else server.metrics()
    prefix = "kiln_server_drift_score{"
    return {k.split('signal="')[1].rstrip('"}'): v for k, v in m.items() if k.startswith(prefix)}


def predictions(metrics: dict[str, float], model: str, label: str) -> float:
    return counter(metrics, "kiln_server_predictions_total", model=model, **{"class": label})


def access_lines(server: ServerProcess) -> list[dict]:
    return [json.loads(line) for line in server.log.splitlines() if line.startswith("{")]


def test_image_traffic_in_distribution_then_inverted(tmp_path: Path, root: str):
    uri, _ = image_artifact(root)
    server = ServerProcess(
        tmp_path,
        uri,
        "--drift-window",
        "300",
        "--drift-min-samples",
        "150",
        "--drift-thresholds",
        "prediction=0.3",
        "--access-log-rate",
        "1",
        "--deployment",
        "digits",
        "--revision",
        "digits-abc",
        name="digits",
    ).start()
    try:
        server.wait_ready()
        m = server.metrics()
        assert counter(m, "kiln_server_reference_info", model="digits", source="artifact") == 1
        assert counter(m, "kiln_server_reference_samples", model="digits") == len(digits_pixels()[0])
        assert counter(m, "kiln_server_drift_min_samples", model="digits") == 150
        assert counter(m, "kiln_server_drift_threshold", model="digits", signal="prediction") == 0.3
        assert counter(m, "kiln_server_drift_threshold", model="digits", signal="channel0_mean") == THRESHOLD
        for kind in P.ANOMALY_KINDS:  # every kind there from the start
            assert f'kiln_server_anomalies_total{{kind="{kind}",model="digits"}}' in m
        assert set(scores(server, m)) == {"prediction", "confidence", "channel0_mean", "channel0_std"}

        answers = send_images(server, in_distribution(300, seed=1))
        m = server.metrics()
        assert counter(m, "kiln_server_drift_window_samples", model="digits") == 300
        calm = scores(server, m)
        assert max(calm.values()) < THRESHOLD, calm
        predicted = {c: predictions(m, "digits", c) for c in DIGIT_LABELS}
        answered = [label for doc in answers for label in doc["outputs"][1]["data"]]
        assert predicted == {label: answered.count(label) for label in DIGIT_LABELS}
        assert counter(m, "kiln_server_anomalies_total", model="digits", kind="input_out_of_range") < 15

        # Inverted digits: within one window the pixel statistics are over the threshold, with the numbers.
        send_images(server, -in_distribution(300, seed=2))
        m = server.metrics()
        shifted = scores(server, m)
        assert shifted["channel0_mean"] > 0.8, shifted
        assert counter(m, "kiln_server_drift_window_samples", model="digits") == 300
        assert counter(m, "kiln_server_anomalies_total", model="digits", kind="input_out_of_range") >= 250
        assert counter(m, "kiln_server_anomalies_total", model="digits", kind="unknown_tokens") == 0
        assert sum(predictions(m, "digits", c) for c in DIGIT_LABELS) == 600

        # The access log: one JSON object per request (rate 1), REST and gRPC, with the request ids given.
        status, _ = server.infer(image_request(in_distribution(2, seed=3), id="oip-id"), {"X-Request-Id": "hdr"})
        assert status == 200
        status, _ = server.infer(image_request(in_distribution(1, seed=3)), {"X-Request-Id": "from-header"})
        assert status == 200
        client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        pixels = tg.InferInput("pixel_values", [1, 1, 8, 8], "FP32")
        pixels.set_data_from_numpy(in_distribution(1, seed=4))
        client.infer("digits", [pixels], request_id="grpc-id")
        client.infer("digits", [pixels], headers={"x-request-id": "grpc-header"})
        client.close()
        status, _ = server.infer(image_request(np.zeros((1, 1, 9, 9), dtype=np.float32)))
        assert status == 400
        lines = wait_for(
            lambda: access_lines(server)[-5:] if len(access_lines(server)) >= 65 else None,
            what="access log lines",
            timeout=10,
        )
        assert len(access_lines(server)) == 30 + 30 + 5
        for line in lines:
            assert set(line) == ACCESS_FIELDS, line
            assert line["model_digest"].startswith("sha256:")
            assert (line["deployment"], line["revision"], line["model"]) == ("digits", "digits-abc", "digits")
            assert line["time"].endswith("Z")
            assert line["latency_ms"] > 0
        oip, header, grpc_line, grpc_header, bad = lines
        assert (oip["request_id"], oip["protocol"], oip["status"], oip["samples"]) == ("oip-id", "rest", 200, 2)
        assert oip["batch_size"] >= 2
        assert (header["request_id"], header["samples"]) == ("from-header", 1)
        assert (grpc_line["request_id"], grpc_line["protocol"], grpc_line["status"]) == ("grpc-id", "grpc", 200)
        assert grpc_header["request_id"] == "grpc-header"
        assert (bad["status"], bad["batch_size"]) == (400, 0)
        assert len(bad["request_id"]) == 32  # none given: one made up
    finally:
        assert server.terminate() == 0, server.log


def test_text_traffic_from_another_domain_drifts(tmp_path: Path, text_uri: tuple[str, np.ndarray]):
    server = ServerProcess(
        tmp_path, text_uri[0], "--drift-window", "150", "--drift-min-samples", "100", name="reviews"
    ).start()
    try:
        server.wait_ready()
        texts = reviews(150, seed=1)
        for start in range(0, len(texts), 15):
            status, doc = server.infer(text_request(texts[start : start + 15]))
            assert status == 200, doc
        m = server.metrics()
        calm = scores(server, m)
        assert set(calm) == {"prediction", "confidence", "tokens", "unknown_tokens"}
        assert max(calm.values()) < THRESHOLD, calm
        assert counter(m, "kiln_server_anomalies_total", model="reviews", kind="unknown_tokens") == 0
        # random non-words: the tokenizer splits them into many pieces, and the window sees it
        words = nonwords(150, seed=1)
        for start in range(0, len(words), 15):
            assert server.infer(text_request(words[start : start + 15]))[0] == 200
        shifted = scores(server)
        assert shifted["tokens"] > 0.4, shifted
        # text made of characters the vocabulary lacks: unknown tokens, each sample flagged
        status, _ = server.infer(text_request(["🦄🦄 🛸 🦄", "🛸🛸🛸", "a fine film with a 🛸 in it at the very end"]))
        assert status == 200
        m = server.metrics()
        assert counter(m, "kiln_server_anomalies_total", model="reviews", kind="unknown_tokens") == 2
        assert sum(predictions(m, "reviews", c) for c in TEXT_LABELS) == 303
    finally:
        assert server.terminate() == 0, server.log


def test_a_model_without_a_profile_takes_its_reference_from_traffic(tmp_path: Path, root: str):
    server = ServerProcess(
        tmp_path,
        image_artifact_without_profile(root),
        "--reference-samples",
        "300",
        "--drift-window",
        "300",
        "--drift-min-samples",
        "100",
    ).start()
    try:
        server.wait_ready()
        m = server.metrics()
        assert counter(m, "kiln_server_reference_info", model="m", source="traffic") == 0  # none yet
        assert all(np.isnan(v) for v in scores(server, m).values())
        assert "building one from the first 300 samples of live traffic" in server.log
        traffic = in_distribution(900, seed=5)
        send_images(server, traffic[:200])
        m = server.metrics()
        assert counter(m, "kiln_server_reference_samples", model="m") == 200
        assert counter(m, "kiln_server_drift_window_samples", model="m") == 0
        send_images(server, traffic[200:350])  # 300 for the reference, the next 50 in the window
        m = server.metrics()
        assert counter(m, "kiln_server_reference_info", model="m", source="traffic") == 1
        assert counter(m, "kiln_server_reference_samples", model="m") == 300
        assert counter(m, "kiln_server_drift_window_samples", model="m") == 50
        assert "reference: built from the first 300 samples of live traffic" in server.log
        send_images(server, traffic[350:650])
        calm = scores(server)
        assert max(calm.values()) < THRESHOLD, calm
        noisy = traffic[650:] + np.random.default_rng(0).normal(0, 0.5, traffic[650:].shape).astype(np.float32)
        send_images(server, noisy)
        assert scores(server)["channel0_std"] > 0.5
    finally:
        assert server.terminate() == 0, server.log


def test_reference_uri_overrides_the_artifact(tmp_path: Path, root: str):
    _, model = image_artifact(root)
    server = ServerProcess(
        tmp_path, image_artifact_without_profile(root), "--reference-uri", str(model.parent / P.PROFILE_FILE)
    ).start()
    try:
        server.wait_ready()
        m = server.metrics()
        assert counter(m, "kiln_server_reference_info", model="m", source="uri") == 1
        assert counter(m, "kiln_server_reference_samples", model="m") == len(digits_pixels()[0])
    finally:
        assert server.terminate() == 0, server.log


def test_a_reference_that_cannot_be_read_or_does_not_fit_is_a_startup_error(
    tmp_path: Path, root: str, text_uri: tuple[str, np.ndarray]
):
    uri, _ = image_artifact(root)
    missing = tmp_path / "nowhere.json"
    (tmp_path / "termination-log").write_text("")
    code, log, term = run_server(tmp_path, uri, "--reference-uri", str(missing))
    assert code == ExitCode.ARTIFACT, log
    assert f"--reference-uri {missing}: not found" in term
    # the text model's artifact holds a profile, but of a text model
    code, log, term = run_server(tmp_path, uri, "--reference-uri", text_uri[0])
    assert code == ExitCode.CONTRACT, log
    assert f"--reference-uri {text_uri[0]}: a profile of a text-classification model" in term
    # an artifact whose own profile names other classes
    import kiln_artifacts as ka

    src = tmp_path / "src"
    src.mkdir()
    art = ka.load(uri)
    for name in ("model.onnx", "kiln-model.json"):
        (src / name).write_bytes(art.read_bytes(name))
    prof = P.Profile.read(art.path(P.PROFILE_FILE))
    wrong = dict(prof.signals, prediction=P.Signal("categorical", (1,) * 10, labels=tuple("abcdefghij")))
    P.Profile(prof.task, prof.samples, wrong).write(src)
    bad = ka.publish(src, f"file://{tmp_path}/bad-profile", format="onnx", task="image-classification").uri
    code, log, term = run_server(tmp_path, bad)
    assert code == ExitCode.CONTRACT, log
    assert f"artifact {bad}: its classes" in term
    assert "differ from the model's" in term


def test_monitoring_off(tmp_path: Path, root: str):
    server = ServerProcess(tmp_path, image_artifact(root)[0], "--monitoring", "off").start()
    try:
        server.wait_ready()
        send_images(server, in_distribution(10, seed=6))
        names = {k.split("{")[0] for k in server.metrics()}
        assert "kiln_server_requests_total" in names
        assert not {n for n in names if "drift" in n or "anomalies" in n or "predictions" in n or "payload" in n}
    finally:
        assert server.terminate() == 0, server.log
