"""What the operator reads of the inference servers: for canary analysis, one revision's request count, 5xx
count, p95 latency and answers by class over a recent window; for monitoring, each server's drift gauges (its
window against the model's reference profile).

Two sources, one result (`Sample`):

- `Prometheus`: the production path, PromQL over Prometheus' HTTP API (``/api/v1/query``) on the series that
  kiln_server exports (docs/server.md "Metrics") and the pod labels Prometheus attaches as target labels.
- `scrape` + `since`: when no Prometheus is configured, the operator reads the pods' ``/metrics`` itself, keeps
  the cumulative counters from the start of the window and subtracts; `quantile` reproduces Prometheus'
  ``histogram_quantile`` so that both paths judge latency the same way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

import aiohttp
from prometheus_client.parser import text_string_to_metric_families

log = logging.getLogger("kiln.analysis")

REQUESTS = "kiln_server_requests_total"
DURATION_BUCKET = "kiln_server_request_duration_seconds_bucket"
PREDICTIONS = "kiln_server_predictions_total"
DRIFT_SCORE = "kiln_server_drift_score"
DRIFT_THRESHOLD = "kiln_server_drift_threshold"
WINDOW_SAMPLES = "kiln_server_drift_window_samples"
MIN_SAMPLES = "kiln_server_drift_min_samples"
ANOMALIES = "kiln_server_anomalies_total"
REFERENCE_INFO = "kiln_server_reference_info"
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


@dataclass(frozen=True)
class Sample:
    """What the analysis judges a revision by, over one window."""

    requests: float  # inference requests answered in the window (all codes)
    errors: float  # of them with a 5xx code
    p95_ms: float | None  # p95 request latency in ms; None when there were no requests
    predictions: Mapping[str, float] | None = None  # answers by predicted class, when asked for

    @property
    def error_rate(self) -> float:
        return self.errors / self.requests if self.requests > 0 else 0.0


@dataclass(frozen=True)
class PodDrift:
    """One server's drift figures (its own window against its reference), as its gauges say now."""

    samples: float
    min_samples: float
    reference: str  # artifact, uri or traffic ("" when the server has none yet)
    scores: Mapping[str, float]
    thresholds: Mapping[str, float]
    anomalies: Mapping[str, float]


class AnalysisUnavailable(Exception):
    """Metrics could not be read (Prometheus down, bad answer, no target reachable); the message says which URL
    and why."""


# ------------------------------------------------------------------ PromQL


