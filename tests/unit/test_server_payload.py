"""The payload log in real server processes on loopback: its batches load as verified dataset artifacts whose
records are what was sent and answered; SIGTERM publishes the partial batch; a full queue drops and counts;
named inputs are redacted or hashed; a SIGKILL mid-batch leaves no artifact that looks complete."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
from support.server import (
    DIGIT_LABELS,
    ServerProcess,
    counter,
    digits_pixels,
    image_artifact,
    image_request,
    text_request,
)
from support.waiting import wait_for

import kiln_artifacts as ka
from kiln_server.payload import RECORDS_FILE, REDACTED, sha256_of


def batches(store: Path) -> list[ka.LoadedArtifact]:
    """Every payload-log artifact under `store`, verified, in name order (time, then sequence)."""
    found = ka.list_artifacts(f"file://{store}")
    return [ka.load(info.uri, verify="full") for info in sorted(found, key=lambda i: i.uri)]


def records(art: ka.LoadedArtifact) -> list[dict]:
    return [json.loads(line) for line in art.read_bytes(RECORDS_FILE).decode().splitlines()]


def published(server: ServerProcess, n: int) -> None:
    wait_for(
        lambda: counter(server.metrics(), "kiln_server_payload_log_batches_total", model=server.name) >= n,
        what=f"{n} payload-log batches published",
        timeout=20,
        interval=0.05,
    )


def test_batches_are_verified_datasets_holding_what_was_sent(tmp_path: Path, root: str):
    uri, _ = image_artifact(root)
    store = tmp_path / "payloads"
    server = ServerProcess(
        tmp_path,
        uri,
        "--payload-log-rate",
        "1",
        "--payload-log-uri",
        f"file://{store}",
        "--payload-log-batch-records",
        "5",
        "--deployment",
        "digits",
        "--revision",
        "digits-abc",
        name="digits",
    ).start()
    sent: list[tuple[str, np.ndarray, dict]] = []
    try:
        server.wait_ready()
        digest = json.loads(server.request("GET", "/v2/models/digits")[2])["parameters"]["digest"]
        pixels = digits_pixels()[1]
        for i in range(12):
            x = pixels[3 * i : 3 * i + 1 + i % 3]
            status, doc = server.infer(image_request(x, id=f"r{i}"))
            assert status == 200, doc
            sent.append((f"r{i}", x, doc))
        published(server, 2)
        m = server.metrics()
        assert counter(m, "kiln_server_payload_log_records_total", model="digits") == 10
        assert counter(m, "kiln_server_payload_log_dropped_total", model="digits") == 0
        assert counter(m, "kiln_server_payload_log_errors_total", model="digits") == 0
    finally:
        assert server.terminate() == 0, server.log
    assert "payload log: publishing 2 held records" in server.log  # SIGTERM: the partial batch too
    arts = batches(store)
    assert [len(records(a)) for a in arts] == [5, 5, 2]
    for art in arts:
        name = art.uri.rsplit("/", 1)[1]
        assert name.startswith("digits-abc-20")
        man = art.manifest
        assert (man.kind, man.format, man.task) == ("dataset", "jsonl", "image-classification")
        assert man.lineage.parents == (digest,)  # the model that answered
        assert man.annotations["kiln.dev/revision"] == "digits-abc"
        assert man.annotations["kiln.dev/records"] == str(len(records(art)))
    got = [r for a in arts for r in records(a)]
    assert [r["request_id"] for r in got] == [s[0] for s in sent]
    for record, (_, x, doc) in zip(got, sent, strict=True):
        assert (record["model"], record["model_digest"]) == ("digits", digest)
        assert (record["deployment"], record["revision"]) == ("digits", "digits-abc")
        assert record["time"].endswith("Z")
        np.testing.assert_array_equal(np.array(record["inputs"]["pixel_values"], dtype=np.float32), x)
        logits = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(doc["outputs"][0]["shape"])
        np.testing.assert_array_equal(np.array(record["outputs"]["logits"], dtype=np.float32), logits)
        assert record["outputs"]["label"] == doc["outputs"][1]["data"]
        assert set(record["outputs"]["label"]) <= set(DIGIT_LABELS)


def test_a_full_queue_drops_and_counts_and_sigterm_publishes_what_it_held(tmp_path: Path, root: str):
    store = tmp_path / "payloads"
    server = ServerProcess(
        tmp_path,
        image_artifact(root)[0],
        "--payload-log-rate",
        "1",
        "--payload-log-uri",
        f"file://{store}",
        "--payload-log-batch-records",
        "10",
        "--payload-log-queue",
        "2",
    ).start()
    try:
        server.wait_ready()
        pixels = digits_pixels()[1]
        for i in range(5):
            status, _ = server.infer(image_request(pixels[i : i + 1], id=f"q{i}"))
            assert status == 200  # serving never waits for the log
        m = server.metrics()
        assert counter(m, "kiln_server_payload_log_dropped_total", model="m") == 3
        assert counter(m, "kiln_server_payload_log_batches_total", model="m") == 0
        assert not store.exists() or not ka.list_artifacts(f"file://{store}")
    finally:
        assert server.terminate() == 0, server.log
    arts = batches(store)
    assert len(arts) == 1
    assert [r["request_id"] for r in records(arts[0])] == ["q0", "q1"]


def test_named_inputs_are_redacted_or_hashed(tmp_path: Path, text_uri: tuple[str, np.ndarray]):
    store = tmp_path / "payloads"
    server = ServerProcess(
        tmp_path,
        text_uri[0],
        "--payload-log-rate",
        "1",
        "--payload-log-uri",
        f"file://{store}",
        "--payload-log-batch-records",
        "2",
        "--payload-log-redact",
        "attention_mask",
        "--payload-log-hash",
        "token_type_ids,text",
    ).start()
    try:
        server.wait_ready()
        ids = [[101, 2307, 2143, 102]]
        tokens = {
            "inputs": [
                {"name": "input_ids", "datatype": "INT64", "shape": [1, 4], "data": ids},
                {"name": "attention_mask", "datatype": "INT64", "shape": [1, 4], "data": [[1, 1, 1, 1]]},
                {"name": "token_type_ids", "datatype": "INT64", "shape": [1, 4], "data": [[0, 0, 0, 0]]},
            ],
            "id": "tokens",
        }
        assert server.infer(tokens)[0] == 200
        assert server.infer(text_request(["great film", "awful service"], id="text"))[0] == 200
        published(server, 1)
    finally:
        assert server.terminate() == 0, server.log
    (art,) = batches(store)
    first, second = records(art)
    assert first["inputs"] == {
        "input_ids": ids,
        "attention_mask": REDACTED,
        "token_type_ids": sha256_of([[0, 0, 0, 0]]),
    }
    assert second["inputs"] == {"text": sha256_of(["great film", "awful service"])}
    assert "great film" not in art.read_bytes(RECORDS_FILE).decode()
    assert len(second["outputs"]["label"]) == 2


def test_sigkill_mid_batch_leaves_no_partial_artifact(tmp_path: Path, root: str):
    store = tmp_path / "payloads"
    # One record a batch: publishes follow each other closely, so the kill is likely to land inside one.
    server = ServerProcess(
        tmp_path,
        image_artifact(root)[0],
        "--payload-log-rate",
        "1",
        "--payload-log-uri",
        f"file://{store}",
        "--payload-log-batch-records",
        "1",
        env={"TMPDIR": str(tmp_path)},
    ).start()
    stop = threading.Event()
    try:
        server.wait_ready()
        pixels = digits_pixels()[1]

        def traffic() -> None:
            i = 0
            while not stop.is_set():
                try:
                    server.infer(image_request(pixels[i % 100 : i % 100 + 4]))
                except OSError:
                    return
                i += 1

        thread = threading.Thread(target=traffic)
        thread.start()
        published(server, 5)
        server.kill()  # SIGKILL, with requests and publishes under way
        stop.set()
        thread.join(10)
    finally:
        stop.set()
        server.kill()
    complete = batches(store)  # every artifact listed loads and verifies in full
    assert len(complete) >= 5
    assert all(len(records(a)) == 1 for a in complete)
    # nothing else that could pass for an artifact: only complete ones and the staging area readers skip
    others = [p.name for p in store.iterdir() if not (p / ka.MANIFEST_NAME).is_file()]
    assert set(others) <= {".kiln-staging"}, others
