"""The Open Inference Protocol over gRPC (``inference.GRPCInferenceService``, KServe V2) on its own port: the same
model, batcher, limits, deadlines and metrics as REST (app.Server). Request bytes are decoded here, not by grpcio,
so a malformed message is INVALID_ARGUMENT naming the problem, never grpcio's INTERNAL. Pure functions turn a
ModelInferRequest into protocol.InferRequest and outputs into a ModelInferResponse (tested without a server)."""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Awaitable, Callable, Iterable
from typing import TYPE_CHECKING, Any

import grpc
import numpy as np
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc_reflection.v1alpha import reflection, reflection_pb2

from . import __version__
from .auth import Decision, ReviewError
from .errors import BadRequest, RequestError
from .proto import open_inference_pb2 as pb
from .protocol import (
    DATATYPES,
    DTYPES,
    EXTENSIONS,
    InferRequest,
    OutputTensor,
    Tensor,
    check_name,
    parse_shape,
    raw_bytes,
    split_bytes,
)

if TYPE_CHECKING:
    from .app import Server

log = logging.getLogger("kiln_server")

SERVICE = "inference.GRPCInferenceService"
PACKAGE = "inference"  # the specification's, under which reflection describes the service and its messages
SPEC_FILE = "open_inference_grpc.proto"  # the specification's file name, likewise
# method -> (request, response): what reflection tells clients (the handlers decode the bytes themselves)
METHODS: dict[str, tuple[type[Message], type[Message]]] = {
    "ServerLive": (pb.ServerLiveRequest, pb.ServerLiveResponse),
    "ServerReady": (pb.ServerReadyRequest, pb.ServerReadyResponse),
    "ModelReady": (pb.ModelReadyRequest, pb.ModelReadyResponse),
    "ServerMetadata": (pb.ServerMetadataRequest, pb.ServerMetadataResponse),
    "ModelMetadata": (pb.ModelMetadataRequest, pb.ModelMetadataResponse),
    "ModelInfer": (pb.ModelInferRequest, pb.ModelInferResponse),
}

# A request error's HTTP status -> the gRPC code (as Triton's and KServe's gRPC servers answer). A full queue is
# UNAVAILABLE, the code gRPC clients retry, rather than RESOURCE_EXHAUSTED (a quota, not retried by default).
CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.UNAVAILABLE,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}

# datatype -> the InferTensorContents field that carries it (FP16 has none: raw_input_contents only)
CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def _parameter(p: pb.InferParameter) -> Any:
    which = p.WhichOneof("parameter_choice")
    return None if which is None else getattr(p, which)


def _contents(where: str, tensor: pb.ModelInferRequest.InferInputTensor, count: int) -> np.ndarray | list[bytes]:
    datatype, shape = tensor.datatype, tuple(tensor.shape)
    field = CONTENTS.get(datatype)
    given = [f.name for f, _ in tensor.contents.ListFields()]
    if field is None:
        raise BadRequest(f"{where}: {datatype} data must be sent in raw_input_contents (it has no contents field)")
    others = [g for g in given if g != field]
    if others:
        raise BadRequest(f"{where}.contents: {datatype} data goes in {field}, got {', '.join(others)}")
    values = getattr(tensor.contents, field)
    if len(values) != count:
        raise BadRequest(f"{where}.contents.{field}: {len(values)} elements, but shape {list(shape)} needs {count}")
    if datatype == "BYTES":
        return list(values)
    dtype = DTYPES[datatype]
    if dtype.kind in "iu" and dtype.itemsize < 8:  # int_contents and uint_contents carry the narrower types too
        wide = np.array(values, dtype=np.int64)
        info = np.iinfo(dtype)
        if wide.size and (wide.min() < info.min or wide.max() > info.max):
            raise BadRequest(
                f"{where}.contents.{field}: values out of range for {datatype} ({wide.min()}..{wide.max()})"
            )
        return wide.astype(dtype).reshape(shape)
    return np.array(values, dtype=dtype).reshape(shape)