def escape_label_value(value: str) -> str:
    """A PromQL double-quoted string body: backslash first, or the escapes added after it would be doubled."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def promql_selector(selector: Mapping[str, str], *extra: str) -> str:
    """``{name="value",...}`` with exact matchers for `selector`, then the raw matchers in `extra`."""
    parts = []
    for name, value in selector.items():
        # A label name cannot be quoted in PromQL 2.x: refuse one that would change the query's meaning.
        if not _LABEL_NAME.fullmatch(name):
            raise ValueError(f"not a Prometheus label name: {name!r}")
        parts.append(f'{name}="{escape_label_value(value)}"')
    return "{" + ",".join([*parts, *extra]) + "}"


def promql_queries(selector: Mapping[str, str], window_s: float) -> tuple[str, str, str]:
    """The (requests, errors, p95 in ms) queries for `selector` over the last `window_s` seconds."""
    # Prometheus durations are whole units here; under a second the range would select no samples at all.
    w = f"[{max(1, int(window_s))}s]"
    sel = promql_selector(selector)
    errors = promql_selector(selector, 'code=~"5.."')
    return (
        f"sum(increase({REQUESTS}{sel}{w}))",
        f"sum(increase({REQUESTS}{errors}{w}))",
        f"histogram_quantile(0.95, sum by (le) (increase({DURATION_BUCKET}{sel}{w}))) * 1000",
    )


def prediction_query(selector: Mapping[str, str], window_s: float) -> str:
    """Answers by predicted class over the last `window_s` seconds."""
    return f"sum by (class) (increase({PREDICTIONS}{promql_selector(selector)}[{max(1, int(window_s))}s]))"


class Prometheus:
    """A client of one Prometheus server's query API; one HTTP session, opened on first use."""

    def __init__(self, url: str, *, timeout: float = 10) -> None:
        self.url = url.rstrip("/")
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=self._timeout, headers={"User-Agent": "kiln-operator"})
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def sample(self, selector: Mapping[str, str], window_s: float) -> Sample:
        requests_q, errors_q, p95_q = promql_queries(selector, window_s)
        # return_exceptions: all three finish (bounded by the timeout) before we raise, no query is left running.
        results = await asyncio.gather(
            self._scalar(requests_q), self._scalar(errors_q), self._scalar(p95_q), return_exceptions=True
        )
        values: list[float | None] = []
        for r in results:
            if isinstance(r, BaseException):
                raise r
            values.append(r)
        requests, errors, p95 = values
        if requests is None or requests <= 0:
            # No request in the window: no errors and no latency to speak of, whatever extrapolation says.
            return Sample(0.0, 0.0, None)
        if p95 is not None and math.isnan(p95):  # histogram_quantile of empty buckets
            p95 = None
        return Sample(requests, errors or 0.0, p95)

    async def predictions(self, selector: Mapping[str, str], window_s: float) -> dict[str, float]:
        """Answers by predicted class in the window."""
        out: dict[str, float] = {}
        for series in await self.query(prediction_query(selector, window_s)):
            try:
                value = float(series["value"][1])
            except (KeyError, IndexError, TypeError, ValueError):
                continue
            if math.isfinite(value):
                out[str(series.get("metric", {}).get("class", ""))] = value
        return out

    async def drift(self, selector: Mapping[str, str]) -> list[PodDrift]:
        """Each pod's drift gauges, as Prometheus last scraped them."""
        sel = promql_selector(selector)
        names = (DRIFT_SCORE, DRIFT_THRESHOLD, WINDOW_SAMPLES, MIN_SAMPLES, ANOMALIES, REFERENCE_INFO)
        results = await asyncio.gather(*(self.query(f"{n}{sel}") for n in names), return_exceptions=True)
        samples: list[tuple[str, dict[str, str], float]] = []
        for name, result in zip(names, results, strict=True):
            if isinstance(result, BaseException):
                raise result
            for series in result:
                try:
                    metric, value = dict(series["metric"]), float(series["value"][1])
                except (KeyError, IndexError, TypeError, ValueError):
                    continue
                samples.append((name, metric, value))
        by_pod: dict[str, list[tuple[str, dict[str, str], float]]] = {}
        for name, metric, value in samples:
            by_pod.setdefault(metric.get("pod") or metric.get("instance", ""), []).append((name, metric, value))
        return [d for rows in by_pod.values() if (d := _pod_drift(rows)) is not None]

    async def query(self, promql: str) -> list[dict[str, Any]]:
        """The result vector of an instant query at the current time."""
        endpoint = f"{self.url}/api/v1/query"
        where = f"Prometheus at {self.url}"
        try:
            async with self._open().get(endpoint + "?" + urlencode({"query": promql})) as response:
                text = await response.text()
                status = response.status
        except (aiohttp.ClientError, TimeoutError) as e:
            raise AnalysisUnavailable(f"{where}: {endpoint}: {type(e).__name__}: {e}"[:500]) from e
        try:
            doc = json.loads(text)
        except ValueError:
            doc = None
        if status != 200:
            detail = doc.get("error") if isinstance(doc, dict) else None
            raise AnalysisUnavailable(f"{where}: HTTP {status} for {promql!r}: {detail or text[:200]!r}"[:500])
        if not isinstance(doc, dict):
            raise AnalysisUnavailable(f"{where}: not a JSON object for {promql!r}: {text[:200]!r}")
        if doc.get("status") != "success":
            raise AnalysisUnavailable(f"{where}: status {doc.get('status')!r} for {promql!r}: {doc.get('error')!r}")
        data = doc.get("data")
        if not isinstance(data, dict) or data.get("resultType") != "vector" or not isinstance(data.get("result"), list):
            raise AnalysisUnavailable(f"{where}: expected a vector result for {promql!r}, got {text[:200]!r}")
        return data["result"]

    async def _scalar(self, promql: str) -> float | None:
        """The single value of an aggregated query; None when the vector is empty (no matching series)."""
        result = await self.query(promql)
        if not result:
            return None
        try:
            if len(result) != 1:
                raise ValueError(f"{len(result)} series")
            return float(result[0]["value"][1])  # Prometheus writes sample values as strings ("NaN", "+Inf")
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise AnalysisUnavailable(
                f"Prometheus at {self.url}: expected one sample for {promql!r}, got {result!r:.200} ({e})"
            ) from None


