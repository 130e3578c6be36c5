"""The Open Inference Protocol over gRPC: the generated module against its .proto, the request parser and response
encoder against tritonclient's own gRPC messages (a client nobody here wrote), fuzzing, and real server processes
on loopback driven by ``tritonclient.grpc``: results equal to running the model, errors as gRPC status codes,
deadlines, batching and metrics shared with REST, overload, and SIGTERM under gRPC load."""

from __future__ import annotations

import contextlib
import filecmp
import json
import socket
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
from google.protobuf.descriptor_pool import DescriptorPool
from google.protobuf.message_factory import GetMessageClass
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support.server import SENTENCES, ServerProcess, counter, image_artifact, run_server, wait_in_flight
from support.waiting import wait_for
from tritonclient.grpc import service_pb2
from tritonclient.grpc._utils import _get_inference_request
from tritonclient.utils import InferenceServerException

from kiln_artifacts.contract import ExitCode
from kiln_server.errors import BadRequest
from kiln_server.grpc_service import decode_message, encode_response, parse_request
from kiln_server.proto import open_inference_pb2 as pb
from kiln_server.protocol import OutputTensor

REPO = Path(__file__).resolve().parents[2]


def test_generated_module_matches_the_proto(tmp_path: Path):
    subprocess.run(
        ["bash", str(REPO / "hack/gen-proto.sh"), str(tmp_path)],
        check=True,
        env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable},
    )
    proto = REPO / "images/server/kiln_server/proto"
    for name in ("open_inference_pb2.py", "open_inference_pb2.pyi"):
        assert filecmp.cmp(tmp_path / name, proto / name, shallow=False), f"{name} is stale: run hack/gen-proto.sh"


# ------------------------------------------------------------------------------------------------ pure functions
def _triton_request(inputs: list[tg.InferInput], **kw: object) -> pb.ModelInferRequest:
    """tritonclient's own request message, re-read as Kiln's: the bytes on the wire are the same."""
    req = _get_inference_request(
        model_name="m",
        inputs=inputs,
        model_version="",
        request_id=kw.get("request_id", ""),
        outputs=kw.get("outputs"),
        sequence_id=0,
        sequence_start=False,
        sequence_end=False,
        priority=0,
        timeout=kw.get("timeout"),
        parameters=None,
    )
    return decode_message(pb.ModelInferRequest, req.SerializeToString())


def test_tritonclient_requests_parse_raw_and_typed():
    pixels = np.random.default_rng(0).standard_normal((2, 1, 8, 8)).astype(np.float32)
    raw = tg.InferInput("pixel_values", list(pixels.shape), "FP32")
    raw.set_data_from_numpy(pixels)
    texts = tg.InferInput("text", [2], "BYTES")
    texts.set_data_from_numpy(np.array(["héllo".encode(), b"x"], dtype=object))
    parsed = parse_request(
        _triton_request([raw, texts], request_id="r1", timeout=2500, outputs=[tg.InferRequestedOutput("logits")])
    )
    np.testing.assert_array_equal(parsed.inputs["pixel_values"].data, pixels)
    assert parsed.inputs["text"].data == ["héllo".encode(), b"x"]
    assert (parsed.id, parsed.timeout_us, parsed.outputs) == ("r1", 2500, {"logits": True})
    # typed contents (what other clients send): every datatype in its field
    msg = pb.ModelInferRequest(model_name="m")
    for name, datatype, field, values in [
        ("a", "INT8", "int_contents", [-128, 127]),
        ("b", "UINT16", "uint_contents", [0, 65535]),
        ("c", "INT64", "int64_contents", [-(2**63), 2**63 - 1]),
        ("d", "UINT64", "uint64_contents", [0, 2**64 - 1]),
        ("e", "FP32", "fp32_contents", [0.5, -1.5]),
        ("f", "FP64", "fp64_contents", [1e300, -2.0]),
        ("g", "BOOL", "bool_contents", [True, False]),
        ("h", "BYTES", "bytes_contents", [b"p", b"q"]),
    ]:
        t = msg.inputs.add(name=name, datatype=datatype, shape=[2])
        getattr(t.contents, field).extend(values)
    parsed = parse_request(msg)
    assert parsed.inputs["a"].data.dtype == np.int8
    assert parsed.inputs["a"].data.tolist() == [-128, 127]
    assert parsed.inputs["d"].data.tolist() == [0, 2**64 - 1]
    assert parsed.inputs["e"].data.dtype == np.float32
    assert parsed.inputs["g"].data.tolist() == [True, False]
    assert parsed.inputs["h"].data == [b"p", b"q"]


