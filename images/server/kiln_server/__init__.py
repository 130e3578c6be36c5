"""kiln_server: the inference server of ModelDeployment pods (images/server; docs/server.md).

ONNX Runtime behind the Open Inference Protocol (KServe V2) over REST, with dynamic batching, a bounded queue,
per-request deadlines, Prometheus metrics on a separate port and a graceful shutdown. ``python -m kiln_server``.
"""

__version__ = "0.1.0"
