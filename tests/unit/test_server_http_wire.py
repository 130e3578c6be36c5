"""The REST port against what only a raw socket sends: HTTP that aiohttp's parser refuses, bodies whose
Content-Encoding is wrong or unsupported, and keep-alive after such a refusal. A client's mistake is a 4xx in the
JSON error shape and never an ERROR (or a traceback) in the server's log."""

from __future__ import annotations

import gzip
import http.client
import json
import socket
import zlib

import numpy as np
from support.server import ServerProcess, image_request

PIXELS = json.dumps(image_request(np.zeros((1, 1, 8, 8), dtype=np.float32))).encode()


def _infer(headers: bytes, body: bytes = PIXELS, *, close: bool = False) -> bytes:
    """A raw infer request; ``headers`` are CRLF-terminated lines, the framing (Content-Length) included."""
    head = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: kiln\r\n" + (b"Connection: close\r\n" if close else b"")
    return head + headers + b"\r\n" + body


def _sized(body: bytes, extra: bytes = b"") -> bytes:
    return extra + b"Content-Length: %d\r\n" % len(body)


def _exchange(sock: socket.socket, request: bytes) -> tuple[int, dict[str, str], bytes]:
    sock.sendall(request)
    resp = http.client.HTTPResponse(sock)
    resp.begin()
    body = resp.read()
    return resp.status, {k.lower(): v for k, v in resp.getheaders()}, body


def _error(status: int, headers: dict[str, str], body: bytes) -> str:
    """The message of a JSON error answer, checked to be one."""
    assert 400 <= status < 500, (status, body)
    assert headers["content-type"].split(";")[0] == "application/json", (status, headers, body)
    message = json.loads(body)["error"]
    assert isinstance(message, str), body
    assert message, body
    return message


def _assert_clean(log: str) -> None:
    assert "ERROR" not in log, log
    assert "Traceback" not in log, log


def test_malformed_http_is_a_json_4xx_and_no_error_in_the_log(image_server: ServerProcess):
    chunked = b"Transfer-Encoding: chunked\r\n"
    cases = [
        ("NUL in a header", _infer(_sized(PIXELS, b"X-Note: a\x00b\r\n"), close=True), 400, "bad HTTP request"),
        ("body that is not gzip", _infer(_sized(PIXELS, b"Content-Encoding: gzip\r\n"), close=True), 400, "gzip"),
        ("brotli", _infer(_sized(PIXELS, b"Content-Encoding: br\r\n"), close=True), 415, "Content-Encoding"),
        ("broken chunks", _infer(chunked, b"zz\r\n" + PIXELS + b"\r\n0\r\n\r\n", close=True), 400, "bad HTTP request"),
        ("Content-Length and Transfer-Encoding", _infer(_sized(b"0\r\n\r\n", chunked), b"0\r\n\r\n", close=True), 400,
         "bad HTTP request"),
        ("100 KB header line", _infer(b"X-Long: " + b"a" * 100_000 + b"\r\n" + _sized(PIXELS), close=True), 400,
         "bad HTTP request"),
    ]  # fmt: skip
    start = len(image_server.log)
    for what, request, code, fragment in cases:
        with socket.create_connection(("127.0.0.1", image_server.port), timeout=30) as sock:
            status, headers, body = _exchange(sock, request)
            assert status == code, (what, status, body)
            assert fragment in _error(status, headers, body), (what, body)
            # the server closes (Connection: close) only after it is done with the request, logging included
            assert sock.recv(1) == b"", what
    _assert_clean(image_server.log[start:])


def test_refused_content_encodings_keep_the_connection(image_server: ServerProcess):
    """One keep-alive connection: each refusal (415, bad gzip, over the limit once inflated) reads and drops the
    body, so the next request on the same connection is answered; gzip and deflate (zlib and raw) are decoded. Only
    a refused body over the limit (--max-body-bytes 200000) ends the connection."""
    bomb = b"{" + b" " * 300_000 + b"}"  # the server's --max-body-bytes is 200000
    raw_deflate = zlib.compressobj(wbits=-zlib.MAX_WBITS)
    raw_deflated = raw_deflate.compress(PIXELS) + raw_deflate.flush()
    steps = [
        (_infer(_sized(PIXELS, b"Content-Encoding: br\r\n")), 415),
        (_infer(_sized(PIXELS)), 200),
        (_infer(_sized(gzip.compress(PIXELS), b"Content-Encoding: gzip\r\n"), gzip.compress(PIXELS)), 200),
        (_infer(_sized(zlib.compress(PIXELS), b"Content-Encoding: deflate\r\n"), zlib.compress(PIXELS)), 200),
        (_infer(_sized(raw_deflated, b"Content-Encoding: deflate\r\n"), raw_deflated), 200),
        (_infer(_sized(PIXELS, b"Content-Encoding: gzip\r\n")), 400),
        (_infer(_sized(gzip.compress(PIXELS)[:-9], b"Content-Encoding: gzip\r\n"), gzip.compress(PIXELS)[:-9]), 400),
        (_infer(_sized(gzip.compress(bomb), b"Content-Encoding: gzip\r\n"), gzip.compress(bomb)), 413),
        (_infer(b"Transfer-Encoding: chunked\r\nContent-Encoding: zstd\r\n", b"5\r\nhello\r\n0\r\n\r\n"), 415),
        (_infer(_sized(PIXELS)), 200),
    ]
    start = len(image_server.log)
    with socket.create_connection(("127.0.0.1", image_server.port), timeout=30) as sock:
        for i, (request, code) in enumerate(steps):
            status, headers, body = _exchange(sock, request)
            assert status == code, (i, status, body)
            assert "close" not in headers.get("connection", "").lower(), (i, headers)
            if code == 200:
                assert json.loads(body)["outputs"][0]["shape"] == [1, 10]
            else:
                _error(status, headers, body)
        # a refused body longer than the limit is not read to its end: the answer closes the connection
        chunk = b" " * 50_000
        long = b"%x\r\n%s\r\n" % (len(chunk), chunk) * 6 + b"0\r\n\r\n"
        status, headers, body = _exchange(sock, _infer(b"Transfer-Encoding: chunked\r\nContent-Encoding: br\r\n", long))
        assert (status, headers["connection"].lower()) == (415, "close"), (status, headers, body)
        assert sock.recv(1) == b""
    _assert_clean(image_server.log[start:])
