"""Open Inference Protocol (KServe V2) request parsing and response encoding, with the binary tensor data
extension (what ``tritonclient.http`` sends by default). Pure functions: every problem in a request body is a
BadRequest naming the field and the rule, never another exception (fuzzed in tests/unit/test_server_protocol.py).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import BadRequest

# OIP datatype -> numpy dtype (little-endian, as the binary extension specifies). BYTES is handled apart.
DTYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
}
DATATYPES = (*DTYPES, "BYTES")
# The protocol extensions server metadata lists, over REST and gRPC alike (Triton too reports one list for both).
EXTENSIONS = ["binary_tensor_data", "model_configuration"]
MAX_DIMS = 8
MAX_ELEMENTS = 1 << 28
MAX_NAME = 256


@dataclass
class Tensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    # numeric: a numpy array of `shape`; BYTES: the flattened elements, row-major
    data: np.ndarray | list[bytes]


@dataclass
class InferRequest:
    id: str | None
    inputs: dict[str, Tensor]
    outputs: dict[str, bool] | None  # requested output name -> binary; None: all outputs
    binary_output: bool = False  # request parameter binary_data_output (default for outputs not listed)
    timeout_us: int | None = None  # request parameter "timeout" (microseconds, as Triton / tritonclient)
    parameters: dict[str, Any] = field(default_factory=dict)


def _loads(text: bytes) -> Any:
    try:
        return json.loads(text)
    except RecursionError:
        raise BadRequest("request body: JSON nested too deeply") from None
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body: not UTF-8 ({e.reason} at byte {e.start})") from None
    except ValueError as e:
        raise BadRequest(f"request body: malformed JSON ({e})") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def parse_shape(where: str, value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise BadRequest(f"{where}.shape: must be a list of integers, got {type(value).__name__}")
    if len(value) > MAX_DIMS:
        raise BadRequest(f"{where}.shape: at most {MAX_DIMS} dimensions, got {len(value)}")
    dims: list[int] = []
    for i, d in enumerate(value):
        if not _is_int(d) or d < 0:
            raise BadRequest(f"{where}.shape[{i}]: must be an integer >= 0, got {d!r}"[:300])
        if d > MAX_ELEMENTS:
            raise BadRequest(f"{where}.shape[{i}]: {d} is over the limit of {MAX_ELEMENTS}")
        dims.append(d)
    if math.prod(dims) > MAX_ELEMENTS:
        raise BadRequest(f"{where}.shape: {math.prod(dims)} elements is over the limit of {MAX_ELEMENTS}")
    return tuple(dims)


def _flatten_bytes(where: str, data: Any, out: list[bytes], depth: int = 0) -> None:
    if depth > MAX_DIMS:
        raise BadRequest(f"{where}.data: nested deeper than {MAX_DIMS} levels")
    for item in data:
        if isinstance(item, str):
            out.append(item.encode("utf-8", "surrogatepass"))
        elif isinstance(item, list):
            _flatten_bytes(where, item, out, depth + 1)
        else:
            raise BadRequest(f"{where}.data: BYTES elements must be strings, got {type(item).__name__}")


def _json_numeric(where: str, datatype: str, data: Any, shape: tuple[int, ...]) -> np.ndarray:
    dtype = DTYPES[datatype]
    try:
        arr = np.asarray(data)
    except (ValueError, TypeError, OverflowError, RecursionError):
        raise BadRequest(f"{where}.data: not a regular (non-ragged) list of numbers") from None
    kind = arr.dtype.kind
    if arr.size == 0 and kind == "f":
        kind = dtype.kind  # [] parses as float64; an empty tensor is fine for any type
    if datatype == "BOOL":
        ok = kind == "b"
    elif dtype.kind in "iu":
        ok = kind in "iu" or (kind == "b" and arr.size == 0)
    else:
        ok = kind in "iuf"
    if not ok:
        got = {"U": "strings", "O": "mixed or out-of-range values", "b": "booleans", "f": "fractional numbers"}.get(
            arr.dtype.kind, str(arr.dtype)
        )
        raise BadRequest(f"{where}.data: {datatype} needs {'booleans' if datatype == 'BOOL' else 'numbers'}, got {got}")
    if arr.size != math.prod(shape):
        raise BadRequest(f"{where}.data: {arr.size} elements, but shape {list(shape)} needs {math.prod(shape)}")
    if dtype.kind in "iu" and arr.size:
        info = np.iinfo(dtype)
        lo, hi = int(arr.min()), int(arr.max())
        if lo < info.min or hi > info.max:
            raise BadRequest(f"{where}.data: values out of range for {datatype} ({lo}..{hi})")
    try:
        return arr.astype(dtype, copy=False).reshape(shape)
    except (ValueError, OverflowError):
        raise BadRequest(f"{where}.data: cannot be represented as {datatype}") from None


def split_bytes(where: str, chunk: bytes, count: int) -> list[bytes]:
    out: list[bytes] = []
    pos, end = 0, len(chunk)
    while pos < end:
        if pos + 4 > end:
            raise BadRequest(f"{where}: BYTES binary data ends inside a 4-byte length prefix")
        (n,) = struct.unpack_from("<I", chunk, pos)
        pos += 4
        if pos + n > end:
            raise BadRequest(f"{where}: BYTES element {len(out)} says {n} bytes, only {end - pos} left")
        out.append(chunk[pos : pos + n])
        pos += n
    if len(out) != count:
        raise BadRequest(f"{where}: binary data holds {len(out)} BYTES elements, the shape needs {count}")
    return out


def _parameters(where: str, value: Any) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{where}.parameters: must be an object, got {type(value).__name__}")
    return value


def check_name(where: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise BadRequest(f"{where}.name: must be a non-empty string, got {value!r}"[:300])
    if len(value) > MAX_NAME:
        raise BadRequest(f"{where}.name: longer than {MAX_NAME} characters")
    return value


def parse_infer_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Parse an infer request body. ``header_length`` is the Inference-Header-Content-Length header: the JSON
    part's length when binary tensor data follows it."""
    if header_length is None:
        head, binary = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length: {header_length} is outside the body of {len(body)} bytes"
            )
        head, binary = body[:header_length], body[header_length:]
    doc = _loads(head)
    if not isinstance(doc, dict):
        raise BadRequest(f"request body: must be a JSON object, got {type(doc).__name__}")
    unknown = set(doc) - {"id", "inputs", "outputs", "parameters"}
    if unknown:
        raise BadRequest(f"request: unknown field(s) {', '.join(sorted(map(repr, unknown)))}"[:300])
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise BadRequest(f"id: must be a string, got {type(request_id).__name__}")
    params = _parameters("request", doc.get("parameters"))
    binary_output = params.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise BadRequest("parameters.binary_data_output: must be true or false")
    timeout = params.get("timeout")
    if timeout is not None and (not _is_int(timeout) or timeout < 0):
        raise BadRequest(f"parameters.timeout: must be an integer >= 0 (microseconds), got {timeout!r}"[:300])

    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("inputs: must be a non-empty list of tensors")
    inputs: dict[str, Tensor] = {}
    offset = 0
    for i, item in enumerate(raw_inputs):
        where = f"inputs[{i}]"
        if not isinstance(item, dict):
            raise BadRequest(f"{where}: must be an object, got {type(item).__name__}")
        unknown = set(item) - {"name", "shape", "datatype", "parameters", "data"}
        if unknown:
            raise BadRequest(f"{where}: unknown field(s) {', '.join(sorted(map(repr, unknown)))}"[:300])
        name = check_name(where, item.get("name"))
        where = f"input {name!r}"
        if name in inputs:
            raise BadRequest(f"{where}: given twice")
        datatype = item.get("datatype")
        if datatype not in DATATYPES:
            raise BadRequest(f"{where}.datatype: must be one of {', '.join(DATATYPES)}, got {datatype!r}"[:300])
        shape = parse_shape(where, item.get("shape"))
        count = math.prod(shape)
        tparams = _parameters(where, item.get("parameters"))
        size = tparams.get("binary_data_size")
        if size is not None:
            if not _is_int(size) or size < 0:
                raise BadRequest(f"{where}.parameters.binary_data_size: must be an integer >= 0, got {size!r}"[:300])
            if "data" in item:
                raise BadRequest(f"{where}: has both data and binary_data_size")
            if offset + size > len(binary):
                raise BadRequest(
                    f"{where}.parameters.binary_data_size: {size} bytes at offset {offset}, but the binary part "
                    f"has {len(binary)} bytes"
                )
            chunk = binary[offset : offset + size]
            offset += size
            if datatype == "BYTES":
                data: np.ndarray | list[bytes] = split_bytes(where, chunk, count)
            else:
                dtype = DTYPES[datatype]
                if size != count * dtype.itemsize:
                    raise BadRequest(
                        f"{where}: {size} bytes of binary data, shape {list(shape)} of {datatype} needs "
                        f"{count * dtype.itemsize}"
                    )
                data = np.frombuffer(chunk, dtype=dtype).reshape(shape)
        else:
            if "data" not in item:
                raise BadRequest(f"{where}: has neither data nor parameters.binary_data_size")
            raw = item["data"]
            if not isinstance(raw, list):
                raw = [raw]  # a scalar is a one-element tensor
            if datatype == "BYTES":
                flat: list[bytes] = []
                _flatten_bytes(where, raw, flat)
                if len(flat) != count:
                    raise BadRequest(f"{where}.data: {len(flat)} elements, but shape {list(shape)} needs {count}")
                data = flat
            else:
                data = _json_numeric(where, datatype, raw, shape)
        inputs[name] = Tensor(name, datatype, shape, data)
    if offset != len(binary):
        raise BadRequest(f"request body: {len(binary) - offset} bytes of binary data are not claimed by any input")

    outputs: dict[str, bool] | None = None
    raw_outputs = doc.get("outputs")
    if raw_outputs is not None:
        if not isinstance(raw_outputs, list):
            raise BadRequest("outputs: must be a list")
        outputs = {}
        for i, item in enumerate(raw_outputs):
            where = f"outputs[{i}]"
            if not isinstance(item, dict):
                raise BadRequest(f"{where}: must be an object, got {type(item).__name__}")
            name = check_name(where, item.get("name"))
            oparams = _parameters(f"output {name!r}", item.get("parameters"))
            binary_data = oparams.get("binary_data", binary_output)
            if not isinstance(binary_data, bool):
                raise BadRequest(f"output {name!r}.parameters.binary_data: must be true or false")
            if name in outputs:
                raise BadRequest(f"output {name!r}: requested twice")
            outputs[name] = binary_data
    return InferRequest(request_id, inputs, outputs, binary_output, timeout, params)


