"""The HTTP server (aiohttp): Open Inference Protocol routes, metrics on their own port, start-up and the
graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import signal
import sys
import threading
import time
import uuid
import zlib
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from kiln_artifacts.contract import ExitCode, termination_message, write_termination_message

from . import __version__
from .access import AccessLog
from .auth import CHALLENGE, CHALLENGE_INVALID, MISSING, OPEN_PATHS, ApiSettings, Authenticator, KubeApi, ReviewError
from .batcher import Batcher
from .config import Config, UsageError, parse_config
from .errors import BadRequest, RequestError, StartupError, Unavailable
from .metrics import AuthMetrics, Metrics, MonitorMetrics, TlsMetrics
from .model import Model
from .monitor import Monitor, create_monitor, model_labels
from .payload import PayloadLog
from .protocol import EXTENSIONS, InferRequest, OutputTensor, encode_response, error_body, parse_infer_request
from .tls import CertificateWatcher, TlsError, describe_expiry

if TYPE_CHECKING:
    import grpc

log = logging.getLogger("kiln_server")

JSON = "application/json"
DEADLINE_HEADER = "Kiln-Timeout-Ms"
REQUEST_ID_HEADER = "X-Request-Id"
MAX_REQUEST_ID = 256
USER_KEY = "kiln_user"  # the authenticated caller, on the aiohttp request


def _json(doc: Any, status: int = 200) -> web.Response:
    return web.Response(body=json.dumps(doc).encode(), status=status, content_type=JSON)


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=error_body(message), status=status, content_type=JSON, headers=headers)


class Server:
    def __init__(
        self, config: Config, *, api: ApiSettings | None = None, tls: CertificateWatcher | None = None
    ) -> None:
        self.config = config
        self.model = Model(config)
        self.metrics = Metrics(config.model_name, config.max_batch_size)
        self.batcher: Batcher | None = None
        self.draining = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stop = asyncio.Event()
        self._fast_stop = False
        self._sites: list[web.BaseSite] = []
        self._grpc: grpc.aio.Server | None = None
        self.monitor_metrics = MonitorMetrics(self.metrics) if config.monitoring else None
        self.monitor: Monitor | None = None
        self.payload_log: PayloadLog | None = None
        self.access_log = (
            AccessLog(
                config.access_log_rate,
                model=config.model_name,
                digest=lambda: self.model.digest,
                deployment=config.deployment,
                revision=config.revision,
            )
            if config.access_log_rate > 0
            else None
        )
        # Who may call, and TLS: main() has checked the settings (usage errors) before the event loop started.
        self.auth: Authenticator | None = None
        if config.auth == "kubernetes":
            assert config.namespace is not None
            assert config.deployment is not None
            self.auth = Authenticator(
                KubeApi(api or ApiSettings.from_env()),
                namespace=config.namespace,
                deployment=config.deployment,
                ttl=config.auth_cache_ttl,
                size=config.auth_cache_size,
                metrics=AuthMetrics(self.metrics),
            )
        self.tls = tls
        if self.tls is None and config.tls_cert_file and config.tls_key_file:
            self.tls = CertificateWatcher(config.tls_cert_file, config.tls_key_file)
        if self.tls is not None:
            self.tls.bind_metrics(TlsMetrics(self.metrics))

    # ------------------------------------------------------------------ state
    @property
    def ready(self) -> bool:
        return self.model.ready and self.batcher is not None and not self.draining

    def check_model(self, name: str, version: str | None) -> None:
        if name != self.model.name:
            raise RequestError(f"unknown model {name!r}; this server serves {self.model.name!r}", 404)
        if version is not None and version != self.model.version:
            raise RequestError(f"model {name!r} has no version {version!r} (versions: {self.model.version})", 404)

    def _check_model(self, request: web.Request) -> None:
        self.check_model(request.match_info["name"], request.match_info.get("version"))

    # ----------------------------------------------------------------- routes
    async def server_metadata(self, _request: web.Request) -> web.Response:
        return _json({"name": "kiln-server", "version": __version__, "extensions": EXTENSIONS})

    async def live(self, _request: web.Request) -> web.Response:
        return _json({"live": True})

    async def server_ready(self, _request: web.Request) -> web.Response:
        if self.ready:
            return _json({"ready": True})
        return _json({"ready": False, "reason": self.not_ready_reason()}, 503)

    def not_ready_reason(self) -> str:
        if self.draining:
            return "shutting down"
        return self.model.not_ready_reason or ("starting" if self.batcher is None else "not ready")

    async def model_ready(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return await self.server_ready(request)

    def metadata(self) -> dict[str, Any]:
        if self.model.spec is None:
            raise Unavailable(f"model {self.model.name!r} is not loaded yet ({self.not_ready_reason()})")
        return self.model.metadata()

    async def model_metadata(self, request: web.Request) -> web.Response:
        self._check_model(request)
        return _json(self.metadata())

    async def model_config(self, request: web.Request) -> web.Response:
        self._check_model(request)
        meta = self.metadata()
        return _json(
            {
                "name": self.model.name,
                "platform": "onnxruntime_onnx",
                "backend": "onnxruntime",
                "max_batch_size": self.config.max_batch_size,
                "dynamic_batching": {
                    "max_queue_delay_microseconds": int(self.config.max_queue_delay_ms * 1000),
                    "default_queue_policy": {"max_queue_size": self.config.max_queue_size},
                },
                "instance_group": [{"count": self.config.instances}],
                "input": [
                    {"name": i["name"], "data_type": "TYPE_" + i["datatype"], "dims": i["shape"]}
                    for i in meta["inputs"]
                ],
                "output": [
                    {"name": o["name"], "data_type": "TYPE_" + o["datatype"], "dims": o["shape"]}
                    for o in meta["outputs"]
                ],
                "parameters": meta["parameters"],
            }
        )

    @contextlib.contextmanager
    def tracked(self, protocol: str = "rest") -> Iterator[Outcome]:
        """Count one inference request (REST or gRPC) in flight and, when done, in the metrics with its status
        (and in the access log, if sampled)."""
        outcome = Outcome(asyncio.get_running_loop().time(), protocol=protocol)
        self.inflight += 1
        self._idle.clear()
        self.metrics.inflight.inc()
        try:
            yield outcome
        finally:
            self.inflight -= 1
            self.metrics.inflight.dec()
            self.metrics.request(outcome.status)
            latency = asyncio.get_running_loop().time() - outcome.started
            self.metrics.request_duration.observe(latency)
            if self.access_log is not None and self.access_log.sampled():
                self.access_log.emit(
                    time=time.time(),
                    request_id=outcome.ensure_id(),
                    protocol=outcome.protocol,
                    latency_s=latency,
                    status=outcome.status,
                    batch_size=outcome.batch_size,
                    samples=outcome.samples,
                    user=outcome.user,
                )
            if self.inflight == 0:
                self._idle.set()

    async def predict(
        self, parsed: InferRequest, deadline: float | None, outcome: Outcome | None = None
    ) -> list[OutputTensor]:
        """Validate a parsed request against the model, queue it, wait for its rows (at most until ``deadline``,
        loop time) and return its outputs."""
        if not self.model.ready or self.batcher is None:
            raise Unavailable(f"model {self.model.name!r} is not ready ({self.not_ready_reason()})")
        payload, size = self.model.prepare(parsed)
        if outcome is not None:
            outcome.samples = size
            if parsed.id:  # the Open Inference Protocol's own request id wins over the transport's
                outcome.request_id = parsed.id[:MAX_REQUEST_ID]
        future = self.batcher.submit(payload, size, deadline, outcome)
        if deadline is None:
            logits = await future
        else:
            try:
                logits = await asyncio.wait_for(future, max(deadline - asyncio.get_running_loop().time(), 0))
            except TimeoutError:
                raise RequestError("deadline exceeded", 504) from None
        log_ = self.payload_log
        if log_ is not None and log_.sampled():
            log_.offer(outcome.ensure_id() if outcome is not None else _new_id(), parsed.inputs, logits)
        return self.model.outputs_for(logits, parsed)

    def deadline(self, started: float, seconds: float | None, timeout_us: int | None) -> float | None:
        """The earliest of the transport's deadline (``seconds`` after ``started``: Kiln-Timeout-Ms, gRPC's) and the
        request's ``timeout`` parameter; else the default timeout, if any. Loop time."""
        limits = [x for x in (seconds, timeout_us / 1e6 if timeout_us else None) if x is not None]
        if not limits and self.config.default_timeout_ms > 0:
            limits.append(self.config.default_timeout_ms / 1000)
        return started + min(limits) if limits else None

    async def infer(self, request: web.Request) -> web.StreamResponse:
        with self.tracked("rest") as outcome:
            outcome.user = request.get(USER_KEY)
            header_id = request.headers.get(REQUEST_ID_HEADER)
            if header_id:
                outcome.request_id = header_id[:MAX_REQUEST_ID]
            try:
                response = await self._infer(request, outcome)
            except RequestError as e:
                outcome.status = e.status
                return _error(e.status, e.message, {"Retry-After": "1"} if e.status in (429, 503) else None)
            except Exception as e:  # a bug: answer, log, keep serving
                log.exception("unexpected error in infer")
                return _error(500, f"internal error: {type(e).__name__}")
            outcome.status = response.status
            return response

    async def _infer(self, request: web.Request, outcome: Outcome) -> web.Response:
        self._check_model(request)
        if not self.model.ready or self.batcher is None:
            raise Unavailable(f"model {self.model.name!r} is not ready ({self.not_ready_reason()})")
        limit = self.config.max_body_bytes
        length = request.content_length
        if length is not None and length > limit:
            raise RequestError(f"request body: {length} bytes is over the limit of {limit}", 413)
        encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
        if encoding not in ("identity", "gzip", "deflate"):
            refused = _error(415, f"Content-Encoding: {encoding[:40]!r} is not supported (gzip, deflate, identity)")
            # The body is still on the connection: read past it so the next request there is understood.
            if not await _discard_body(request, limit):
                refused.force_close()
            return refused
        try:
            # As sent: the runner leaves decoding to us (auto_decompress off), so the limit bounds it here first.
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            raise RequestError(f"request body: over the limit of {limit} bytes", 413) from None
        except Exception as e:  # the body ended early or broke its chunked framing: the client's fault
            raise BadRequest(f"request body: cannot be read ({type(e).__name__}: {e})"[:300]) from None
        if encoding != "identity":
            body = _decode_body(body, encoding, limit)
        header = request.headers.get("Inference-Header-Content-Length")
        header_length = None
        if header is not None:
            try:
                header_length = int(header)
            except ValueError:
                raise BadRequest(f"Inference-Header-Content-Length: not an integer: {header[:50]!r}") from None
        parsed = parse_infer_request(body, header_length)
        deadline = self.deadline(outcome.started, _timeout_header(request), parsed.timeout_us)
        outputs = await self.predict(parsed, deadline, outcome)
        binary = {o.name: (parsed.outputs or {}).get(o.name, parsed.binary_output) for o in outputs}
        try:
            body_out, head_len = encode_response(self.model.name, self.model.version, parsed.id, outputs, binary)
        except ValueError:
            raise RequestError("inference produced non-finite logits (NaN or infinity)", 500) from None
        if head_len is None:
            resp = web.Response(body=body_out, content_type=JSON)
        else:
            resp = web.Response(
                body=body_out,
                content_type="application/octet-stream",
                headers={"Inference-Header-Content-Length": str(head_len)},
            )
        if self.draining:
            resp.force_close()  # no new requests on this connection: we are going away
        return resp

    async def metrics_handler(self, _request: web.Request) -> web.Response:
        if self.batcher is not None:
            self.metrics.queue_depth.set(self.batcher.depth)
        if self.monitor is not None:
            self.monitor.update_metrics()  # drift scores are computed here, at scrape time, not per request
        if self.auth is not None:
            self.auth.update_metrics()
        return web.Response(body=self.metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4"})

    @web.middleware
    async def _authorize(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """With --auth kubernetes: every route but the probes' (unknown ones too) needs a token the cluster
        authorises. Refusals are the client's doing: answered, counted in kiln_server_auth_requests_total, not
        logged above DEBUG. It replaces _json_errors, which it calls, rather than adding a second middleware: one
        layer less on every request."""
        if request.path not in OPEN_PATHS:
            auth = self.auth
            assert auth is not None
            header = request.headers.get("Authorization")
            try:
                decision = auth.cached(header) or await auth.authorize(header)
            except ReviewError as e:
                return _error(503, e.client_message, {"Retry-After": "1"})
            if decision.status != 200:
                headers = None
                if decision.status == 401:
                    headers = {"WWW-Authenticate": CHALLENGE if decision is MISSING else CHALLENGE_INVALID}
                log.debug("%s %s: %d %s", request.method, request.path, decision.status, decision.message)
                return _error(decision.status, decision.message, headers)
            request[USER_KEY] = decision.user
        return await _json_errors(request, handler)

    # -------------------------------------------------------------- lifecycle
    def build_app(self) -> web.Application:
        middleware = _json_errors if self.auth is None else self._authorize
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[middleware])
        add = app.router.add_route
        add("GET", "/v2", self.server_metadata)
        add("GET", "/v2/health/live", self.live)
        add("GET", "/v2/health/ready", self.server_ready)
        for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
            add("GET", prefix, self.model_metadata)
            add("GET", prefix + "/ready", self.model_ready)
            add("GET", prefix + "/config", self.model_config)
            add("POST", prefix + "/infer", self.infer)
        return app

    def build_metrics_app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/metrics", self.metrics_handler)
        return app

    def request_stop(self, fast: bool = False) -> None:
        self._fast_stop = self._fast_stop or fast
        self._stop.set()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig, fast in ((signal.SIGTERM, False), (signal.SIGINT, True)):
            loop.add_signal_handler(sig, self.request_stop, fast)
        # Our own drain (below) finishes the requests; the runners' shutdown only closes what is left, briefly.
        # Bodies arrive as sent (auto_decompress off): _decode_body inflates them. aiohttp's own decoding fails
        # inside its parser, which then drops the connection (and logs the client's bad gzip as an ERROR).
        runner = _AppRunner(
            self.build_app(), access_log=None, handle_signals=False, shutdown_timeout=2.0, auto_decompress=False
        )
        metrics_runner = _AppRunner(
            self.build_metrics_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0
        )
        await runner.setup()
        await metrics_runner.setup()
        watch: asyncio.Task[None] | None = None
        try:
            # TLS on the inference port only: the metrics port stays plain HTTP for Prometheus.
            tls = self.tls.rest_context() if self.tls is not None else None
            for r, port, context in (
                (runner, self.config.port, tls),
                (metrics_runner, self.config.metrics_port, None),
            ):
                site = web.TCPSite(r, self.config.host, port, backlog=1024, reuse_address=True, ssl_context=context)
                try:
                    await site.start()
                except OSError as e:
                    raise StartupError(ExitCode.PORT, f"cannot listen on {self.config.host}:{port}: {e}") from e
                self._sites.append(site)
            grpc_at = await self._start_grpc()
            log.info(
                "listening on %s (inference%s), %s (gRPC%s) and %s (metrics); loading %s",
                _bound(runner),
                ", TLS" if self.tls is not None else "",
                grpc_at,
                ", TLS" if self.tls is not None and self._grpc is not None else "",
                _bound(metrics_runner),
                self.config.model_uri,
            )
            if self.tls is not None:
                expired = self.tls.pair.not_after < time.time()
                log.log(
                    logging.WARNING if expired else logging.INFO,
                    "TLS: serving %s, %s",
                    self.tls.cert_file,
                    describe_expiry(self.tls.pair.not_after),
                )
                watch = asyncio.ensure_future(self.tls.watch())
            if self.auth is not None:
                log.info(
                    "auth: callers need a token allowed to %s (decisions cached %gs)",
                    self.auth.permission,
                    self.config.auth_cache_ttl,
                )
            # Load in a daemon thread: /v2/health/live answers meanwhile, and SIGTERM need not wait for it.
            loaded = _in_daemon_thread(self._load)
            stop_wait = asyncio.ensure_future(self._stop.wait())
            await asyncio.wait([loaded, stop_wait], return_when=asyncio.FIRST_COMPLETED)
            if not loaded.done():
                log.info("stop requested while loading; exiting")
                return ExitCode.SUCCEEDED
            stop_wait.cancel()
            loaded.result()  # raises StartupError
            self.metrics.load_seconds.set(self.model.load_seconds)
            self.metrics.warmup_seconds.set(self.model.warmup_seconds)
            self.metrics.providers(self.model.providers)
            self.batcher = Batcher(
                self.model.run_batch,
                max_batch_size=self.config.max_batch_size,
                max_queue_delay=self.config.max_queue_delay_ms / 1000,
                max_queue_size=self.config.max_queue_size,
                instances=self.config.instances,
                metrics=self.metrics,
            )
            self.batcher.start()
            if self.payload_log is not None:
                self.payload_log.start()
            self.metrics.ready.set(1 if self.model.ready else 0)
            if self.model.ready:
                log.info("ready: model %r, providers %s", self.model.name, self.model.providers)
            await self._stop.wait()
            await self._shutdown(runner)
            return ExitCode.SUCCEEDED
        finally:
            if watch is not None:
                watch.cancel()
            if self._grpc is not None:
                await self._grpc.stop(0)
            await runner.cleanup()
            await metrics_runner.cleanup()
            if self.auth is not None:
                await self.auth.close()
            if self.batcher is not None:
                await self.batcher.stop()
            if self.payload_log is not None:  # after an error: what can be written in a moment, is
                await asyncio.get_running_loop().run_in_executor(None, self.payload_log.close, 2.0)

    def _load(self) -> None:
        """The model, then its monitoring (the reference may be another artifact to read): in the load thread,
        before the server reports ready."""
        self.model.load()
        config = self.config
        if self.monitor_metrics is None:
            if config.payload_log_rate > 0:
                log.warning("--payload-log-rate: ignored, monitoring is off (--monitoring off)")
            return
        assert self.model.spec is not None
        monitor = create_monitor(config, self.model, self.monitor_metrics)
        if config.payload_log_rate > 0:
            assert config.payload_log_uri is not None
            if config.payload_log_queue < config.payload_log_batch_records:
                log.warning(
                    "--payload-log-queue %d is under --payload-log-batch-records %d: batches are published by time "
                    "only, never full",
                    config.payload_log_queue,
                    config.payload_log_batch_records,
                )
            self.payload_log = PayloadLog(
                uri=config.payload_log_uri,
                rate=config.payload_log_rate,
                batch_records=config.payload_log_batch_records,
                batch_seconds=config.payload_log_batch_seconds,
                queue=config.payload_log_queue,
                redact=config.payload_log_redact,
                hash_inputs=config.payload_log_hash,
                model_name=self.model.name,
                model_digest=self.model.digest,
                model_uri=self.model.uri,
                task=self.model.spec.task,
                labels=model_labels(self.model) if self.model.spec.labels else None,
                deployment=config.deployment,
                revision=config.revision,
                metrics=self.monitor_metrics,
            )
            log.info(
                "payload log: %.0f%% of requests to %s, in batches of %d records or %gs",
                100 * config.payload_log_rate,
                config.payload_log_uri,
                config.payload_log_batch_records,
                config.payload_log_batch_seconds,
            )
        self.monitor = monitor
        self.model.monitor = monitor

    async def _start_grpc(self) -> str:
        """The gRPC endpoint on its own port (grpcio's asyncio server, on this event loop); "off" when disabled."""
        if self.config.grpc_port is None:
            return "off"
        # Imported only when served: a server with --grpc-port off runs where grpcio is not installed.
        import grpc

        from .grpc_service import GrpcService, enable_reflection

        self._grpc = grpc.aio.server(
            handlers=[GrpcService(self).handler()],
            options=[
                ("grpc.max_receive_message_length", self.config.max_body_bytes),
                ("grpc.so_reuseport", 0),  # a port in use must fail here (ExitCode.PORT), not be shared silently
            ],
        )
        enable_reflection(self._grpc)
        address = f"{self.config.host}:{self.config.grpc_port}"
        try:
            if self.tls is not None:
                port = self._grpc.add_secure_port(address, self.tls.grpc_credentials())
            else:
                port = self._grpc.add_insecure_port(address)
        except RuntimeError as e:
            port, reason = 0, str(e)
        else:
            reason = "port in use?"
        if not port:
            raise StartupError(ExitCode.PORT, f"cannot listen on {address} (gRPC): {reason}")
        await self._grpc.start()
        return f"{self.config.host}:{port}"

    async def _shutdown(self, runner: web.AppRunner) -> None:
        """Not ready at once; keep serving for the shutdown delay (endpoints take a moment to drop this pod);
        then stop accepting connections and finish what was accepted, within the grace period."""
        self.draining = True
        self.metrics.ready.set(0)
        grace_end = time.monotonic() + self.config.grace_period_s
        if not self._fast_stop and self.config.shutdown_delay_s > 0:
            log.info("SIGTERM: not ready; serving %.1fs more before draining", self.config.shutdown_delay_s)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_forever(), self.config.shutdown_delay_s)
        log.info("draining: %d requests in flight", self.inflight)
        # Stop accepting connections; open ones stay until their requests finish. gRPC: no new calls (GOAWAY),
        # calls under way may run until the grace period ends.
        await self._sites[0].stop()
        grpc_stopped = None
        if self._grpc is not None:
            grpc_stopped = asyncio.ensure_future(self._grpc.stop(max(grace_end - time.monotonic(), 0)))
        try:
            await asyncio.wait_for(self._drain(), max(grace_end - time.monotonic(), 0))
            log.info("drained; exiting")
        except TimeoutError:
            log.warning("grace period over with %d requests in flight; answering them 503", self.inflight)
            if self.batcher is not None:
                self.batcher.fail_pending("shutting down: grace period over")
                await asyncio.sleep(0)
        if self.batcher is not None:
            self.batcher.close()
        if grpc_stopped is not None:
            await grpc_stopped
        if self.payload_log is not None:
            # Every answered request is in the log's queue now: publish the partial batch before exiting.
            flush = max(grace_end - time.monotonic(), 2.0)
            log.info("payload log: publishing %d held records", self.payload_log.held)
            await asyncio.get_running_loop().run_in_executor(None, self.payload_log.close, flush)

    async def _drain(self) -> None:
        while self.inflight:
            self._idle.clear()
            await self._idle.wait()
        # let the responses just produced be written before connections close
        await asyncio.sleep(0)