def _typed(datatype: str, shape: list[int], **contents: list) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    t = msg.inputs.add(name="x", datatype=datatype, shape=shape)
    for field, values in contents.items():
        getattr(t.contents, field).extend(values)
    return msg


def _raw(datatype: str, shape: list[int], data: bytes, n_raw: int = 1) -> pb.ModelInferRequest:
    msg = pb.ModelInferRequest(model_name="m")
    msg.inputs.add(name="x", datatype=datatype, shape=shape)
    msg.raw_input_contents.extend([data] * n_raw)
    return msg


@pytest.mark.parametrize(
    ("msg", "message"),
    [
        (pb.ModelInferRequest(model_name="m"), "inputs: must be a non-empty list"),
        (_typed("FP32", [2], fp32_contents=[1.0]), "fp32_contents: 1 elements, but shape [2] needs 2"),
        (_typed("FP32", [1], int_contents=[1]), "FP32 data goes in fp32_contents, got int_contents"),
        (_typed("INT8", [1], int_contents=[300]), "values out of range for INT8 (300..300)"),
        (_typed("FP16", [1]), "FP16 data must be sent in raw_input_contents"),
        (_typed("FLOAT", [1]), "datatype: must be one of"),
        (_typed("FP32", [-1], fp32_contents=[]), "shape[0]: must be an integer >= 0"),
        (_raw("FP32", [2], b"\0" * 7), "7 bytes of raw_input_contents, shape [2] of FP32 needs 8"),
        (_raw("FP32", [1], b"\0" * 4, n_raw=2), "raw_input_contents: 2 entries for 1 inputs"),
        (_raw("BYTES", [1], b"\5\0\0\0ab"), "BYTES element 0 says 5 bytes, only 2 left"),
        (_raw("BYTES", [2], b"\1\0\0\0a"), "holds 1 BYTES elements, the shape needs 2"),
    ],
)
def test_bad_requests_name_the_problem(msg: pb.ModelInferRequest, message: str):
    with pytest.raises(BadRequest) as e:
        parse_request(msg)
    assert message in e.value.message


def test_bad_parameters_and_outputs():
    msg = _typed("FP32", [1], fp32_contents=[1.0])
    msg.parameters["timeout"].string_param = "soon"
    with pytest.raises(BadRequest, match=r"parameters\.timeout: must be an integer"):
        parse_request(msg)
    msg = _typed("FP32", [1], fp32_contents=[1.0])
    msg.outputs.add(name="logits")
    msg.outputs.add(name="logits")
    with pytest.raises(BadRequest, match="output 'logits': requested twice"):
        parse_request(msg)
    both = _raw("FP32", [1], b"\0" * 4)
    both.inputs[0].contents.fp32_contents.append(1.0)
    with pytest.raises(BadRequest, match="has contents, but the request sends raw_input_contents"):
        parse_request(both)
    with pytest.raises(BadRequest, match="not a valid ModelInferRequest message"):
        decode_message(pb.ModelInferRequest, b"\x0a\xff\xff")


def test_responses_decode_with_tritonclient():
    logits = np.array([[0.25, -1.0], [3.0, 0.0]], dtype=np.float32)
    outputs = [OutputTensor("logits", "FP32", (2, 2), logits), OutputTensor("label", "BYTES", (2,), ["pos", "nég"])]
    body = encode_response("m", "1", "r9", outputs)
    result = tg.InferResult(service_pb2.ModelInferResponse.FromString(body))
    np.testing.assert_array_equal(result.as_numpy("logits"), logits)
    assert [x.decode() for x in result.as_numpy("label")] == ["pos", "nég"]
    assert result.get_response().id == "r9"


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=400))
def test_fuzz_arbitrary_bytes(raw: bytes):
    with contextlib.suppress(BadRequest):  # anything else (another exception) fails the test
        parse_request(decode_message(pb.ModelInferRequest, raw))


# --------------------------------------------------------------------------------------------------- servers


def _client(server: ServerProcess) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")


def _pixels_input(pixels: np.ndarray, name: str = "pixel_values") -> tg.InferInput:
    inp = tg.InferInput(name, list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels)
    return inp


def _status(e: pytest.ExceptionInfo[InferenceServerException]) -> str:
    return str(e.value.status())


