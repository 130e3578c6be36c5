"""The operator's Prometheus metrics (kopf has none of its own) and the HTTP endpoint that serves them.

Two families: how the operator itself works (reconcile passes, their errors and durations; API requests are
counted in ``kube``), and what the objects it manages say, kube-state-metrics style (``kiln_resource_*`` for every
kind, ``kiln_trainingjob_*``, ``kiln_modelcompression_*``, ``kiln_modeldeployment_*``). The second family is fed by
``ObjectMetrics`` from the controllers' caches: every version of an object the cache takes (the watch's and the
operator's own status writes) updates its series, and an object that is deleted takes its series with it. The
alerts and dashboards in ``manifests/components/{alerts,dashboards}`` are written against these names
(docs/operations.md, "Alerts and dashboards").
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

import prometheus_client
from prometheus_client import Counter, Gauge, Histogram

from kiln_operator.api import modelcompression as mc_api
from kiln_operator.api import modeldeployment as md_api
from kiln_operator.api import trainingjob as tj_api
from kiln_operator.status import parse_time

log = logging.getLogger("kiln.metrics")

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

    # Both outcomes exist from the start at 0: a rate or increase over the first error then sees it (a series
    # born at 1 has no earlier sample to rise from), and dashboards show "no errors" rather than "no data".
    for outcome in ("success", "error"):
        RECONCILES.labels(kind, outcome)

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


# ------------------------------------------------------------------------------------- what the objects say

OBJECT = ["kind", "namespace", "name"]
NAMED = ["namespace", "name"]

PHASE = Gauge(
    "kiln_resource_phase",
    "1 for the phase in the object's status.phase, 0 for the kind's other phases.",
    [*OBJECT, "phase"],
)
GENERATION = Gauge(
    "kiln_resource_metadata_generation",
    "metadata.generation: raised by every change of the spec (absent while the object is being deleted).",
    OBJECT,
)
OBSERVED_GENERATION = Gauge(
    "kiln_resource_status_observed_generation",
    "status.observedGeneration: the generation the last status written was computed from; 0 before the first.",
    OBJECT,
)

TJ_STEP = Gauge("kiln_trainingjob_progress_step", "status.progress.step: the trainer's last reported step.", NAMED)
TJ_TOTAL_STEPS = Gauge("kiln_trainingjob_progress_total_steps", "status.progress.totalSteps.", NAMED)
TJ_LOSS = Gauge("kiln_trainingjob_progress_loss", "status.progress.loss: the trainer's last reported loss.", NAMED)
TJ_SAMPLES = Gauge(
    "kiln_trainingjob_progress_samples_per_second", "status.progress.samplesPerSecond: training throughput.", NAMED
)
TJ_HEARTBEAT = Gauge(
    "kiln_trainingjob_progress_heartbeat_timestamp_seconds",
    "status.progress.heartbeatTime as Unix time: when the trainer last reported progress.",
    NAMED,
)
TJ_ATTEMPT = Gauge("kiln_trainingjob_attempt", "status.attempt: the current attempt (1-based, one Job each).", NAMED)
TJ_RESTARTS = Gauge(
    "kiln_trainingjob_restarts",
    "status.restarts: attempts replaced, by the retry budget they used (user, infrastructure).",
    [*NAMED, "budget"],
)
TJ_GPU_SECONDS = Gauge(
    "kiln_trainingjob_gpu_seconds", "status.gpuSeconds: GPU time of all attempts, as of the last status write.", NAMED
)

MC_REJECTIONS = Counter(
    "kiln_modelcompression_gate_rejections_total",
    "Candidates the gates rejected (the phase turning Rejected), since the operator started.",
    NAMED,
)
MC_SIZE_RATIO = Gauge("kiln_modelcompression_size_ratio", "status.report.sizeRatio: candidate / source size.", NAMED)
MC_SPEEDUP = Gauge("kiln_modelcompression_speedup_ratio", "status.report.speedup: source p95 / candidate p95.", NAMED)
MC_P95 = Gauge(
    "kiln_modelcompression_p95_latency_seconds", "status.report.p95Ms: the candidate's p95, in seconds.", NAMED
)
MC_ACCURACY_DROP = Gauge(
    "kiln_modelcompression_accuracy_drop", "status.report.accuracyDrop: source metric - candidate metric.", NAMED
)
MC_AGREEMENT = Gauge(
    "kiln_modelcompression_agreement_ratio", "status.report.agreement: top-1 agreement with the source.", NAMED
)
MC_GATE = Gauge(
    "kiln_modelcompression_gate_passed",
    "status.report.gates: 1 for a gate the candidate passed, 0 for one it failed.",
    [*NAMED, "gate"],
)
MC_PROMOTED_VERSION = Gauge(
    "kiln_modelcompression_promoted_version", "status.promoted.version: the registry version promoted.", NAMED
)

MD_ROLLBACKS = Counter(
    "kiln_modeldeployment_rollbacks_total",
    "Candidate revisions rolled back (status.history entries with outcome RolledBack), since the operator started.",
    NAMED,
)
MD_REPLICAS = Gauge("kiln_modeldeployment_replicas", "status.replicas: serving pods, all revisions.", NAMED)
MD_READY = Gauge("kiln_modeldeployment_ready_replicas", "status.readyReplicas: ready serving pods.", NAMED)
MD_CANARY_WEIGHT = Gauge(
    "kiln_modeldeployment_canary_weight_ratio", "status.canaryWeight / 100: the candidate's share of traffic.", NAMED
)
MD_REVISION = Gauge(
    "kiln_modeldeployment_revision",
    "The revision number serving in each role (current: status.current, candidate: status.candidate).",
    [*NAMED, "role"],
)
MD_MAX_P95 = Gauge(
    "kiln_modeldeployment_analysis_max_p95_latency_seconds",
    "spec.rollout.analysis.maxP95LatencyMs in seconds: the p95 the owner accepts (absent when not set).",
    NAMED,
)
MD_MAX_ERRORS = Gauge(
    "kiln_modeldeployment_analysis_max_error_ratio",
    "spec.rollout.analysis.maxErrorRate: the 5xx share the owner accepts (absent when not set).",
    NAMED,
)

PHASES: dict[str, tuple[str, ...]] = {
    "TrainingJob": tuple(tj_api.PHASES),
    "ModelCompression": tuple(mc_api.PHASES),
    "ModelDeployment": tuple(md_api.PHASES),
}

Obj = Mapping[str, Any]
Series = tuple[Any, tuple[str, ...]]  # (metric, label values)


def _number(value: Any) -> float | None:
    """A status field as a sample value: numbers only (a bool is not one, though Python says so)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _scaled(value: Any, factor: float) -> float | None:
    number = _number(value)
    return None if number is None else number * factor


