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