# ------------------------------------------------------------------ direct scrape


@dataclass(frozen=True)
class Counters:
    """Cumulative values read from ONE pod's /metrics."""

    requests: float
    errors: float
    buckets: tuple[tuple[float, float], ...]  # (le, cumulative count), sorted by le, +Inf last; summed over label sets
    predictions: tuple[tuple[str, float], ...] = ()  # (class, cumulative answers), sorted by class
    drift: PodDrift | None = None  # None: the server does not monitor


def _pod_drift(rows: Iterable[tuple[str, Mapping[str, str], float]]) -> PodDrift | None:
    """A PodDrift from one server's (metric name, labels, value) samples; None without a window gauge."""
    samples = min_samples = None
    reference = ""
    scores: dict[str, float] = {}
    thresholds: dict[str, float] = {}
    anomalies: dict[str, float] = {}
    for name, metric, value in rows:
        if name == WINDOW_SAMPLES:
            samples = (samples or 0.0) + value
        elif name == MIN_SAMPLES:
            min_samples = value
        elif name == REFERENCE_INFO and value > 0:
            reference = metric.get("source", "")
        elif name == DRIFT_SCORE and math.isfinite(value):
            scores[metric.get("signal", "")] = value
        elif name == DRIFT_THRESHOLD:
            thresholds[metric.get("signal", "")] = value
        elif name == ANOMALIES:
            kind = metric.get("kind", "")
            anomalies[kind] = anomalies.get(kind, 0.0) + value
    if samples is None:
        return None
    return PodDrift(samples, min_samples or 0.0, reference, scores, thresholds, anomalies)


def parse_counters(text: str) -> Counters:
    """The request counters, latency buckets and answers by class in a /metrics page, summed over their label sets
    (models), and the drift gauges."""
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    predictions: dict[str, float] = {}
    drift: list[tuple[str, Mapping[str, str], float]] = []
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name in (DRIFT_SCORE, DRIFT_THRESHOLD, WINDOW_SAMPLES, MIN_SAMPLES, ANOMALIES, REFERENCE_INFO):
                drift.append((s.name, s.labels, s.value))
            elif s.name == PREDICTIONS:
                cls = s.labels.get("class", "")
                predictions[cls] = predictions.get(cls, 0.0) + s.value
            elif s.name == REQUESTS:
                requests += s.value
                code = s.labels.get("code", "")
                if len(code) == 3 and code.startswith("5"):  # the same rule as code=~"5.."
                    errors += s.value
            elif s.name == DURATION_BUCKET:
                le = float(s.labels["le"])
                buckets[le] = buckets.get(le, 0.0) + s.value
    return Counters(
        requests, errors, tuple(sorted(buckets.items())), tuple(sorted(predictions.items())), _pod_drift(drift)
    )


# `timeout` bounds each HTTP request (an aiohttp setting), as Prometheus' scrape_timeout does, not the call.
async def scrape(urls: Sequence[str], *, timeout: float = 5) -> dict[str, Counters]:  # noqa: ASYNC109
    """url -> counters of every /metrics URL that answered; the others (pods going away, not yet listening) are
    left out. Raises AnalysisUnavailable when `urls` is not empty and none answered."""
    if not urls:
        return {}
    failures: dict[str, str] = {}

    async def one(session: aiohttp.ClientSession, url: str) -> Counters | None:
        try:
            async with session.get(url) as response:
                text = await response.text()
                if response.status != 200:
                    raise ValueError(f"HTTP {response.status}: {text[:100]!r}")
            return parse_counters(text)
        except (aiohttp.ClientError, TimeoutError, ValueError, KeyError) as e:
            # Expected during rollouts: a pod that just went away or is not listening yet.
            log.debug("scrape %s: %s: %s", url, type(e).__name__, e)
            failures[url] = f"{type(e).__name__}: {e}"[:200]
            return None

    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        results = await asyncio.gather(*(one(session, u) for u in urls))
    out = {u: c for u, c in zip(urls, results, strict=True) if c is not None}
    if not out:
        raise AnalysisUnavailable(
            "no metrics endpoint answered: " + "; ".join(f"{u}: {m}" for u, m in failures.items())
        )
    return out