def test_tritonclient_grpc_health_metadata_and_infer(image_server: ServerProcess, onnx_image: ort.InferenceSession):
    client = _client(image_server)
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready("digits")
    assert client.is_model_ready("digits", "1")
    assert client.get_server_metadata().name == "kiln-server"
    meta = client.get_model_metadata("digits")
    assert (meta.name, list(meta.versions), meta.platform) == ("digits", ["1"], "onnxruntime_onnx")
    assert [(t.name, t.datatype, list(t.shape)) for t in meta.inputs] == [("pixel_values", "FP32", [-1, 1, 8, 8])]
    assert [(t.name, t.datatype) for t in meta.outputs] == [("logits", "FP32"), ("label", "BYTES")]
    with pytest.raises(InferenceServerException) as e:
        client.get_model_metadata("other")
    assert (_status(e), "unknown model 'other'" in e.value.message()) == ("StatusCode.NOT_FOUND", True)
    with pytest.raises(InferenceServerException) as e:
        client.is_model_ready("digits", "7")
    assert _status(e) == "StatusCode.NOT_FOUND"

    pixels = np.random.default_rng(1).standard_normal((3, 1, 8, 8)).astype(np.float32)
    expected = onnx_image.run(["logits"], {"pixel_values": pixels})[0]
    result = client.infer("digits", [_pixels_input(pixels)], request_id="g-1")
    np.testing.assert_allclose(result.as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    assert [x.decode() for x in result.as_numpy("label")] == [str(i) for i in expected.argmax(axis=1)]
    assert result.get_response().id == "g-1"
    only = client.infer("digits", [_pixels_input(pixels)], outputs=[tg.InferRequestedOutput("label")])
    assert [o.name for o in only.get_response().outputs] == ["label"]
    # typed contents instead of raw bytes: the same answer
    msg = pb.ModelInferRequest(model_name="digits")
    msg.inputs.add(name="pixel_values", datatype="FP32", shape=pixels.shape).contents.fp32_contents.extend(
        pixels.ravel().tolist()
    )
    typed = client._client_stub.ModelInfer(service_pb2.ModelInferRequest.FromString(msg.SerializeToString()))
    np.testing.assert_allclose(tg.InferResult(typed).as_numpy("logits"), expected, rtol=1e-5, atol=1e-5)
    client.close()


def test_grpc_metadata_says_what_rest_says(image_server: ServerProcess):
    """Server metadata's extensions and the model's parameters (digest, task, providers, ...) over gRPC as over
    REST: parameters in the specification's ModelMetadataResponse.properties (strings; other values as JSON)."""
    rest_server = json.loads(image_server.request("GET", "/v2")[2])
    rest_model = json.loads(image_server.request("GET", "/v2/models/digits")[2])
    client = _client(image_server)
    assert list(client.get_server_metadata().extensions) == rest_server["extensions"]
    client.close()
    with grpc.insecure_channel(f"127.0.0.1:{image_server.grpc_port}") as channel:
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelMetadata", response_deserializer=pb.ModelMetadataResponse.FromString
        )
        meta = call(pb.ModelMetadataRequest(name="digits").SerializeToString(), timeout=30)
    expected = {k: v if isinstance(v, str) else json.dumps(v) for k, v in rest_model["parameters"].items()}
    assert dict(meta.properties) == expected
    assert json.loads(meta.properties["execution_providers"]) == ["CPUExecutionProvider"]
    assert meta.properties["digest"].startswith("sha256:")


def test_grpc_reflection_describes_the_service(image_server: ServerProcess):
    """What grpcurl does without the .proto: list the services, fetch their descriptors by reflection and call
    ModelInfer with a message built from them alone. The names are the specification's (package ``inference``)."""
    with grpc.insecure_channel(f"127.0.0.1:{image_server.grpc_port}") as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "inference.GRPCInferenceService" in set(database.get_services())
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("inference.GRPCInferenceService")
        methods = {m.name: (m.input_type.full_name, m.output_type.full_name) for m in service.methods}
        assert methods == {
            name: (f"inference.{name}Request", f"inference.{name}Response")
            for name in ("ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelInfer")
        }
        properties = pool.FindMessageTypeByName("inference.ModelMetadataResponse").fields_by_name["properties"]
        assert (properties.number, properties.message_type.GetOptions().map_entry) == (6, True)
        infer = service.methods_by_name["ModelInfer"]
        request_class = GetMessageClass(infer.input_type)
        response_class = GetMessageClass(infer.output_type)
        request = request_class(model_name="digits")
        tensor = request.inputs.add(name="pixel_values", datatype="FP32", shape=[1, 1, 8, 8])
        tensor.contents.fp32_contents.extend([0.0] * 64)
        call = channel.unary_unary(
            "/inference.GRPCInferenceService/ModelInfer",
            request_serializer=request_class.SerializeToString,
            response_deserializer=response_class.FromString,
        )
        response = call(request, timeout=30)
    assert [(o.name, list(o.shape)) for o in response.outputs] == [("logits", [1, 10]), ("label", [1])]