class _Pass:
    """The series one version of an object has: set as they are listed, remembered so the rest can go. The
    children of the object's previous version are reused (``labels()`` is most of the cost of an update)."""

    def __init__(self, previous: dict[Series, Any]) -> None:
        self.previous = previous
        self.series: dict[Series, Any] = {}

    def _child(self, metric: Any, labels: tuple[str, ...]) -> Any:
        child = self.previous.get((metric, labels))
        if child is None:
            child = metric.labels(*labels)
        self.series[(metric, labels)] = child
        return child

    def set(self, metric: Gauge, labels: tuple[str, ...], value: float | None) -> None:
        if value is not None:
            self._child(metric, labels).set(value)

    def counter(self, metric: Counter, labels: tuple[str, ...], increment: int = 0) -> None:
        # Created at 0 with the object, so the first increment is a rise that increase() sees.
        child = self._child(metric, labels)
        if increment:
            child.inc(increment)


def _status(obj: Obj | None) -> Obj:
    return (obj or {}).get("status") or {}


def _trainingjob(out: _Pass, named: tuple[str, str], old: Obj | None, new: Obj) -> None:
    status = _status(new)
    progress = status.get("progress") or {}
    out.set(TJ_STEP, named, _number(progress.get("step")))
    out.set(TJ_TOTAL_STEPS, named, _number(progress.get("totalSteps")))
    out.set(TJ_LOSS, named, _number(progress.get("loss")))
    out.set(TJ_SAMPLES, named, _number(progress.get("samplesPerSecond")))
    out.set(TJ_HEARTBEAT, named, parse_time(progress.get("heartbeatTime")))
    out.set(TJ_ATTEMPT, named, _number(status.get("attempt")))
    for budget, used in (status.get("restarts") or {}).items():
        out.set(TJ_RESTARTS, (*named, str(budget)), _number(used))
    out.set(TJ_GPU_SECONDS, named, _number(status.get("gpuSeconds")))


