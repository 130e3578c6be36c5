"""The operator's Prometheus metrics (kopf has none of its own) and the HTTP endpoint that serves them."""

import functools
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

import prometheus_client
from prometheus_client import Counter, Histogram

RECONCILES = Counter(
    "kiln_reconciles_total",
    "Reconcile passes by kind and outcome (success; error: the pass raised and is retried with backoff).",
    ["kind", "outcome"],
)
RECONCILE_ERRORS = Counter(
    "kiln_reconcile_errors_total", "Reconcile passes that raised, by kind and exception type.", ["kind", "error"]
)
RECONCILE_SECONDS = Histogram(
    "kiln_reconcile_duration_seconds",
    "Wall time of one reconcile pass, by kind.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

P = ParamSpec("P")
R = TypeVar("R")


def instrumented(kind: str) -> Callable[[Callable[P, Awaitable[R]]], Callable[P, Awaitable[R]]]:
    """Count, time and classify every reconcile pass (an async call) of `kind`."""

    def decorator(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            started = time.perf_counter()
            try:
                result = await fn(*args, **kwargs)
            except BaseException as e:
                RECONCILES.labels(kind, "error").inc()
                RECONCILE_ERRORS.labels(kind, type(e).__name__).inc()
                raise
            finally:
                RECONCILE_SECONDS.labels(kind).observe(time.perf_counter() - started)
            RECONCILES.labels(kind, "success").inc()
            return result

        return wrapper

    return decorator


def parse_address(address: str) -> tuple[str, int]:
    """'host:port' (or ':port') -> (host, port); the host defaults to all interfaces."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"metrics address {address!r}: expected HOST:PORT with PORT in 0..65535")
    return host.strip("[]") or "0.0.0.0", int(port)


def serve(address: str) -> tuple[Any, threading.Thread]:
    """Start the /metrics endpoint in a daemon thread; returns what `stop` needs."""
    host, port = parse_address(address)
    return prometheus_client.start_http_server(port, addr=host)


def stop(handle: tuple[Any, threading.Thread]) -> None:
    server, thread = handle
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
