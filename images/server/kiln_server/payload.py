"""The payload log (docs/server.md "Payload log"): a sampled share of requests and their answers, published in
batches as dataset artifacts (JSON Lines) under ``--payload-log-uri``.

Serving only decides whether a request is sampled and appends a reference to its parsed inputs and logits to a
bounded queue (full: the record is dropped and counted; serving never waits). A background thread turns records
into JSON, redacting and hashing the named inputs, and publishes a batch every ``--payload-log-batch-records``
records or ``--payload-log-batch-seconds`` after a batch's first record. ``kiln_artifacts.publish`` is atomic, so
a process killed mid-batch leaves no artifact that looks complete; publish errors are counted and logged once per
kind, and the server serves on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import re
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kiln_artifacts.uri import parse_uri

from .metrics import MonitorMetrics
from .protocol import Tensor

log = logging.getLogger("kiln_server")

RECORDS_FILE = "records.jsonl"
FORMAT = "jsonl"
SCHEMA = "kiln.dev/payload-log/v1"
REDACTED = "[redacted]"
# Annotations of every batch artifact: what a platform team filters payload logs by.
ANNOTATION_PREFIX = "kiln.dev/"


@dataclass(frozen=True)
class Record:
    """One sampled request as serving hands it over: references only, turned into JSON by the writer thread."""

    time: float  # wall clock, seconds since the epoch
    queued: float  # monotonic: a batch is due batch_seconds after its first record
    request_id: str
    inputs: Mapping[str, Tensor]
    logits: np.ndarray


def rfc3339(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def tensor_value(t: Tensor) -> Any:
    """A request tensor as JSON: nested lists in its shape; BYTES elements as text (UTF-8, as the model read
    them; bytes that are not UTF-8 with replacement characters)."""
    if isinstance(t.data, np.ndarray):
        return t.data.tolist()
    flat = [b.decode("utf-8", "replace") if isinstance(b, bytes) else str(b) for b in t.data]
    return _nest(flat, t.shape)


def _nest(flat: list[str], shape: Sequence[int]) -> list[Any]:
    if len(shape) <= 1:
        return flat
    step = math.prod(shape[1:])
    return [_nest(flat[i * step : (i + 1) * step], shape[1:]) for i in range(shape[0])]


def sha256_of(value: Any) -> str:
    """The hash that replaces an input in --payload-log-hash: sha256 of the compact JSON of the value it stands
    for (what the record would have held), so anyone can compute it for a value and look it up."""
    return hashlib.sha256(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def _segment(text: str) -> str:
    """A host name as a safe artifact-name part."""
    return re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")[:63] or "host"


class PayloadLog:
    """The bounded queue, the writer thread and the batches it publishes."""

    def __init__(
        self,
        *,
        uri: str,
        rate: float,
        batch_records: int,
        batch_seconds: float,
        queue: int,
        redact: Sequence[str],
        hash_inputs: Sequence[str],
        model_name: str,
        model_digest: str,
        model_uri: str,
        task: str,
        labels: Sequence[str] | None,
        deployment: str | None,
        revision: str | None,
        metrics: MonitorMetrics,
        publish: Callable[..., Any] | None = None,
        host: str | None = None,
    ) -> None:
        self.uri = parse_uri(uri, field="--payload-log-uri")
        self.rate = rate
        self.batch_records = batch_records
        self.batch_seconds = batch_seconds
        self.capacity = queue
        self.redact = frozenset(redact)
        self.hash_inputs = frozenset(hash_inputs)
        self.model_name = model_name
        self.model_digest = model_digest
        self.model_uri = model_uri
        self.task = task
        self.labels = tuple(labels) if labels else None
        self.deployment = deployment
        self.revision = revision
        self.metrics = metrics
        self._publish = publish
        # Artifact names: <revision>-<UTC time of the first record>-<host>-<sequence>. Replicas of a revision share
        # the location, and the pod name (the host name) tells them apart; the sequence orders one process's.
        self._prefix = f"{revision or model_name}"
        self._host = _segment(host if host is not None else socket.gethostname())
        self._seq = 0
        self._pending: deque[Record] = deque()
        self._held = 0  # records accepted and not yet published or lost: queued, or in the batch being written
        self._cond = threading.Condition(threading.Lock())
        self._closing = False
        self._warned: set[str] = set()
        self._thread: threading.Thread | None = None
        self._random = random.random

    # ------------------------------------------------------------------ serving side (event loop)
    def sampled(self) -> bool:
        return self.rate >= 1 or (self.rate > 0 and self._random() < self.rate)

    def offer(self, request_id: str, inputs: Mapping[str, Tensor], logits: np.ndarray) -> bool:
        """Queue a record; False (and counted as dropped) when the queue is full or the log is closing."""
        with self._cond:
            if self._held >= self.capacity or self._closing:
                accepted = False
            else:
                self._pending.append(Record(time.time(), time.monotonic(), request_id, inputs, logits))
                self._held += 1
                accepted = True
                # Wake the writer only when it has something new to decide: a first record (its batch timer
                # starts) or a full batch; not on every record.
                if len(self._pending) == 1 or len(self._pending) >= self.batch_records:
                    self._cond.notify()
        if not accepted:
            self.metrics.payload_dropped.inc()
        return accepted

    @property
    def held(self) -> int:
        with self._cond:
            return self._held

    # ------------------------------------------------------------------ the writer thread
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kiln-payload-log", daemon=True)
        self._thread.start()

    def close(self, timeout: float) -> bool:
        """Publish what is held and stop the writer (within ``timeout`` seconds); True when all was written."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        if self._thread is None:
            return not self._pending
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("payload log: %d records not published within %.1fs of shutting down", self.held, timeout)
            return False
        return True

    def _next_batch(self) -> list[Record]:
        """Wait until a batch is due (full, old enough, or closing) and take it; empty when closed and done."""
        with self._cond:
            while True:
                if len(self._pending) >= self.batch_records or (self._closing and self._pending):
                    break
                if self._closing:
                    return []
                if self._pending:
                    left = self._pending[0].queued + self.batch_seconds - time.monotonic()
                    if left <= 0:
                        break
                    self._cond.wait(left)
                else:
                    self._cond.wait()
            n = min(self.batch_records, len(self._pending))
            return [self._pending.popleft() for _ in range(n)]

    def _run(self) -> None:
        while True:
            batch = self._next_batch()
            if not batch:
                return
            try:
                self.write(batch)
            finally:
                with self._cond:
                    self._held -= len(batch)

    def write(self, batch: Sequence[Record]) -> str | None:
        """Publish one batch as an artifact; its URI, or None when it failed (counted and logged once per kind)."""
        self._seq += 1
        name = f"{self._prefix}-{_compact(batch[0].time)}-{self._host}-{self._seq:06d}"
        lines: list[str] = []
        lost = 0
        folder = Path(tempfile.mkdtemp(prefix="kiln-payload-log-"))
        try:
            for r in batch:
                try:
                    lines.append(json.dumps(self.record(r), ensure_ascii=False, allow_nan=False))
                except ValueError:  # non-finite logits: the request failed with 500 anyway; nothing to learn from
                    lost += 1
            if lost:
                self.metrics.payload_dropped.inc(lost)
            if not lines:
                return None
            (folder / RECORDS_FILE).write_text("\n".join(lines) + "\n", encoding="utf-8")
            dest = str(self.uri.join(name))
            publish = self._publish
            if publish is None:
                from kiln_artifacts import publish
            publish(
                folder,
                dest,
                format=FORMAT,
                kind="dataset",
                task=self.task,
                lineage={"parents": [self.model_digest], "source": f"kiln-server payload log of {self.model_uri}"},
                annotations=self._annotations(batch, len(lines)),
            )
        except Exception as e:
            self.metrics.payload_errors.inc()
            self.metrics.payload_dropped.inc(len(batch) - lost)
            kind = type(e).__name__
            if kind not in self._warned:
                self._warned.add(kind)
                log.warning(
                    "payload log: batch %s (%d records) not published: %s: %s (further %s errors are counted in "
                    "kiln_server_payload_log_errors_total, not logged)",
                    name,
                    len(batch),
                    kind,
                    str(e)[:500],
                    kind,
                )
            return None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.metrics.payload_batches.inc()
        self.metrics.payload_records.inc(len(lines))
        log.debug("payload log: published %s (%d records)", dest, len(lines))
        return dest

    def _annotations(self, batch: Sequence[Record], records: int) -> dict[str, str]:
        out = {
            "schema": SCHEMA,
            "model": self.model_name,
            "records": str(records),
            "first-record": rfc3339(batch[0].time),
            "last-record": rfc3339(batch[-1].time),
        }
        if self.deployment:
            out["deployment"] = self.deployment
        if self.revision:
            out["revision"] = self.revision
        return {ANNOTATION_PREFIX + k: v for k, v in out.items()}

    def record(self, r: Record) -> dict[str, Any]:
        """One JSON Lines record."""
        inputs: dict[str, Any] = {}
        for name, tensor in r.inputs.items():
            if name in self.redact:
                inputs[name] = REDACTED
            elif name in self.hash_inputs:
                inputs[name] = sha256_of(tensor_value(tensor))
            else:
                inputs[name] = tensor_value(tensor)
        outputs: dict[str, Any] = {"logits": r.logits.tolist()}
        if self.labels:
            outputs["label"] = [self.labels[i] for i in r.logits.argmax(axis=1).tolist()]
        return {
            "time": rfc3339(r.time),
            "request_id": r.request_id,
            "model": self.model_name,
            "model_digest": self.model_digest,
            "deployment": self.deployment,
            "revision": self.revision,
            "inputs": inputs,
            "outputs": outputs,
        }


def _compact(t: float) -> str:
    """UTC time as a name part that sorts: 20261125T101500.123Z."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"


__all__ = ["RECORDS_FILE", "REDACTED", "PayloadLog", "Record", "rfc3339", "sha256_of", "tensor_value"]
