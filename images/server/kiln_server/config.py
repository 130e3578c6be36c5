"""Flags and environment variables. Every setting has both; a flag wins over its variable, which wins over the
default. A bad value of either is a usage error (exit 2) naming the flag or variable and the rule."""

from __future__ import annotations

import argparse
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields, replace
from pathlib import Path
from typing import Any

from kiln_artifacts.contract import TERMINATION_LOG, TERMINATION_LOG_ENV
from kiln_artifacts.errors import ArtifactError
from kiln_artifacts.signing import trusted_keys_option
from kiln_artifacts.uri import parse_uri, writable

PROVIDERS = ("auto", "cpu", "cuda", "tensorrt")
GRAPH_LEVELS = ("disable", "basic", "extended", "all")
# A drift signal's name, as the ModelDeployment API spells it; whether the model has that signal is known only
# once it is loaded (a name it does not have is logged and ignored, never a crash loop).
SIGNAL_NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
MAX_SAMPLES = 1_000_000


@dataclass(frozen=True)
class Config:
    model_uri: str
    model_name: str = "model"
    model_digest: str | None = None
    verify: str = "full"
    trusted_keys: str | None = None  # refuse an artifact not signed by one of these keys (exit 14)
    host: str = "0.0.0.0"
    port: int = 8080
    grpc_port: int | None = 8081
    metrics_port: int = 9090
    provider: str = "auto"
    device_id: int = 0
    intra_op_threads: int = 0
    inter_op_threads: int = 1
    allow_spinning: bool = False
    graph_optimization: str = "all"
    trt_cache_dir: str = "/tmp/kiln-trt-cache"
    instances: int = 1
    max_batch_size: int = 32
    text_bucket_size: int = 16
    max_queue_delay_ms: float = 0.0
    max_queue_size: int = 256
    max_body_bytes: int = 8 << 20
    default_timeout_ms: float = 0.0
    warmup_rounds: int = 2
    shutdown_delay_s: float = 3.0
    grace_period_s: float = 25.0
    log_level: str = "info"
    termination_log: str = TERMINATION_LOG
    monitoring: bool = True
    drift_window: int = 1000
    drift_max_age: float = 0.0
    drift_min_samples: int = 200
    drift_threshold: float = 0.2
    drift_thresholds: tuple[tuple[str, float], ...] = ()
    reference_uri: str | None = None
    reference_samples: int = 1000
    access_log_rate: float = 0.0
    payload_log_rate: float = 0.0
    payload_log_uri: str | None = None
    payload_log_batch_records: int = 500
    payload_log_batch_seconds: float = 60.0
    payload_log_redact: tuple[str, ...] = ()
    payload_log_hash: tuple[str, ...] = ()
    payload_log_queue: int = 10000
    deployment: str | None = None
    revision: str | None = None
    # Who may call the server, and TLS on its inference ports (docs/security.md).
    auth: str = "none"
    namespace: str | None = None
    auth_cache_ttl: float = 10.0
    auth_cache_size: int = 4096
    tls_cert_file: str | None = None
    tls_key_file: str | None = None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be >= 1")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0 or value == float("inf"):
        raise ValueError("must be a finite number >= 0")
    return value


def _port(text: str) -> int:
    value = int(text)
    if not 0 <= value <= 65535:
        raise ValueError("must be a port number 0-65535 (0: any free port)")
    return value


def _port_or_off(text: str) -> int | None:
    return None if text.strip().lower() == "off" else _port(text)


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError("must be true or false")


