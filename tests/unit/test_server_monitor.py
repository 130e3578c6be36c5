"""Monitoring in-process, without server processes: the Monitor (window, scores at scrape time, anomalies,
predictions, a reference built from traffic, the age limit, failures that never reach serving), reading and
checking references, the payload log's writer (records, redaction and hashing, batches by count and time, a full
queue, publish errors) and the new flags."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import kiln_artifacts as ka
from kiln_artifacts import profile as P
from kiln_artifacts.contract import ExitCode
from kiln_server.config import UsageError, parse_config
from kiln_server.errors import StartupError
from kiln_server.metrics import Metrics, MonitorMetrics
from kiln_server.monitor import Monitor, check_profile, read_reference, signals_for
from kiln_server.payload import REDACTED, PayloadLog, Record, sha256_of, tensor_value
from kiln_server.protocol import Tensor

LABELS = ("a", "b", "c")
SIGNALS = signals_for("image-classification", (2, 6, 6))


def sample(rng: np.random.Generator, n: int, shift: float = 0.0) -> dict[str, np.ndarray]:
    logits = rng.normal(size=(n, 3)) * 2 + np.array([1.0, 0.0, -1.0])
    pixels = rng.normal(loc=shift, size=(n, 2, 6, 6)).astype(np.float32)
    return {**P.output_features(logits), **P.image_features(pixels)}


@pytest.fixture(scope="module")
def reference() -> P.Profile:
    return P.build("image-classification", sample(np.random.default_rng(0), 2000), LABELS, {"from": "test"})


def monitor(reference: P.Profile | None, clock: Any = None, **kw: Any) -> tuple[Monitor, Metrics]:
    metrics = Metrics("m", 8)
    mon = Monitor(
        task="image-classification",
        labels=LABELS,
        signals=SIGNALS,
        reference=reference,
        source="artifact" if reference is not None else "traffic",
        metrics=MonitorMetrics(metrics),
        **({"clock": clock} if clock else {}),
        **kw,
    )
    return mon, metrics


def value(metrics: Metrics, name: str, **labels: str) -> float | None:
    got = metrics.registry.get_sample_value(name, {"model": "m", **labels})
    return got


def test_scores_are_computed_at_scrape_time_low_in_distribution_high_on_a_shift(reference: P.Profile):
    mon, metrics = monitor(reference, window=500, min_samples=100, thresholds={"prediction": 0.3})
    assert value(metrics, "kiln_server_reference_info", source="artifact") == 1
    assert value(metrics, "kiln_server_reference_samples") == 2000
    assert value(metrics, "kiln_server_drift_min_samples") == 100
    assert value(metrics, "kiln_server_drift_threshold", signal="prediction") == 0.3
    assert value(metrics, "kiln_server_drift_threshold", signal="channel1_std") == 0.2
    for kind in P.ANOMALY_KINDS:
        assert value(metrics, "kiln_server_anomalies_total", kind=kind) == 0
    rng = np.random.default_rng(1)
    for _ in range(30):
        mon.observe(sample(rng, 25))
    assert value(metrics, "kiln_server_drift_score", signal="channel0_mean") == 0  # not scraped yet
    state = mon.update_metrics()
    assert state["samples"] == 500
    assert max(state["scores"].values()) < 0.15, state
    assert value(metrics, "kiln_server_drift_window_samples") == 500
    assert value(metrics, "kiln_server_drift_score", signal="confidence") == state["scores"]["confidence"]
    for _ in range(20):
        mon.observe(sample(rng, 25, shift=2.0))
    state = mon.update_metrics()
    assert state["scores"]["channel0_mean"] > 0.8
    assert state["scores"]["prediction"] < 0.15  # the logits did not move
    assert value(metrics, "kiln_server_anomalies_total", kind="input_out_of_range") >= 400
    total = sum(value(metrics, "kiln_server_predictions_total", **{"class": c}) or 0 for c in LABELS)
    assert total == 30 * 25 + 20 * 25


def test_a_traffic_reference_is_the_first_samples_exactly(caplog: pytest.LogCaptureFixture):
    mon, metrics = monitor(None, window=100, reference_samples=250)
    assert value(metrics, "kiln_server_reference_info", source="traffic") == 0
    assert all(math.isnan(v) for v in mon.update_metrics()["scores"].values())
    rng = np.random.default_rng(2)
    batches = [sample(rng, 40) for _ in range(7)]  # 280 samples: the 7th batch crosses 250
    batches[1]["confidence"][:5] = np.nan  # a NaN logit's row is left out of the reference
    with caplog.at_level(logging.INFO, logger="kiln_server"):
        for b in batches[:6]:
            mon.observe(b)
        assert value(metrics, "kiln_server_reference_samples") == 235
        assert mon.reference is None
        mon.observe(batches[6])
    assert mon.reference is not None
    assert mon.reference.samples == 250
    assert mon.reference.source == {"kind": "traffic"}
    assert "built from the first 250 samples of live traffic" in caplog.text
    assert value(metrics, "kiln_server_reference_info", source="traffic") == 1
    assert value(metrics, "kiln_server_reference_samples") == 250
    assert mon.update_metrics()["samples"] == 25  # the 7th batch's last 25 went to the window
    first = {n: np.concatenate([b[n][np.isfinite(b["confidence"])] for b in batches])[:250] for n in SIGNALS}
    assert mon.reference == P.build("image-classification", first, LABELS, {"kind": "traffic"})


def test_the_age_limit_empties_the_window_at_scrape_time(reference: P.Profile):
    now = [100.0]
    mon, metrics = monitor(reference, clock=lambda: now[0], window=1000, max_age=60)
    rng = np.random.default_rng(3)
    mon.observe(sample(rng, 30))
    now[0] = 130.0
    mon.observe(sample(rng, 20))
    assert mon.update_metrics()["samples"] == 50
    now[0] = 170.0
    assert mon.update_metrics()["samples"] == 20
    now[0] = 200.0
    assert mon.update_metrics()["samples"] == 0
    assert value(metrics, "kiln_server_drift_window_samples") == 0


def test_a_batch_that_cannot_be_observed_never_fails_serving(reference: P.Profile, caplog: pytest.LogCaptureFixture):
    mon, _ = monitor(reference)
    with caplog.at_level(logging.ERROR, logger="kiln_server"):
        mon.observe({"prediction": np.array([0])})  # signals missing
        mon.observe_images(np.zeros((1, 3)), np.zeros((1, 3)))  # not an image batch
    assert caplog.text.count("could not be observed") == 1


def test_concurrent_batches_are_all_counted(reference: P.Profile):
    mon, metrics = monitor(reference, window=10_000)
    batches = [sample(np.random.default_rng(i), 16) for i in range(4)]

    def run(b: dict[str, np.ndarray]) -> None:
        for _ in range(50):
            mon.observe(b)

    threads = [threading.Thread(target=run, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert mon.update_metrics()["samples"] == 4 * 50 * 16
    assert sum(value(metrics, "kiln_server_predictions_total", **{"class": c}) or 0 for c in LABELS) == 3200


def test_a_profile_must_fit_the_model(reference: P.Profile):
    check_profile(reference, "image-classification", LABELS, SIGNALS, "x")
    for args, message in [
        (("text-classification", LABELS, signals_for("text-classification", None)), "a profile of a image-class"),
        (("image-classification", ("x", "y", "z"), SIGNALS), "its classes ['a', 'b', 'c'] differ"),
        (("image-classification", LABELS, signals_for("image-classification", (1, 6, 6))), "channel1_mean"),
    ]:
        with pytest.raises(StartupError) as e:
            check_profile(reference, *args, "--reference-uri p")  # type: ignore[arg-type]
        assert e.value.code == ExitCode.CONTRACT
        assert message in e.value.message
        assert e.value.message.startswith("--reference-uri p: ")


def test_reference_uri_reads_a_file_a_folder_or_an_artifact(tmp_path: Path, reference: P.Profile):
    folder = tmp_path / "plain"
    folder.mkdir()
    path = reference.write(folder)
    assert read_reference(str(path)) == reference
    assert read_reference(f"file://{path}") == reference
    assert read_reference(str(folder)) == reference
    art = ka.publish(folder, f"file://{tmp_path}/art", format="json", kind="dataset", durable=False)
    assert read_reference(art.uri) == reference
    named = tmp_path / "named"
    named.mkdir()
    (named / "ref.json").write_text(json.dumps(reference.to_json()))
    art = ka.publish(
        named, f"file://{tmp_path}/named-art", format="json", annotations={P.PROFILE_ANNOTATION: "ref.json"}
    )
    assert read_reference(art.uri) == reference
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "x.txt").write_text("x")
    no_profile = ka.publish(tmp_path / "empty", f"file://{tmp_path}/no-profile", format="text").uri
    (tmp_path / "bad.json").write_text('{"schema": "kiln.dev/profile/v1"}')
    (tmp_path / "garbage.json").write_text("not json")
    for where, code, message in [
        (str(tmp_path / "missing.json"), ExitCode.ARTIFACT, "not found"),
        (f"file://{tmp_path}/missing", ExitCode.ARTIFACT, "not found"),
        (no_profile, ExitCode.CONTRACT, "the artifact holds no kiln-profile.json"),
        (str(tmp_path / "bad.json"), ExitCode.CONTRACT, "not a valid profile: task"),
        (str(tmp_path / "garbage.json"), ExitCode.CONTRACT, "not a profile (not JSON"),
        (str(tmp_path / "empty"), ExitCode.CONTRACT, "neither a profile file nor an artifact"),
    ]:
        with pytest.raises(StartupError) as e:
            read_reference(where)
        assert (e.value.code, e.value.message.split(": ")[0]) == (code, f"--reference-uri {where}"), e.value.message
        assert message in e.value.message


def test_reference_uri_on_s3_an_object_or_an_artifact(tmp_path: Path, s3_bucket: str, reference: P.Profile):
    folder = tmp_path / "src"
    folder.mkdir()
    reference.write(folder)
    art = ka.publish(folder, f"{s3_bucket}/profiles/art", format="json", kind="dataset")
    assert read_reference(art.uri) == reference
    from kiln_artifacts.storage import resolve

    loc = resolve(f"{s3_bucket}/profiles/bare.json")
    loc.fs.pipe_file(loc.path, json.dumps(reference.to_json()).encode())
    assert read_reference(f"{s3_bucket}/profiles/bare.json") == reference
    with pytest.raises(StartupError, match="not found"):
        read_reference(f"{s3_bucket}/profiles/none.json")


# ---------------------------------------------------------------------------------------------- payload log
class Published:
    """A stand-in for kiln_artifacts.publish: what each call got (its records read before the folder goes)."""

    def __init__(self, fail: list[BaseException] | None = None) -> None:
        self.calls: list[dict[str, Any]] = []
        self.fail = list(fail or [])
        self.event = threading.Event()

    def __call__(self, folder: Path, dest: str, **meta: Any) -> None:
        if self.fail:
            raise self.fail.pop(0)
        lines = (Path(folder) / "records.jsonl").read_text().splitlines()
        self.calls.append({"dest": dest, "records": [json.loads(x) for x in lines], **meta})
        self.event.set()


def payload_log(publish: Any = None, **kw: Any) -> tuple[PayloadLog, Metrics]:
    metrics = Metrics("m", 8)
    args: dict[str, Any] = {
        "uri": "file:///nowhere/payloads",
        "rate": 1.0,
        "batch_records": 3,
        "batch_seconds": 60.0,
        "queue": 100,
        "redact": (),
        "hash_inputs": (),
        "model_name": "m",
        "model_digest": "sha256:" + "0" * 64,
        "model_uri": "file:///models/m",
        "task": "text-classification",
        "labels": ("neg", "pos"),
        "deployment": "sentiment",
        "revision": "sentiment-abc",
        "metrics": MonitorMetrics(metrics),
        "publish": publish,
        "host": "Pod_7.example",
        **kw,
    }
    return PayloadLog(**args), metrics


def text_inputs(*texts: str) -> dict[str, Tensor]:
    return {"text": Tensor("text", "BYTES", (len(texts),), [t.encode() for t in texts])}


LOGITS = np.array([[0.5, -0.5]], dtype=np.float32)


@pytest.fixture
def started() -> Iterator[list[PayloadLog]]:
    logs: list[PayloadLog] = []
    yield logs
    for log_ in logs:
        log_.close(5)


def test_records_redact_and_hash_named_inputs():
    log_, _ = payload_log(redact=("secret",), hash_inputs=("user",))
    inputs = {
        "text": Tensor("text", "BYTES", (2, 1), [b"good", b"\xffbad"]),
        "ids": Tensor("ids", "INT64", (1, 2), np.array([[1, 2]], dtype=np.int64)),
        "secret": Tensor("secret", "BYTES", (1,), [b"password"]),
        "user": Tensor("user", "BYTES", (1,), [b"alice"]),
    }
    record = log_.record(Record(0.0, 0.0, "r1", inputs, np.array([[0.1, 0.9], [2.0, -1.0]], dtype=np.float32)))
    assert record["inputs"] == {
        "text": [["good"], ["\ufffdbad"]],
        "ids": [[1, 2]],
        "secret": REDACTED,
        "user": sha256_of(["alice"]),
    }
    assert sha256_of(["alice"]) == hashlib.sha256(b'["alice"]').hexdigest()
    assert record["outputs"]["label"] == ["pos", "neg"]
    assert record["time"] == "1970-01-01T00:00:00.000Z"
    assert (record["request_id"], record["revision"], record["deployment"]) == ("r1", "sentiment-abc", "sentiment")
    assert tensor_value(Tensor("t", "BYTES", (2, 0), [])) == [[], []]


def test_batches_by_count_then_by_time_then_on_close(started: list[PayloadLog]):
    published = Published()
    log_, metrics = payload_log(published, batch_records=3, batch_seconds=0.3)
    log_.start()
    started.append(log_)
    for i in range(4):
        assert log_.offer(f"r{i}", text_inputs(f"t{i}"), LOGITS)
    published.event.wait(5)
    assert [len(c["records"]) for c in published.calls] == [3]  # full: at once
    from support.waiting import wait_for

    wait_for(lambda: len(published.calls) == 2, what="the partial batch, by time", timeout=5, interval=0.02)
    assert [r["request_id"] for c in published.calls for r in c["records"]] == ["r0", "r1", "r2", "r3"]
    log_.offer("r4", text_inputs("t4"), LOGITS)
    assert log_.close(5)
    assert len(published.calls) == 3
    call = published.calls[0]
    assert (call["kind"], call["format"], call["task"]) == ("dataset", "jsonl", "text-classification")
    assert call["lineage"]["parents"] == ["sha256:" + "0" * 64]
    assert call["annotations"]["kiln.dev/records"] == "3"
    names = [c["dest"].rsplit("/", 1)[1] for c in published.calls]
    assert names == sorted(names)
    assert all(n.startswith("sentiment-abc-") and "-pod-7-example-" in n for n in names)
    assert value(metrics, "kiln_server_payload_log_records_total") == 5
    assert value(metrics, "kiln_server_payload_log_batches_total") == 3
    assert not log_.offer("late", text_inputs("x"), LOGITS)  # closed: dropped
    assert value(metrics, "kiln_server_payload_log_dropped_total") == 1


def test_a_full_queue_drops_without_waiting():
    log_, metrics = payload_log(Published(), queue=2, batch_records=10)  # writer not started: nothing drains
    assert [log_.offer(f"r{i}", text_inputs("x"), LOGITS) for i in range(5)] == [True, True, False, False, False]
    assert value(metrics, "kiln_server_payload_log_dropped_total") == 3
    assert log_.held == 2


def test_publish_errors_are_counted_and_logged_once_per_kind(caplog: pytest.LogCaptureFixture):
    published = Published(fail=[OSError("disk full"), OSError("disk full"), ka.PublishConflictError("held")])
    log_, metrics = payload_log(published, batch_records=1)
    batch = [Record(0.0, 0.0, f"r{i}", text_inputs("x"), LOGITS) for i in range(4)]
    with caplog.at_level(logging.WARNING, logger="kiln_server"):
        results = [log_.write([r]) for r in batch]
    assert [r is None for r in results] == [True, True, True, False]
    assert value(metrics, "kiln_server_payload_log_errors_total") == 3
    assert value(metrics, "kiln_server_payload_log_dropped_total") == 3
    assert value(metrics, "kiln_server_payload_log_batches_total") == 1
    assert caplog.text.count("OSError") == 2  # the message names it twice: once logged
    assert caplog.text.count("PublishConflictError") == 2
    bad = Record(0.0, 0.0, "nan", text_inputs("x"), np.array([[np.nan, 0.0]], dtype=np.float32))
    assert log_.write([bad, batch[0]]) is not None  # the non-finite record is left out, the rest published
    assert [r["request_id"] for r in published.calls[-1]["records"]] == ["r0"]
    assert value(metrics, "kiln_server_payload_log_dropped_total") == 4


def test_a_batch_is_a_verified_dataset_artifact(tmp_path: Path):
    log_, _ = payload_log(None, uri=f"file://{tmp_path}/payloads")
    dest = log_.write([Record(1.5e9, 0.0, "r0", text_inputs("great film"), LOGITS)])
    assert dest is not None
    art = ka.load(dest, verify="full")
    assert art.manifest.kind == "dataset"
    (line,) = art.read_bytes("records.jsonl").decode().splitlines()
    assert json.loads(line)["inputs"] == {"text": ["great film"]}


# ------------------------------------------------------------------------------------------------- flags
def test_monitoring_flags_and_variables():
    c = parse_config(["--model-uri", "file:///m"], {})
    assert (c.monitoring, c.drift_window, c.drift_min_samples, c.drift_threshold) == (True, 1000, 200, 0.2)
    assert (c.reference_samples, c.access_log_rate, c.payload_log_rate, c.payload_log_queue) == (1000, 0, 0, 10000)
    assert (c.payload_log_batch_records, c.payload_log_batch_seconds, c.drift_max_age) == (500, 60.0, 0.0)
    env = {
        "KILN_SERVER_MONITORING": "off",
        "KILN_SERVER_DRIFT_WINDOW": "50",
        "KILN_SERVER_DRIFT_MAX_AGE": "0",
        "KILN_SERVER_DRIFT_THRESHOLDS": "tokens=0.3, prediction=1",
        "KILN_SERVER_PAYLOAD_LOG_RATE": "0.1",
        "KILN_SERVER_PAYLOAD_LOG_URI": "s3://bucket/payloads",
        "KILN_SERVER_PAYLOAD_LOG_REDACT": "a, b",
        "KILN_SERVER_PAYLOAD_LOG_HASH": "c",
        "KILN_SERVER_DEPLOYMENT": "sentiment",
        "KILN_SERVER_REVISION": "sentiment-0123456789",
        "KILN_SERVER_REFERENCE_URI": "pvc://claim/profiles/p.json",
    }
    c = parse_config(["--model-uri", "file:///m", "--drift-window", "70"], env)
    assert (c.monitoring, c.drift_window, c.drift_thresholds) == (False, 70, (("prediction", 1.0), ("tokens", 0.3)))
    assert (c.payload_log_redact, c.payload_log_hash, c.revision) == (("a", "b"), ("c",), "sentiment-0123456789")
    assert c.reference_uri == "pvc://claim/profiles/p.json"
    for argv, env, message in [
        (["--drift-threshold", "0"], {}, "--drift-threshold: must be a number over 0 and at most 1 (got '0')"),
        (["--drift-thresholds", "tokens"], {}, "--drift-thresholds: must be signal=threshold pairs"),
        (["--drift-thresholds", "tokens=2"], {}, "--drift-thresholds: tokens: must be a number over 0"),
        ([], {"KILN_SERVER_ACCESS_LOG_RATE": "1.5"}, "KILN_SERVER_ACCESS_LOG_RATE: must be a number from 0 to 1"),
        (["--monitoring", "maybe"], {}, "--monitoring: must be on or off"),
        (["--drift-window", "0"], {}, "--drift-window: must be 1-1000000"),
        (["--payload-log-rate", "0.5"], {}, "--payload-log-uri (or $KILN_SERVER_PAYLOAD_LOG_URI) is required"),
        (["--payload-log-uri", "hf://org/name"], {}, "--payload-log-uri: "),
        (["--payload-log-uri", "/local/path"], {}, "--payload-log-uri: invalid URI"),
        (["--reference-uri", "ftp://x/y"], {}, "--reference-uri: invalid URI"),
        (["--payload-log-redact", "a", "--payload-log-hash", "a,b"], {}, "--payload-log-hash: 'a' is also in"),
        (["--revision", "a/b"], {}, "--revision: must be 1-253 ASCII letters"),
        (["--payload-log-batch-seconds", "0"], {}, "--payload-log-batch-seconds: must be a finite number > 0"),
    ]:
        with pytest.raises(UsageError) as e:
            parse_config(["--model-uri", "file:///m", *argv], env)
        assert message in str(e.value)