def test_grpc_errors_are_status_codes_naming_the_problem(image_server: ServerProcess):
    client = _client(image_server)
    before = image_server.metrics()
    pixels = np.zeros((1, 1, 8, 8), dtype=np.float32)
    cases = [
        ([_pixels_input(pixels, "image")], "this model takes exactly 'pixel_values', got 'image'"),
        ([_pixels_input(np.zeros((1, 1, 8, 7), np.float32))], "shape must be [-1, 1, 8, 8]"),
        ([_pixels_input(np.zeros((17, 1, 8, 8), np.float32))], "17 samples is over this server's limit of 16"),
        ([_pixels_input(np.full((1, 1, 8, 8), np.nan, np.float32))], "values must be finite"),
    ]
    for inputs, message in cases:
        with pytest.raises(InferenceServerException) as e:
            client.infer("digits", inputs)
        assert _status(e) == "StatusCode.INVALID_ARGUMENT", e.value
        assert message in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [_pixels_input(pixels)], outputs=[tg.InferRequestedOutput("probs")])
    assert "output 'probs': unknown" in e.value.message()
    with pytest.raises(InferenceServerException) as e:
        client.infer("nope", [_pixels_input(pixels)])
    assert _status(e) == "StatusCode.NOT_FOUND"
    # over --max-body-bytes (200000): grpcio refuses the message before it is read
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [_pixels_input(np.zeros((16, 1, 64, 64), np.float32))])
    assert _status(e) == "StatusCode.RESOURCE_EXHAUSTED"
    # not a ModelInferRequest at all
    raw = client._channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
    with pytest.raises(grpc.RpcError) as rpc:
        raw(b"\x0a\xff\xff", timeout=10)
    assert rpc.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid ModelInferRequest" in rpc.value.details()
    # the server keeps serving; errors counted by the HTTP status they stand for
    assert client.infer("digits", [_pixels_input(pixels)]).as_numpy("logits").shape == (1, 10)
    after = image_server.metrics()

    def delta(code: str) -> float:
        return counter(after, "kiln_server_requests_total", model="digits", code=code) - counter(
            before, "kiln_server_requests_total", model="digits", code=code
        )

    assert (delta("400"), delta("404"), delta("200")) == (len(cases) + 2, 1, 1)
    client.close()


def test_grpc_deadlines(image_server: ServerProcess):
    client = _client(image_server)
    inp = _pixels_input(np.zeros((1, 1, 8, 8), dtype=np.float32))
    before = image_server.metrics()
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [inp], timeout=1)  # the request's "timeout" parameter: 1 microsecond
    assert _status(e) == "StatusCode.DEADLINE_EXCEEDED"
    # the server's queue delay is 100 ms: a 20 ms gRPC deadline passes while the request waits for its batch
    with pytest.raises(InferenceServerException) as e:
        client.infer("digits", [inp], client_timeout=0.02)
    assert _status(e) == "StatusCode.DEADLINE_EXCEEDED"
    assert client.infer("digits", [inp], client_timeout=30).as_numpy("logits").shape == (1, 10)
    wait_for(
        lambda: (
            counter(image_server.metrics(), "kiln_server_requests_total", model="digits", code="504")
            - counter(before, "kiln_server_requests_total", model="digits", code="504")
            == 2
        ),
        what="both deadline misses counted as 504",
        timeout=10,
    )
    client.close()


def _text_input(texts: list[str]) -> tg.InferInput:
    inp = tg.InferInput("text", [len(texts)], "BYTES")
    inp.set_data_from_numpy(np.array([t.encode() for t in texts], dtype=object))
    return inp