def _went_down(now: Counters, before: Counters) -> bool:
    """Whether a counter decreased since `before`: the pod restarted (same URL, new process) and began again."""
    if now.requests < before.requests or now.errors < before.errors:
        return True
    if any(c < dict(before.predictions).get(k, 0.0) for k, c in now.predictions):
        return True
    old = dict(before.buckets)
    # A bucket layout that changed also means a new process; treat it as a reset rather than subtract mismatches.
    return set(old) != {le for le, _ in now.buckets} or any(c < old[le] for le, c in now.buckets)


def since(now: Mapping[str, Counters], baseline: Mapping[str, Counters]) -> Sample:
    """What happened between `baseline` and `now`, summed over the URLs in `now`.

    A URL missing from `baseline` (a pod started during the window) counts in full, and so does one whose counters
    went down (a restart lost the counts before it; what it has now all happened in the window)."""
    requests = errors = 0.0
    buckets: dict[float, float] = {}
    predictions: dict[str, float] = {}
    for url, current in now.items():
        before = baseline.get(url)
        if before is None or _went_down(current, before):
            before = Counters(0.0, 0.0, ())
        old = dict(before.buckets)
        requests += current.requests - before.requests
        errors += current.errors - before.errors
        for le, count in current.buckets:
            buckets[le] = buckets.get(le, 0.0) + count - old.get(le, 0.0)
        answered = dict(before.predictions)
        for cls, count in current.predictions:
            predictions[cls] = predictions.get(cls, 0.0) + count - answered.get(cls, 0.0)
    p95 = quantile(0.95, buckets.items()) if requests > 0 else None
    return Sample(requests, errors, None if p95 is None else p95 * 1000, predictions or None)


def quantile(q: float, buckets: Iterable[tuple[float, float]]) -> float | None:
    """The q-quantile of a histogram given as (upper bound, cumulative count) pairs, as Prometheus'
    ``histogram_quantile`` computes it (linear interpolation within the bucket, 0 as the lower bound of the first
    bucket when it is positive). None where Prometheus gives NaN: no +Inf bucket, fewer than two buckets, or no
    observations."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile must be in [0, 1], got {q}")
    merged: dict[float, float] = {}
    for le, count in buckets:  # equal bounds (from label sets summed elsewhere) add up, as Prometheus coalesces
        merged[le] = merged.get(le, 0.0) + count
    points = sorted(merged.items())
    if len(points) < 2 or points[-1][0] != math.inf:
        return None
    # Counts scraped at slightly different moments can dip; Prometheus makes them monotonic the same way.
    bounds, counts = [p[0] for p in points], []
    for _, count in points:
        counts.append(max(count, counts[-1]) if counts else count)
    total = counts[-1]
    if total <= 0:
        return None
    rank = q * total
    b = next(i for i, c in enumerate(counts) if c >= rank)  # found: counts[-1] == total >= rank
    if b == len(points) - 1:
        # In the +Inf bucket nothing is known beyond the last finite bound: that bound is the answer.
        return bounds[-2]
    if b == 0 and bounds[0] <= 0:
        return bounds[0]
    start = bounds[b - 1] if b > 0 else 0.0
    below = counts[b - 1] if b > 0 else 0.0
    if counts[b] == below:  # only for q == 0 with an empty first bucket: Prometheus computes 0/0 = NaN
        return None
    return start + (bounds[b] - start) * ((rank - below) / (counts[b] - below))