@dataclass
class OutputTensor:
    name: str
    datatype: str
    shape: tuple[int, ...]
    data: np.ndarray | Sequence[str]


def raw_bytes(out: OutputTensor) -> bytes:
    """The binary form of an output (the binary extension's, gRPC's raw contents): row-major little-endian
    elements; BYTES elements each after a 4-byte little-endian length."""
    if isinstance(out.data, np.ndarray):
        return np.ascontiguousarray(out.data, dtype=DTYPES[out.datatype]).tobytes()
    parts: list[bytes] = []
    for s in out.data:
        b = s.encode()
        parts.append(struct.pack("<I", len(b)))
        parts.append(b)
    return b"".join(parts)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[OutputTensor],
    binary: dict[str, bool],
) -> tuple[bytes, int | None]:
    """The response body and, when some output is binary, the JSON header's length."""
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    tensors: list[dict[str, Any]] = []
    chunks: list[bytes] = []
    for out in outputs:
        entry: dict[str, Any] = {"name": out.name, "datatype": out.datatype, "shape": list(out.shape)}
        if binary.get(out.name, False):
            raw = raw_bytes(out)
            entry["parameters"] = {"binary_data_size": len(raw)}
            chunks.append(raw)
        elif isinstance(out.data, np.ndarray):
            entry["data"] = out.data.ravel().tolist()
        else:
            entry["data"] = list(out.data)
        tensors.append(entry)
    doc["outputs"] = tensors
    head = json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()
    if not chunks:
        return head, None
    return head + b"".join(chunks), len(head)


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()