async def _forever() -> None:
    await asyncio.Event().wait()


def _timeout_header(request: web.Request) -> float | None:
    """Kiln-Timeout-Ms in seconds, or None."""
    header = request.headers.get(DEADLINE_HEADER)
    if header is None:
        return None
    try:
        ms = float(header)
    except ValueError:
        raise BadRequest(f"{DEADLINE_HEADER}: must be a number of milliseconds, got {header[:50]!r}") from None
    if not ms > 0 or ms == float("inf"):
        raise BadRequest(f"{DEADLINE_HEADER}: must be a finite number > 0, got {header[:50]!r}")
    return ms / 1000


@dataclass
class Outcome:
    """What one tracked request ended with (the status counted in the metrics; 500 unless set), and what the
    access log says of it."""

    started: float
    status: int = 500
    protocol: str = "rest"
    request_id: str | None = None
    batch_size: int = 0  # samples in the executed batch the request rode in
    samples: int = 0  # the request's own
    user: str | None = None  # the authenticated caller (--auth kubernetes)

    def ensure_id(self) -> str:
        """The request id: the request's own (OIP ``id``, else X-Request-Id), else one made up now, once."""
        if not self.request_id:
            self.request_id = _new_id()
        return self.request_id


def _new_id() -> str:
    return uuid.uuid4().hex