def _modelcompression(out: _Pass, named: tuple[str, str], old: Obj | None, new: Obj) -> None:
    status = _status(new)
    # The lifecycle posts its rejection Event on the same transition: into Rejected from any other phase.
    rejected = old is not None and status.get("phase") == "Rejected" and _status(old).get("phase") != "Rejected"
    out.counter(MC_REJECTIONS, named, int(rejected))
    report = status.get("report") or {}
    out.set(MC_SIZE_RATIO, named, _number(report.get("sizeRatio")))
    out.set(MC_SPEEDUP, named, _number(report.get("speedup")))
    out.set(MC_P95, named, _scaled(report.get("p95Ms"), 1e-3))
    out.set(MC_ACCURACY_DROP, named, _number(report.get("accuracyDrop")))
    out.set(MC_AGREEMENT, named, _number(report.get("agreement")))
    for gate in report.get("gates") or []:
        if isinstance(gate, Mapping) and gate.get("name") and isinstance(gate.get("passed"), bool):
            out.set(MC_GATE, (*named, str(gate["name"])), float(gate["passed"]))
    out.set(MC_PROMOTED_VERSION, named, _number((status.get("promoted") or {}).get("version")))


def _rollbacks(history: Any) -> set[tuple[Any, ...]]:
    return {
        (h.get("revision"), h.get("digest"), h.get("startTime"), h.get("endTime"))
        for h in history or []
        if isinstance(h, Mapping) and h.get("outcome") == "RolledBack"
    }


def _modeldeployment(out: _Pass, named: tuple[str, str], old: Obj | None, new: Obj) -> None:
    status = _status(new)
    # Every rollback appends one RolledBack entry to status.history, in the status write that posts its Event; an
    # entry this object's previous version lacked is a rollback (the history is capped, so only new ones count).
    rolled = _rollbacks(status.get("history")) - _rollbacks(_status(old).get("history")) if old is not None else set()
    out.counter(MD_ROLLBACKS, named, len(rolled))
    out.set(MD_REPLICAS, named, _number(status.get("replicas")))
    out.set(MD_READY, named, _number(status.get("readyReplicas")))
    out.set(MD_CANARY_WEIGHT, named, _scaled(status.get("canaryWeight"), 1e-2))
    for role in ("current", "candidate"):
        out.set(MD_REVISION, (*named, role), _number((status.get(role) or {}).get("revision")))
    analysis = ((new.get("spec") or {}).get("rollout") or {}).get("analysis") or {}
    out.set(MD_MAX_P95, named, _scaled(analysis.get("maxP95LatencyMs"), 1e-3))
    out.set(MD_MAX_ERRORS, named, _number(analysis.get("maxErrorRate")))


KINDS: dict[str, Callable[[_Pass, tuple[str, str], Obj | None, Obj], None]] = {
    "TrainingJob": _trainingjob,
    "ModelCompression": _modelcompression,
    "ModelDeployment": _modeldeployment,
}


class ObjectMetrics:
    """The series of the objects in the controllers' caches: ``update`` with each version a cache takes,
    ``forget`` when the object is deleted.

    Counters count transitions between two versions of one object that this process saw, so a pass repeated on
    the same state counts nothing (the cache only moves forward, by resourceVersion), and an object first seen
    after a restart counts nothing for what happened before. Called only from the operator's event loop."""

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, str], dict[Series, Any]] = {}  # per object: its series' children

    def update(self, kind: str, old: Obj | None, new: Obj) -> None:
        try:
            self._update(kind, old, new)
        except Exception:  # a metric is a report; never fail the cache (and so a pass) for one
            meta = new.get("metadata") or {}
            log.warning("metrics of %s %s/%s", kind, meta.get("namespace"), meta.get("name"), exc_info=True)

    def _update(self, kind: str, old: Obj | None, new: Obj) -> None:
        meta, status = new["metadata"], _status(new)
        obj = (kind, meta["namespace"], meta["name"])
        named = (meta["namespace"], meta["name"])
        previous = self._series.get(obj, {})
        out = _Pass(previous)
        phase = status.get("phase")
        phases = PHASES.get(kind, ())
        for p in phases if not phase or phase in phases else (*phases, str(phase)):
            out.set(PHASE, (*obj, p), float(p == phase))
        if not meta.get("deletionTimestamp"):  # nothing reconciles an object being deleted: no generation to lag
            out.set(GENERATION, obj, _number(meta.get("generation")) or 0.0)
            out.set(OBSERVED_GENERATION, obj, _number(status.get("observedGeneration")) or 0.0)
        if kind in KINDS:
            KINDS[kind](out, named, old, new)
        for metric, labels in previous.keys() - out.series.keys():
            _remove(metric, labels)
        self._series[obj] = out.series

    def forget(self, kind: str, namespace: str, name: str) -> None:
        for metric, labels in self._series.pop((kind, namespace, name), {}):
            _remove(metric, labels)


def _remove(metric: Any, labels: tuple[str, ...]) -> None:
    with contextlib.suppress(KeyError):  # already gone
        metric.remove(*labels)


objects = ObjectMetrics()


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