def parse_request(msg: pb.ModelInferRequest) -> InferRequest:
    """A ModelInferRequest as protocol.InferRequest, checked as the REST parser checks JSON (names, datatypes,
    shapes, element counts and byte sizes); every problem is a BadRequest naming the field and the rule."""
    if not msg.inputs:
        raise BadRequest("inputs: must be a non-empty list of tensors")
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise BadRequest(f"raw_input_contents: {len(raw)} entries for {len(msg.inputs)} inputs (one per input)")
    inputs: dict[str, Tensor] = {}
    for i, t in enumerate(msg.inputs):
        name = check_name(f"inputs[{i}]", t.name)
        where = f"input {name!r}"
        if name in inputs:
            raise BadRequest(f"{where}: given twice")
        if t.datatype not in DATATYPES:
            raise BadRequest(f"{where}.datatype: must be one of {', '.join(DATATYPES)}, got {t.datatype!r}"[:300])
        shape = parse_shape(where, list(t.shape))
        count = math.prod(shape)
        data: np.ndarray | list[bytes]
        if raw:
            if t.HasField("contents"):
                raise BadRequest(f"{where}: has contents, but the request sends raw_input_contents")
            chunk = raw[i]
            if t.datatype == "BYTES":
                data = split_bytes(f"{where} raw_input_contents", chunk, count)
            else:
                dtype = DTYPES[t.datatype]
                if len(chunk) != count * dtype.itemsize:
                    raise BadRequest(
                        f"{where}: {len(chunk)} bytes of raw_input_contents, shape {list(shape)} of {t.datatype} "
                        f"needs {count * dtype.itemsize}"
                    )
                data = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        else:
            data = _contents(where, t, count)
        inputs[name] = Tensor(name, t.datatype, shape, data)

    outputs: dict[str, bool] | None = None
    if msg.outputs:
        outputs = {}
        for i, o in enumerate(msg.outputs):
            name = check_name(f"outputs[{i}]", o.name)
            if name in outputs:
                raise BadRequest(f"output {name!r}: requested twice")
            outputs[name] = True
    params = {k: _parameter(v) for k, v in msg.parameters.items()}
    timeout = params.get("timeout")
    if timeout is not None and (not isinstance(timeout, int) or isinstance(timeout, bool) or timeout < 0):
        raise BadRequest(f"parameters.timeout: must be an integer >= 0 (microseconds), got {timeout!r}"[:300])
    return InferRequest(msg.id or None, inputs, outputs, True, timeout, params)


def encode_response(model: str, version: str, request_id: str | None, outputs: list[OutputTensor]) -> bytes:
    """A serialized ModelInferResponse; every output in raw_output_contents (what tritonclient reads fastest)."""
    resp = pb.ModelInferResponse(model_name=model, model_version=version, id=request_id or "")
    for out in outputs:
        resp.outputs.add(name=out.name, datatype=out.datatype, shape=list(out.shape))
        resp.raw_output_contents.append(raw_bytes(out))
    return resp.SerializeToString()


