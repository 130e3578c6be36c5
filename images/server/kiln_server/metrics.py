"""Prometheus metrics (docs/server.md "Metrics"): served on their own port, from their own registry."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0)
QUEUE_BUCKETS = (0.0001, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    """All series carry the label ``model`` (the served name); children are bound once, off the hot path."""

    def __init__(self, model: str, max_batch_size: int) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.model = model
        self._requests = Counter(
            "kiln_server_requests_total",
            "Inference requests answered, by HTTP status code.",
            ["model", "code"],
            registry=r,
        )
        self.request_duration = Histogram(
            "kiln_server_request_duration_seconds",
            "Inference request latency, from the request read to the response ready.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(model)
        self.queue_duration = Histogram(
            "kiln_server_queue_duration_seconds",
            "Time a request waited in the batching queue before its batch started.",
            ["model"],
            buckets=QUEUE_BUCKETS,
            registry=r,
        ).labels(model)
        self.inference_duration = Histogram(
            "kiln_server_inference_duration_seconds",
            "Time ONNX Runtime took for one batch (assembly and padding included).",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        ).labels(model)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, 512, max_batch_size})
        self.batch_size = Histogram(
            "kiln_server_batch_size",
            "Samples per executed batch (merged requests).",
            ["model"],
            buckets=[b for b in buckets if b <= max_batch_size],
            registry=r,
        ).labels(model)
        self.inflight = Gauge(
            "kiln_server_inflight_requests", "Inference requests being handled now.", ["model"], registry=r
        ).labels(model)
        self.queue_depth = Gauge(
            "kiln_server_queue_depth", "Requests waiting in the batching queue.", ["model"], registry=r
        ).labels(model)
        self.load_seconds = Gauge(
            "kiln_server_model_load_seconds", "Artifact verification and session creation time.", ["model"], registry=r
        ).labels(model)
        self.warmup_seconds = Gauge(
            "kiln_server_model_warmup_seconds", "Warm-up time before the model became ready.", ["model"], registry=r
        ).labels(model)
        self.ready = Gauge(
            "kiln_server_model_ready", "1 when the model is ready to serve.", ["model"], registry=r
        ).labels(model)
        self.inference_errors = Counter(
            "kiln_server_inference_errors_total",
            "Batches ONNX Runtime failed to run (requests that passed validation).",
            ["model"],
            registry=r,
        ).labels(model)
        self._provider = Gauge(
            "kiln_server_execution_provider_info",
            "1 for each execution provider active in the session, in priority order.",
            ["model", "provider"],
            registry=r,
        )
        self._codes: dict[int, Counter] = {}

    def request(self, code: int) -> None:
        child = self._codes.get(code)
        if child is None:
            child = self._codes[code] = self._requests.labels(self.model, str(code))
        child.inc()

    def providers(self, names: list[str]) -> None:
        for name in names:
            self._provider.labels(self.model, name).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class MonitorMetrics:
    """The monitoring series (docs/server.md "Monitoring"), in the server's registry, all with the label ``model``.
    Families are registered at start; their children once the model is loaded and its signals and classes are
    known, so every series is there from the first scrape."""

    def __init__(self, metrics: Metrics) -> None:
        r, model = metrics.registry, metrics.model
        self.model = model
        self.drift_score = Gauge(
            "kiln_server_drift_score",
            "Jensen-Shannon distance (base 2, 0..1) of the window's histogram of a signal from the reference's; "
            "NaN until there is a reference.",
            ["model", "signal"],
            registry=r,
        )
        self.drift_threshold = Gauge(
            "kiln_server_drift_threshold", "Over this score, the signal drifts.", ["model", "signal"], registry=r
        )
        self.window_samples = Gauge(
            "kiln_server_drift_window_samples", "Samples in the drift window now.", ["model"], registry=r
        ).labels(model)
        self.min_samples = Gauge(
            "kiln_server_drift_min_samples", "Samples the window needs before a drift verdict.", ["model"], registry=r
        ).labels(model)
        self.anomalies = Counter(
            "kiln_server_anomalies_total",
            "Anomalous samples by kind (low_confidence, input_out_of_range, unknown_tokens) against the reference.",
            ["model", "kind"],
            registry=r,
        )
        self.predictions = Counter(
            "kiln_server_predictions_total", "Samples answered, by predicted class.", ["model", "class"], registry=r
        )
        self.reference_info = Gauge(
            "kiln_server_reference_info",
            "1 for where the reference came from (artifact, uri, traffic); a traffic reference is 0 while its "
            "samples are being collected.",
            ["model", "source"],
            registry=r,
        )
        self.reference_samples = Gauge(
            "kiln_server_reference_samples",
            "Samples the reference was made of (traffic: collected so far, until complete).",
            ["model"],
            registry=r,
        ).labels(model)
        self.payload_records = Counter(
            "kiln_server_payload_log_records_total", "Payload-log records published.", ["model"], registry=r
        ).labels(model)
        self.payload_dropped = Counter(
            "kiln_server_payload_log_dropped_total",
            "Payload-log records lost: the queue was full, or their batch could not be published.",
            ["model"],
            registry=r,
        ).labels(model)
        self.payload_batches = Counter(
            "kiln_server_payload_log_batches_total", "Payload-log batches published.", ["model"], registry=r
        ).labels(model)
        self.payload_errors = Counter(
            "kiln_server_payload_log_errors_total",
            "Payload-log batches that could not be published.",
            ["model"],
            registry=r,
        ).labels(model)


class AuthMetrics:
    """Authentication and authorisation (docs/security.md), with --auth kubernetes only. Every child is bound at
    start: a request's count is one dictionary lookup and one increment."""

    RESULTS = ("allowed", "unauthenticated", "forbidden", "error")
    KINDS = ("token", "access")

    def __init__(self, metrics: Metrics) -> None:
        r, model = metrics.registry, metrics.model
        requests = Counter(
            "kiln_server_auth_requests_total",
            "Requests checked for a bearer token, by result (allowed, unauthenticated, forbidden, error: the "
            "Kubernetes API could not be asked).",
            ["model", "result"],
            registry=r,
        )
        self.requests = {result: requests.labels(model, result) for result in self.RESULTS}
        reviews = Counter(
            "kiln_server_auth_reviews_total",
            "Reviews sent to the Kubernetes API server: token (TokenReview), access (LocalSubjectAccessReview).",
            ["model", "kind"],
            registry=r,
        )
        self.reviews = {kind: reviews.labels(model, kind) for kind in self.KINDS}
        self.cache_entries = Gauge(
            "kiln_server_auth_cache_entries", "Token decisions cached now.", ["model"], registry=r
        ).labels(model)


class TlsMetrics:
    """The serving certificate (docs/security.md), with --tls-cert-file only."""

    def __init__(self, metrics: Metrics) -> None:
        r, model = metrics.registry, metrics.model
        reloads = Counter(
            "kiln_server_tls_reloads_total",
            "Changed certificate files loaded (success) or refused, keeping the previous pair (failure).",
            ["model", "result"],
            registry=r,
        )
        self.reloads = {result: reloads.labels(model, result) for result in ("success", "failure")}
        self.expiry = Gauge(
            "kiln_server_tls_certificate_expiry_timestamp_seconds",
            "When the certificate being served expires (notAfter), in seconds since the epoch.",
            ["model"],
            registry=r,
        ).labels(model)