def test_grpc_text_requests_are_merged_and_exact(tmp_path: Path, text_uri: tuple[str, np.ndarray]):
    uri, expected = text_uri
    server = ServerProcess(tmp_path, uri, "--max-batch-size", "8", "--max-queue-delay-ms", "100").start()
    try:
        server.wait_ready()
        client = _client(server)
        result = client.infer("m", [_text_input(SENTENCES)])
        np.testing.assert_allclose(result.as_numpy("logits"), expected, atol=2e-4)
        before = server.metrics()
        with ThreadPoolExecutor(len(SENTENCES)) as pool:
            answers = list(pool.map(lambda s: client.infer("m", [_text_input([s])]).as_numpy("logits"), SENTENCES))
        for got, row in zip(answers, expected, strict=True):
            np.testing.assert_allclose(got[0], row, atol=2e-4)
        after = server.metrics()
        batches = counter(after, "kiln_server_batch_size_count", model="m") - counter(
            before, "kiln_server_batch_size_count", model="m"
        )
        assert batches < len(SENTENCES), f"{batches} batches for {len(SENTENCES)} concurrent gRPC requests"
        assert counter(after, "kiln_server_requests_total", model="m", code="200") - counter(
            before, "kiln_server_requests_total", model="m", code="200"
        ) == len(SENTENCES)
        client.close()
    finally:
        assert server.terminate() == 0, server.log


def test_grpc_overload_and_sigterm_under_load(tmp_path: Path, text_uri: tuple[str, np.ndarray]):
    uri, expected = text_uri
    long = SENTENCES[3]
    server = ServerProcess(
        tmp_path, uri, "--max-batch-size", "1", "--max-queue-size", "2", "--shutdown-delay-s", "1", "--grace-period-s",
        "60",
    ).start()  # fmt: skip
    try:
        server.wait_ready()
        client = _client(server)

        def call(_i: int) -> str:
            try:
                client.infer("m", [_text_input([long])])
                return "ok"
            except InferenceServerException as e:
                return f"{e.status()}: {e.message()}"

        with ThreadPoolExecutor(24) as pool:
            results = list(pool.map(call, range(48)))
        refused = [r for r in results if r != "ok"]
        assert refused, "a queue of 2 and 24 concurrent clients: some calls must be refused"
        assert all(r.startswith("StatusCode.UNAVAILABLE: queue full") for r in refused), refused
        assert results.count("ok") >= 3
        assert client.infer("m", [_text_input([long])]).as_numpy("logits").shape == (1, 2)  # recovered
        client.close()
    finally:
        server.kill()

    # SIGTERM with gRPC calls in flight: every accepted call is answered, then the process exits 0
    server = ServerProcess(
        tmp_path, uri, "--max-batch-size", "1", "--shutdown-delay-s", "1", "--grace-period-s", "60"
    ).start()
    try:
        server.wait_ready()
        client = _client(server)
        with ThreadPoolExecutor(16) as pool:
            futures = [
                pool.submit(lambda: client.infer("m", [_text_input([long])]).as_numpy("logits")) for _ in range(16)
            ]
            inflight = wait_in_flight(server, futures, 12)
            assert server.proc is not None
            server.proc.send_signal(15)
            wait_for(lambda: not client.is_server_ready(), what="not ready after SIGTERM", timeout=5)
            answers = [f.result(timeout=60) for f in futures]
        assert inflight >= 12, f"only {inflight} calls in flight at SIGTERM: the test did not test a drain"
        index = SENTENCES.index(long)
        for got in answers:
            np.testing.assert_allclose(got[0], expected[index], atol=2e-4)
        assert server.proc.wait(60) == 0, server.log
        client.close()
    finally:
        server.kill()


def test_grpc_port_in_use_refuses_to_start_and_off_serves_rest_only(tmp_path: Path, root: str):
    uri, _ = image_artifact(root)
    (tmp_path / "termination-log").write_text("")  # the kubelet creates it; the server only writes to it
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        code, log, term = run_server(tmp_path, uri, "--grpc-port", str(port))
    assert code == ExitCode.PORT, log
    assert f"cannot listen on 127.0.0.1:{port} (gRPC)" in term
    server = ServerProcess(tmp_path, uri, "--grpc-port", "off").start()
    try:
        server.wait_ready()
        assert "off (gRPC)" in server.log
        with socket.socket() as s:
            assert s.connect_ex(("127.0.0.1", server.grpc_port)) != 0  # nothing listens there
    finally:
        assert server.terminate() == 0, server.log