def properties(parameters: dict[str, Any]) -> dict[str, str]:
    """REST's model metadata ``parameters`` as ModelMetadataResponse.properties (a string map): strings as they
    are, other values (lists, numbers) as JSON; none is left out."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in parameters.items()}


def _rename(messages: Iterable[descriptor_pb2.DescriptorProto], old: str, new: str) -> None:
    for message in messages:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old) :]
        _rename(message.nested_type, old, new)


def reflection_pool() -> descriptor_pool.DescriptorPool:
    """The descriptors gRPC reflection serves: the service and its messages as the specification names them,
    package ``inference`` (the generated module's package is Kiln's own, see open_inference.proto), and the
    reflection service's own. A pool apart from protobuf's default one, where the service's name and a client's
    generated ``inference.*`` classes could clash."""
    spec = descriptor_pb2.FileDescriptorProto()
    pb.DESCRIPTOR.CopyToProto(spec)
    _rename(spec.message_type, f".{spec.package}.", f".{PACKAGE}.")
    spec.name, spec.package = SPEC_FILE, PACKAGE
    service = spec.service.add(name=SERVICE.rsplit(".", 1)[1])
    for name, (request, response) in METHODS.items():
        service.method.add(
            name=name,
            input_type=f".{PACKAGE}.{request.DESCRIPTOR.name}",
            output_type=f".{PACKAGE}.{response.DESCRIPTOR.name}",
        )
    own = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(own)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(spec)
    pool.Add(own)
    return pool


def enable_reflection(server: grpc.aio.Server) -> None:
    """gRPC server reflection (grpc.reflection.v1alpha), so that generic clients (grpcurl, Postman) call the service
    without its .proto. Open like the health methods: it tells the public specification, no model or data."""
    reflection.enable_server_reflection([SERVICE, reflection.SERVICE_NAME], server, pool=reflection_pool())


def decode_message(kind: type[Message], raw: bytes) -> Any:
    try:
        return kind.FromString(raw)
    except (DecodeError, ValueError) as e:
        raise BadRequest(f"request: not a valid {kind.DESCRIPTOR.name} message ({e})"[:300]) from None


class GrpcService:
    """The six methods of inference.GRPCInferenceService over an app.Server."""

    def __init__(self, server: Server) -> None:
        self.server = server

    async def authorize(self, context: grpc.aio.ServicerContext) -> str | None:
        """With --auth kubernetes, the caller's user, or the call aborted (UNAUTHENTICATED, PERMISSION_DENIED, or
        UNAVAILABLE when the API server cannot be asked), as REST answers 401, 403, 503. Checked in the method
        itself rather than by an interceptor: no extra handler lookup per call, and the user reaches the access
        log."""
        auth = self.server.auth
        if auth is None:
            return None
        header = None
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                header = value if isinstance(value, str) else None
                break
        try:
            decision = auth.cached(header) or await auth.authorize(header)
        except ReviewError as e:
            decision = Decision(503, None, e.client_message)
        if decision.status != 200:
            log.debug("gRPC %s", decision.message)
            await context.abort(CODES[decision.status], decision.message)
        return decision.user

    def _unary(
        self, kind: type[Message], fn: Callable[[Any], Awaitable[Message]], *, open_: bool = False
    ) -> grpc.RpcMethodHandler:
        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if not open_:
                await self.authorize(context)
            try:
                return (await fn(decode_message(kind, raw))).SerializeToString()
            except RequestError as e:
                await context.abort(CODES.get(e.status, grpc.StatusCode.UNKNOWN), e.message)

        return grpc.unary_unary_rpc_method_handler(handle)  # bytes in, bytes out: decoding is ours

    def handler(self) -> grpc.GenericRpcHandler:
        # Health is open, as REST's probes are: what the kubelet or a mesh checks carries no token.
        methods = {
            "ServerLive": self._unary(pb.ServerLiveRequest, self.server_live, open_=True),
            "ServerReady": self._unary(pb.ServerReadyRequest, self.server_ready, open_=True),
            "ModelReady": self._unary(pb.ModelReadyRequest, self.model_ready, open_=True),
            "ServerMetadata": self._unary(pb.ServerMetadataRequest, self.server_metadata),
            "ModelMetadata": self._unary(pb.ModelMetadataRequest, self.model_metadata),
            "ModelInfer": grpc.unary_unary_rpc_method_handler(self.model_infer),
        }
        assert methods.keys() == METHODS.keys()  # what reflection describes is what is served
        return grpc.method_handlers_generic_handler(SERVICE, methods)

    async def server_live(self, _req: pb.ServerLiveRequest) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=True)

    async def server_ready(self, _req: pb.ServerReadyRequest) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.server.ready)

    async def model_ready(self, req: pb.ModelReadyRequest) -> pb.ModelReadyResponse:
        self.server.check_model(req.name, req.version or None)
        return pb.ModelReadyResponse(ready=self.server.ready)

    async def server_metadata(self, _req: pb.ServerMetadataRequest) -> pb.ServerMetadataResponse:
        return pb.ServerMetadataResponse(name="kiln-server", version=__version__, extensions=EXTENSIONS)

    async def model_metadata(self, req: pb.ModelMetadataRequest) -> pb.ModelMetadataResponse:
        self.server.check_model(req.name, req.version or None)
        meta = self.server.metadata()
        tensor = pb.ModelMetadataResponse.TensorMetadata
        return pb.ModelMetadataResponse(
            name=meta["name"],
            versions=meta["versions"],
            platform=meta["platform"],
            inputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["inputs"]],
            outputs=[tensor(name=t["name"], datatype=t["datatype"], shape=t["shape"]) for t in meta["outputs"]],
            properties=properties(meta["parameters"]),
        )

    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
        server = self.server
        user = await self.authorize(context) if server.auth is not None else None
        with server.tracked("grpc") as outcome:
            outcome.user = user
            try:
                outcome.request_id = _request_id(context)
                msg = decode_message(pb.ModelInferRequest, raw)
                server.check_model(msg.model_name, msg.model_version or None)
                parsed = parse_request(msg)
                deadline = server.deadline(outcome.started, context.time_remaining(), parsed.timeout_us)
                outputs = await server.predict(parsed, deadline, outcome)
                body = encode_response(server.model.name, server.model.version, parsed.id, outputs)
            except RequestError as e:
                outcome.status = e.status
                await context.abort(CODES.get(e.status, grpc.StatusCode.UNKNOWN), e.message)
            except asyncio.CancelledError:  # the client cancelled, or its deadline passed while we waited
                remaining = context.time_remaining()
                outcome.status = 504 if remaining is not None and remaining <= 0 else 499
                raise
            except Exception as e:  # a bug: answer, log, keep serving
                log.exception("unexpected error in gRPC ModelInfer")
                await context.abort(grpc.StatusCode.INTERNAL, f"internal error: {type(e).__name__}")
            outcome.status = 200
            return body


def _request_id(context: grpc.aio.ServicerContext) -> str | None:
    """The call's ``x-request-id`` metadata, as REST's X-Request-Id header (the message's ``id`` wins over it)."""
    for key, value in context.invocation_metadata() or ():
        if key == "x-request-id" and value:
            return str(value)[:256]
    return None