def _choice(options: Sequence[str]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in options:
            raise ValueError(f"must be one of {', '.join(options)}")
        return text

    return parse


def _at_most(limit: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        value = int(text)
        if not 1 <= value <= limit:
            raise ValueError(f"must be 1-{limit}")
        return value

    return parse


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or value == float("inf"):
        raise ValueError("must be a finite number > 0")
    return value


def _rate(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise ValueError("must be a number from 0 to 1")
    return value


def _threshold(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise ValueError("must be a number over 0 and at most 1")
    return value


def _on_off(text: str) -> bool:
    low = text.strip().lower()
    if low in ("on", "true", "1", "yes"):
        return True
    if low in ("off", "false", "0", "no"):
        return False
    raise ValueError("must be on or off")


def _thresholds(text: str) -> tuple[tuple[str, float], ...]:
    out: dict[str, float] = {}
    for item in text.split(","):
        name, eq, value = item.strip().partition("=")
        name = name.strip()
        if not eq or not SIGNAL_NAME.match(name):
            raise ValueError(
                f"must be signal=threshold pairs separated by commas, e.g. tokens=0.3,prediction=0.1 ({item.strip()!r})"
            )
        if name in out:
            raise ValueError(f"signal {name!r} given twice")
        try:
            out[name] = _threshold(value.strip())
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
    return tuple(sorted(out.items()))


def _names(text: str) -> tuple[str, ...]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names or any(len(n) > 256 for n in names):
        raise ValueError("must be input names separated by commas (each at most 256 characters)")
    return tuple(dict.fromkeys(names))


def _reference(text: str) -> str:
    """A local path, or a URI kiln_artifacts reads (checked now: a typo is a usage error, not a crash loop)."""
    if not text:
        raise ValueError("must not be empty")
    if "://" in text:
        try:
            parse_uri(text, field="uri")
        except ArtifactError as e:
            raise ValueError(str(e).removeprefix("uri: ")) from None
    return text


def _store(text: str) -> str:
    try:
        writable(parse_uri(text, field="uri"))
    except ArtifactError as e:
        raise ValueError(str(e).removeprefix("uri: ")) from None
    return text


def _object_name(text: str) -> str:
    # It names payload-log artifacts too, so it must be a path segment no store reserves.
    if not 1 <= len(text) <= 253 or not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]*$", text):
        raise ValueError("must be 1-253 ASCII letters, digits, '.', '_' or '-', starting with a letter or digit")
    return text


def _text(text: str) -> str:
    if not text:
        raise ValueError("must not be empty")
    return text


def _model_name(text: str) -> str:
    if not text or len(text) > 128 or not all(c.isalnum() or c in "._-" for c in text) or not text.isascii():
        raise ValueError("must be 1-128 ASCII letters, digits, '.', '_' or '-'")
    return text


# ----------------------------------------------------------------- authentication, authorisation, TLS
AUTH_MODES = ("none", "kubernetes")
# Where a pod's ServiceAccount volume says which namespace the pod runs in.
POD_NAMESPACE_FILE = "/var/run/secrets/kubernetes.io/serviceaccount/namespace"
MAX_AUTH_CACHE_TTL = 3600.0
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


def _namespace(text: str) -> str:
    if not _DNS_LABEL.match(text):
        raise ValueError(
            "must be a namespace name: 1-63 lowercase letters, digits or '-', starting and ending alphanumeric"
        )
    return text


def _cache_ttl(text: str) -> float:
    value = float(text)
    if not 0 <= value <= MAX_AUTH_CACHE_TTL:
        raise ValueError(f"must be a number of seconds from 0 to {MAX_AUTH_CACHE_TTL:g}")
    return value


def _readable_file(text: str) -> str:
    # Checked now: a path that cannot be read is a usage error at start, not a failure on the first handshake.
    if not text:
        raise ValueError("must not be empty")
    try:
        with open(text, "rb") as f:
            f.read(1)
    except OSError as e:
        raise ValueError(f"cannot be read: {e.strerror or e}") from None
    return text


# field -> (environment variable, parser, help)
OPTIONS: dict[str, tuple[str, Callable[[str], Any], str]] = {
    "model_uri": ("KILN_MODEL_URI", _text, "the model artifact (file://, pvc://, s3://; format onnx). Required"),
    "model_name": ("KILN_MODEL_NAME", _model_name, "the name served under /v2/models/<name> (default: model)"),
    "model_digest": ("KILN_MODEL_DIGEST", _text, "refuse to start unless the artifact has this digest (sha256:...)"),
    "verify": ("KILN_SERVER_VERIFY", _choice(("full", "lazy")), "artifact verification: full (default) or lazy"),
    "trusted_keys": (
        "KILN_SERVER_TRUSTED_KEYS",
        trusted_keys_option,
        "directory of Ed25519 public keys (PEM, one per file): serve only an artifact signed by one of them",
    ),
    "host": ("KILN_SERVER_HOST", _text, "address to listen on (default 0.0.0.0)"),
    "port": ("KILN_SERVER_PORT", _port, "inference and health port (default 8080)"),
    "grpc_port": ("KILN_SERVER_GRPC_PORT", _port_or_off, "Open Inference Protocol over gRPC (default 8081; off: none)"),
    "metrics_port": ("KILN_SERVER_METRICS_PORT", _port, "Prometheus /metrics port (default 9090)"),
    "provider": ("KILN_SERVER_PROVIDER", _choice(PROVIDERS), "execution provider: auto (default), cpu, cuda, tensorrt"),
    "device_id": ("KILN_SERVER_DEVICE_ID", _non_negative_int, "GPU index for cuda/tensorrt (default 0)"),
    "intra_op_threads": ("KILN_SERVER_INTRA_OP_THREADS", _non_negative_int, "ORT intra-op threads (0: ORT default)"),
    "inter_op_threads": ("KILN_SERVER_INTER_OP_THREADS", _non_negative_int, "ORT inter-op threads (default 1)"),
    "allow_spinning": ("KILN_SERVER_ALLOW_SPINNING", _bool, "let ORT worker threads spin between runs (default off)"),
    "graph_optimization": ("KILN_SERVER_GRAPH_OPTIMIZATION", _choice(GRAPH_LEVELS), "ORT graph optimisation level"),
    "trt_cache_dir": ("KILN_SERVER_TRT_CACHE_DIR", _text, "TensorRT engine cache (default /tmp/kiln-trt-cache)"),
    "instances": (
        "KILN_SERVER_INSTANCES",
        _positive_int,
        "batches run at the same time, each taking its share of the queue (CPU: one per core, 1 intra-op thread)",
    ),
    "max_batch_size": ("KILN_SERVER_MAX_BATCH_SIZE", _positive_int, "largest merged batch, in samples (default 32)"),
    "text_bucket_size": (
        "KILN_SERVER_TEXT_BUCKET_SIZE",
        _non_negative_int,
        "text batches larger than this run sorted by length in chunks of it (0: off; default 16)",
    ),
    "max_queue_delay_ms": ("KILN_SERVER_MAX_QUEUE_DELAY_MS", _non_negative_float, "longest wait to fill a batch"),
    "max_queue_size": ("KILN_SERVER_MAX_QUEUE_SIZE", _positive_int, "queued requests before 429 (default 256)"),
    "max_body_bytes": ("KILN_SERVER_MAX_BODY_BYTES", _positive_int, "largest request body (default 8 MiB)"),
    "default_timeout_ms": ("KILN_SERVER_DEFAULT_TIMEOUT_MS", _non_negative_float, "deadline when a request has none"),
    "warmup_rounds": ("KILN_SERVER_WARMUP_ROUNDS", _positive_int, "warm-up runs per shape before Ready (default 2)"),
    "shutdown_delay_s": ("KILN_SERVER_SHUTDOWN_DELAY_S", _non_negative_float, "after SIGTERM: keep serving, unready"),
    "grace_period_s": ("KILN_SERVER_GRACE_PERIOD_S", _non_negative_float, "after SIGTERM: longest drain (default 25)"),
    "log_level": ("KILN_SERVER_LOG_LEVEL", _choice(("debug", "info", "warning", "error")), "log level (default info)"),
    "termination_log": (TERMINATION_LOG_ENV, _text, "startup failures are written here if it exists"),
    "monitoring": (
        "KILN_SERVER_MONITORING",
        _on_off,
        "drift, anomalies, predictions by class and the payload log: on (default) or off",
    ),
    "drift_window": ("KILN_SERVER_DRIFT_WINDOW", _at_most(MAX_SAMPLES), "drift is measured over the last N samples"),
    "drift_max_age": (
        "KILN_SERVER_DRIFT_MAX_AGE",
        _non_negative_float,
        "and over none older than this many seconds (0: no age limit)",
    ),
    "drift_min_samples": (
        "KILN_SERVER_DRIFT_MIN_SAMPLES",
        _at_most(MAX_SAMPLES),
        "samples in the window before a drift verdict (exported for alerts and the operator)",
    ),
    "drift_threshold": (
        "KILN_SERVER_DRIFT_THRESHOLD",
        _threshold,
        "a signal drifts over this Jensen-Shannon distance, in (0, 1]",
    ),
    "drift_thresholds": (
        "KILN_SERVER_DRIFT_THRESHOLDS",
        _thresholds,
        "per-signal thresholds over --drift-threshold: signal=X,... (e.g. tokens=0.3)",
    ),
    "reference_uri": (
        "KILN_SERVER_REFERENCE_URI",
        _reference,
        "the reference profile instead of the artifact's: a kiln-profile.json or an artifact holding one",
    ),
    "reference_samples": (
        "KILN_SERVER_REFERENCE_SAMPLES",
        _at_most(MAX_SAMPLES),
        "without a profile, the reference is built from the first N samples served",
    ),
    "access_log_rate": (
        "KILN_SERVER_ACCESS_LOG_RATE",
        _rate,
        "share of requests logged as JSON lines on stderr (logger kiln_server.access), 0-1",
    ),
    "payload_log_rate": (
        "KILN_SERVER_PAYLOAD_LOG_RATE",
        _rate,
        "share of requests and responses written to --payload-log-uri, 0-1",
    ),
    "payload_log_uri": (
        "KILN_SERVER_PAYLOAD_LOG_URI",
        _store,
        "where payload-log batches are published, one dataset artifact each (file://, pvc://, s3://)",
    ),
    "payload_log_batch_records": (
        "KILN_SERVER_PAYLOAD_LOG_BATCH_RECORDS",
        _at_most(MAX_SAMPLES),
        "records per payload-log batch",
    ),
    "payload_log_batch_seconds": (
        "KILN_SERVER_PAYLOAD_LOG_BATCH_SECONDS",
        _positive_float,
        "a partial payload-log batch is published this long after its first record",
    ),
    "payload_log_redact": (
        "KILN_SERVER_PAYLOAD_LOG_REDACT",
        _names,
        'inputs written as "[redacted]" in the payload log: name,...',
    ),
    "payload_log_hash": (
        "KILN_SERVER_PAYLOAD_LOG_HASH",
        _names,
        "inputs written as their SHA-256 in the payload log: name,...",
    ),
    "payload_log_queue": (
        "KILN_SERVER_PAYLOAD_LOG_QUEUE",
        _at_most(10 * MAX_SAMPLES),
        "payload-log records held before writing; more are dropped (and counted)",
    ),
    "deployment": ("KILN_SERVER_DEPLOYMENT", _object_name, "the ModelDeployment, for access logs and payload records"),
    "revision": ("KILN_SERVER_REVISION", _object_name, "the revision, for access logs and payload records"),
    "auth": (
        "KILN_SERVER_AUTH",
        _choice(AUTH_MODES),
        "who may call: none (default) or kubernetes (a bearer token the cluster authorises for --deployment)",
    ),
    "namespace": (
        "KILN_SERVER_NAMESPACE",
        _namespace,
        "the ModelDeployment's namespace, where access is checked (default: the pod's own namespace)",
    ),
    "auth_cache_ttl": (
        "KILN_SERVER_AUTH_CACHE_TTL",
        _cache_ttl,
        "seconds a token's decision (allowed or denied) is reused, 0-3600 (0: every request is reviewed)",
    ),
    "auth_cache_size": ("KILN_SERVER_AUTH_CACHE_SIZE", _at_most(MAX_SAMPLES), "tokens whose decision is cached"),
    "tls_cert_file": (
        "KILN_SERVER_TLS_CERT_FILE",
        _readable_file,
        "PEM certificate chain: the inference ports serve TLS only (reloaded when it changes)",
    ),
    "tls_key_file": ("KILN_SERVER_TLS_KEY_FILE", _readable_file, "PEM private key of --tls-cert-file"),
}


class UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # type: ignore[override]
        raise UsageError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m kiln_server", description="Kiln inference server (Open Inference Protocol).")
    defaults = {f.name: f.default for f in fields(Config) if f.default is not MISSING}
    for name, (env, _parse, help_text) in OPTIONS.items():
        default = defaults.get(name)
        shown = "" if default in (None, ()) else f"; default {default}"
        parser.add_argument("--" + name.replace("_", "-"), dest=name, help=f"{help_text} [${env}{shown}]")
    return parser


def parse_config(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Flags, then environment variables, then defaults. Raises UsageError naming the flag or variable."""
    env = os.environ if env is None else env
    args = vars(build_parser().parse_args(list(argv) if argv is not None else None))
    values: dict[str, Any] = {}
    for name, (var, parse, _help) in OPTIONS.items():
        flag = "--" + name.replace("_", "-")
        if args.get(name) is not None:
            raw, where = args[name], flag
        elif env.get(var) not in (None, ""):
            raw, where = env[var], var
        else:
            continue
        try:
            values[name] = parse(raw)
        except ValueError as e:
            raise UsageError(f"{where}: {e} (got {raw!r})") from None
    if "model_uri" not in values:
        raise UsageError("--model-uri (or $KILN_MODEL_URI) is required")
    config = Config(**values)
    if config.payload_log_rate > 0 and not config.payload_log_uri:
        raise UsageError("--payload-log-uri (or $KILN_SERVER_PAYLOAD_LOG_URI) is required when --payload-log-rate > 0")
    both = sorted(set(config.payload_log_redact) & set(config.payload_log_hash))
    if both:
        raise UsageError(f"--payload-log-hash: {', '.join(map(repr, both))} is also in --payload-log-redact")
    ports = {"--port": config.port, "--grpc-port": config.grpc_port, "--metrics-port": config.metrics_port}
    seen: dict[int, str] = {}
    for flag, port in ports.items():
        if port and port in seen:
            raise UsageError(f"{flag}: must differ from {seen[port]} (both {port})")
        if port:
            seen[port] = flag
    return _check_security(config)


def _check_security(config: Config) -> Config:
    """The flags of --auth and TLS that only make sense together; the namespace defaults to the pod's own."""
    if bool(config.tls_cert_file) != bool(config.tls_key_file):
        given, missing = (
            ("--tls-cert-file", "--tls-key-file") if config.tls_cert_file else ("--tls-key-file", "--tls-cert-file")
        )
        raise UsageError(f"{missing}: required with {given} (both or neither)")
    if config.auth != "kubernetes":
        return config
    if config.namespace is None:
        try:
            namespace = Path(POD_NAMESPACE_FILE).read_text().strip()
        except OSError:
            namespace = ""
        if not namespace:
            raise UsageError(
                f"--namespace (or $KILN_SERVER_NAMESPACE) is required with --auth kubernetes outside a pod "
                f"({POD_NAMESPACE_FILE} is absent)"
            )
        try:
            config = replace(config, namespace=_namespace(namespace))
        except ValueError as e:
            raise UsageError(f"--namespace: from {POD_NAMESPACE_FILE}: {e} (got {namespace!r})") from None
    if config.deployment is None:
        raise UsageError(
            "--deployment (or $KILN_SERVER_DEPLOYMENT) is required with --auth kubernetes: callers are authorised "
            "for that ModelDeployment"
        )
    if not _DNS_SUBDOMAIN.match(config.deployment):
        raise UsageError(
            f"--deployment: must be a ModelDeployment name with --auth kubernetes: lowercase letters, digits, '-' or "
            f"'.', starting and ending alphanumeric (got {config.deployment!r})"
        )
    return config
