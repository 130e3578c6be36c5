"""A real S3-compatible server on loopback for tests and benchmarks: moto's server mode in a subprocess.

The server speaks the S3 HTTP API (s3fs and botocore talk to it over TCP like to any S3 store); nothing is
mocked in the client. moto checks conditional writes (If-None-Match: *) and then writes, without a lock, so two
racing creates could both succeed, which real S3 forbids; the server here runs mutating requests one at a time
so that it has S3's semantics for the concurrency tests. Reads stay concurrent.

    with S3TestServer() as s3:
        s3.create_bucket("artifacts")
        os.environ.update(s3.env())
"""

from __future__ import annotations

import argparse
import os
import selectors
import subprocess
import sys
import threading
from collections.abc import Callable, Iterable
from types import TracebackType
from typing import Any

ACCESS_KEY = "kiln-test-access-key"
SECRET_KEY = "kiln-test-secret-key"


class S3TestServer:
    def __init__(self, *, startup_timeout: float = 60.0) -> None:
        self.startup_timeout = startup_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.port: int | None = None

    @property
    def endpoint_url(self) -> str:
        assert self.port is not None, "start() first"
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The environment the library reads S3 settings from (what a Secret reference provides in a pod)."""
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
            "AWS_REGION": "us-east-1",
        }

    def start(self) -> S3TestServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "kiln_artifacts.testing"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        assert self.proc.stdout is not None
        # Wait for the line announcing the port (the socket is bound and listening by then), with a deadline.
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(self.startup_timeout):
                self.stop()
                raise RuntimeError(f"S3 test server did not start within {self.startup_timeout}s")
        line = self.proc.stdout.readline().decode()
        if not line.startswith("LISTENING "):
            self.stop()
            raise RuntimeError(f"S3 test server failed to start: {line!r}")
        self.port = int(line.split()[1])
        return self

    def create_bucket(self, name: str) -> None:
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY,
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc is not None and self.proc.stdout is not None:
            self.proc.stdout.close()

    def __enter__(self) -> S3TestServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _serialized_writes(app: Callable[..., Any]) -> Callable[..., Any]:
    lock = threading.Lock()

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") in ("PUT", "POST", "DELETE"):
            with lock:
                return list(app(environ, start_response))
        return app(environ, start_response)

    return wrapped


def _serve(host: str, port: int) -> None:
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, MotoRequestHandler, create_backend_app
    from werkzeug.serving import make_server

    app = _serialized_writes(DomainDispatcherApplication(create_backend_app))
    server = make_server(host, port, app, threaded=True, request_handler=MotoRequestHandler)
    print(f"LISTENING {server.server_address[1]}", flush=True)
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="moto S3 server on loopback for kiln_artifacts tests")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0: any free port (printed on stdout)")
    args = parser.parse_args(argv)
    os.environ.setdefault("MOTO_ALLOW_NONEXISTENT_REGION", "true")
    _serve(args.host, args.port)


if __name__ == "__main__":
    main()