def _bound(runner: web.AppRunner) -> str:
    addrs = runner.addresses
    return ", ".join(f"{a[0]}:{a[1]}" for a in addrs if isinstance(a, tuple)) or "?"


def _in_daemon_thread(fn: Callable[[], None]) -> asyncio.Future[None]:
    loop = asyncio.get_running_loop()
    future: asyncio.Future[None] = loop.create_future()

    def target() -> None:
        try:
            fn()
        except BaseException as e:
            loop.call_soon_threadsafe(_set_exception, future, e)
        else:
            loop.call_soon_threadsafe(_set_result, future)

    threading.Thread(target=target, name="kiln-load", daemon=True).start()
    return future


def _set_exception(future: asyncio.Future[None], e: BaseException) -> None:
    if not future.done():
        future.set_exception(e)


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _decode_body(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body inflated, at most ``limit`` bytes of it (a small body can inflate to gigabytes):
    413 over it, 400 for data that is not what the Content-Encoding says."""
    if encoding == "gzip":
        wbits = 16 + zlib.MAX_WBITS
    else:
        # RFC 9110's deflate is the zlib format, but some clients send raw deflate: the first byte tells them apart
        # (a zlib stream's low nibble is 8, its compression method), as aiohttp and browsers tell them.
        wbits = zlib.MAX_WBITS if body[:1] and body[0] & 0x0F == 8 else -zlib.MAX_WBITS
    out: list[bytes] = []
    size = 0
    rest = body
    try:
        while rest:
            inflater = zlib.decompressobj(wbits)
            out.append(inflater.decompress(rest, limit + 1 - size))
            size += len(out[-1])
            if size > limit:
                raise RequestError(f"request body: over the limit of {limit} bytes once {encoding}-decoded", 413)
            if not inflater.eof:
                raise BadRequest(f"request body: the {encoding} data ends early")
            # gzip allows several members one after the other (what concatenated .gz files are); deflate does not
            rest = inflater.unused_data
            if rest and encoding != "gzip":
                raise BadRequest(f"request body: {len(rest)} bytes after the end of the deflate data")
    except zlib.error as e:
        raise BadRequest(f"request body: not valid {encoding} data ({e})"[:300]) from None
    return b"".join(out)


async def _discard_body(request: web.Request, limit: int) -> bool:
    """Read and drop what is left of a request's body, at most ``limit`` bytes: True when it ended within them
    (the connection can take another request), False when the connection should close after the answer."""
    seen = 0
    try:
        while seen <= limit:
            chunk = await request.content.readany()
            if not chunk:
                return True
            seen += len(chunk)
    except Exception:  # the client went away or broke the framing: nothing more to read there
        return False
    return False


class _RequestHandler(web.RequestHandler):
    """aiohttp's connection handler, with the errors it answers itself in Kiln's shape. The HTTP parser refuses a
    malformed request (a NUL in a header, a broken chunked encoding, Content-Length with Transfer-Encoding, a
    line over 8190 bytes) before any route sees it; aiohttp answers those 400 in plain text and logs them as an
    ERROR with a traceback. They are the client's mistakes: JSON ``{"error": ...}`` like every other answer, and a
    DEBUG line, so that an ERROR in the log always means the server is at fault."""

    __slots__ = ()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            if exc is not None:  # a handler raised: a bug of ours, with the traceback to find it
                self.log_exception("error handling %s %s", request.method, request.path, exc_info=exc)
            text = f"internal error: {type(exc).__name__}" if exc is not None else HTTPStatus(status).phrase
        else:
            if message is None and isinstance(exc, HttpProcessingError):
                message = exc.message
            # aiohttp's message spans lines, the last pointing at the offending byte with a caret: one line here
            lines = (line.strip() for line in (message or HTTPStatus(status).phrase).splitlines())
            text = "bad HTTP request: " + " ".join(line for line in lines if line.strip("^"))
            text = text[:300]
            self.logger.debug("%s from %s", text, request.remote)
        if request.writer.output_size > 0:  # part of an answer went out already: only closing is left
            raise ConnectionError("the answer has begun; no error answer can follow")
        response = _error(status, text)
        # As aiohttp's own: after a parser error nothing later on the connection is known to start a request.
        response.force_close()
        return response


class _Server(web.Server):
    """aiohttp's connection factory, making _RequestHandler connections."""

    def __call__(self) -> web.RequestHandler:
        return _RequestHandler(self, loop=self._loop, **self._kwargs)


class _AppRunner(web.AppRunner):
    """An AppRunner whose connections are _RequestHandler's: the application, its middlewares and settings as
    AppRunner makes them, only the connection class differs."""

    async def _make_server(self) -> web.Server:
        made = await super()._make_server()
        return _Server(
            made.request_handler,
            request_factory=made.request_factory,
            handler_cancellation=made.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **made._kwargs,
        )


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Every error as ``{"error": ...}`` JSON, including aiohttp's own (unknown route, wrong method)."""
    try:
        return await handler(request)
    except RequestError as e:
        return _error(e.status, e.message, {"Retry-After": "1"} if e.status == 503 else None)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        # The error's own headers stay (a 405's Allow, which RFC 9110 requires); only the body becomes JSON.
        kept = {k: v for k, v in e.headers.items() if k.lower() not in ("content-type", "content-length")}
        return _error(e.status, f"{e.reason}: {request.method} {request.path}", kept or None)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = parse_config(argv)
        # What the flags point at, checked before anything starts: a server that could not ask the API server or
        # serve its certificate would fail every request instead.
        api = ApiSettings.from_env() if config.auth == "kubernetes" else None
        tls = None
        if config.tls_cert_file and config.tls_key_file:
            try:
                tls = CertificateWatcher(config.tls_cert_file, config.tls_key_file)
            except TlsError as e:
                raise UsageError(str(e)) from None
    except UsageError as e:
        print(f"kiln-server: {e}", file=sys.stderr)
        return ExitCode.USER_ERROR
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import uvloop  # optional: a faster event loop when installed

        runner: Any = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        return int(runner(_main(config, api, tls)))
    except StartupError as e:
        log.error("cannot serve: %s", e.message)
        # Only into a file that is there (the kubelet's): run by hand as root, never create /dev/termination-log.
        if Path(config.termination_log).exists():
            write_termination_message(config.termination_log, termination_message(e.code, e.message))
        return e.code


async def _main(config: Config, api: ApiSettings | None = None, tls: CertificateWatcher | None = None) -> int:
    return await Server(config, api=api, tls=tls).run()


__all__ = ["Server", "main"]
