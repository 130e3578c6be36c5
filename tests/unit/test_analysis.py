"""Canary analysis input (kiln_operator.analysis): PromQL rendering and the histogram quantile by hand; then two
real kiln_server processes with a known traffic, read directly (scrape + since, exact counts) and through a real
Prometheus (Debian's, from hack/prometheus.sh) scraping them with the pod labels as target labels."""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from aiohttp import web
from support.prometheus import prometheus_binary, require_prometheus, run_prometheus
from support.server import ServerProcess, free_port, image_artifact, image_request
from support.waiting import wait_for

from kiln_operator.analysis import (
    AnalysisUnavailable,
    Counters,
    PodDrift,
    Prometheus,
    Sample,
    parse_counters,
    promql_queries,
    promql_selector,
    quantile,
    scrape,
    since,
)

INF = math.inf

# ------------------------------------------------------------------ pure


def test_selector_escapes_label_values():
    sel = {"namespace": "ns1", "kiln_dev_revision": 'a"b\\c\nd', "x": '\\"'}
    # backslash first: the \" of a quote must not have its backslash doubled again
    assert promql_selector(sel) == '{namespace="ns1",kiln_dev_revision="a\\"b\\\\c\\nd",x="\\\\\\""}'
    assert promql_selector({"a": "1"}, 'code=~"5.."') == '{a="1",code=~"5.."}'
    assert promql_selector({}) == "{}"
    for bad in ("1abc", "a-b", 'a="x"} or vector(1) #', ""):
        with pytest.raises(ValueError, match="not a Prometheus label name"):
            promql_selector({bad: "v"})


def test_queries_use_whole_seconds_and_the_selector():
    requests, errors, p95 = promql_queries({"namespace": "ns", "kiln_dev_revision": "r"}, 90.9)
    sel = '{namespace="ns",kiln_dev_revision="r"}'
    assert requests == f"sum(increase(kiln_server_requests_total{sel}[90s]))"
    assert errors == 'sum(increase(kiln_server_requests_total{namespace="ns",kiln_dev_revision="r",code=~"5.."}[90s]))'
    bucket = "kiln_server_request_duration_seconds_bucket"
    assert p95 == f"histogram_quantile(0.95, sum by (le) (increase({bucket}{sel}[90s]))) * 1000"
    assert all(q.count("[1s]") == 1 for q in promql_queries({}, 0.3))  # never a zero-length range


def test_sample_error_rate():
    assert Sample(40, 2, 12.5).error_rate == 0.05
    assert Sample(0, 0, None).error_rate == 0.0


@pytest.mark.parametrize(
    ("q", "buckets", "expected"),
    [
        # 10 observations <= 0.1, 10 in (0.1, 0.2], 20 in (0.2, 0.4], none above
        (0.25, [(0.1, 10), (0.2, 20), (0.4, 40), (INF, 40)], 0.1),  # rank 10: the top of the first bucket
        (0.6, [(0.1, 10), (0.2, 20), (0.4, 40), (INF, 40)], 0.24),  # rank 24: 0.2 + 0.2 * 4/20
        (0.95, [(0.1, 10), (0.2, 20), (0.4, 40), (INF, 40)], 0.38),  # rank 38: 0.2 + 0.2 * 18/20
        (0.1, [(0.1, 10), (0.2, 20), (0.4, 40), (INF, 40)], 0.04),  # rank 4 in the first bucket: from 0, 0.1 * 4/10
        (0.3, [(0.1, 5), (0.25, 8), (INF, 20)], 0.15),  # rank 6: 0.1 + 0.15 * 1/3
        # +Inf rule: rank 19 (and 10) fall in the +Inf bucket: the answer is the last finite bound
        (0.95, [(0.1, 5), (0.25, 8), (INF, 20)], 0.25),
        (0.5, [(0.1, 5), (0.25, 8), (INF, 20)], 0.25),
        # unsorted input, and a dip (0.2 below 0.1) made monotonic: 0.1:6 0.2:6 inf:10, rank 5 -> 0.1 * 5/6
        (0.5, [(INF, 10), (0.2, 5), (0.1, 6)], 0.1 * 5 / 6),
        # equal bounds add up (label sets summed): 0.1:2 inf:2, rank 1 -> 0.05
        (0.5, [(0.1, 1), (0.1, 1), (INF, 2)], 0.05),
        # a first bound <= 0 is returned as it is, with no interpolation below it
        (0.25, [(-1, 2), (1, 4), (INF, 4)], -1),
        # NaN in Prometheus: no observations, no +Inf bucket, only the +Inf bucket, q = 0 over an empty bucket
        (0.95, [(0.1, 0), (INF, 0)], None),
        (0.95, [(0.1, 3), (0.2, 4)], None),
        (0.95, [(INF, 4)], None),
        (0.0, [(0.1, 0), (0.2, 4), (INF, 4)], None),
        (0.95, [], None),
    ],
)
def test_quantile_by_hand(q, buckets, expected):
    got = quantile(q, buckets)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected)


def test_quantile_rejects_q_outside_0_1():
    for q in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="quantile"):
            quantile(q, [(0.1, 1), (INF, 1)])


def test_since_missing_baseline_reset_and_several_urls():
    baseline = {
        "a": Counters(10, 1, ((0.1, 8), (0.5, 10), (INF, 10))),
        "r": Counters(100, 10, ((0.1, 90), (0.5, 100), (INF, 100))),
        "gone": Counters(50, 50, ((0.1, 50), (0.5, 50), (INF, 50))),  # a pod deleted in the window: not in `now`
    }
    now = {
        "a": Counters(30, 3, ((0.1, 20), (0.5, 30), (INF, 30))),  # +20 requests, +2 errors; 12 <= 0.1, 8 above
        "r": Counters(4, 1, ((0.1, 4), (0.5, 4), (INF, 4))),  # restarted: its 4 and 1 count in full
        "new": Counters(6, 0, ((0.1, 0), (0.5, 6), (INF, 6))),  # started in the window: in full
    }
    s = since(now, baseline)
    assert (s.requests, s.errors) == (30, 3)
    # summed deltas: 0.1: 12 + 4 + 0 = 16, 0.5: 20 + 4 + 6 = 30; rank 28.5 -> 0.1 + 0.4 * 12.5/14 seconds
    assert s.p95_ms == pytest.approx((0.1 + 0.4 * 12.5 / 14) * 1000)
    assert s.error_rate == pytest.approx(0.1)
    # each case alone
    assert since({"a": now["a"]}, baseline) == Sample(20, 2, pytest.approx((0.1 + 0.4 * 7 / 8) * 1000))
    assert since({"r": now["r"]}, baseline) == Sample(4, 1, pytest.approx(0.1 * 3.8 / 4 * 1000))
    assert since({"new": now["new"]}, {}) == Sample(6, 0, pytest.approx((0.1 + 0.4 * 5.7 / 6) * 1000))
    # a reset seen only in a bucket (a new process that answered as many requests) also counts in full
    bucket_reset = {"a": Counters(10, 1, ((0.1, 2), (0.5, 10), (INF, 10)))}
    assert since(bucket_reset, baseline).requests == 10
    # nothing happened: no latency
    assert since(baseline, baseline) == Sample(0, 0, None)
    assert since({}, baseline) == Sample(0, 0, None)


def test_parse_counters_sums_label_sets_and_counts_only_5xx():
    text = "\n".join(
        [
            "# TYPE kiln_server_requests_total counter",
            'kiln_server_requests_total{model="m",code="200"} 7.0',
            'kiln_server_requests_total{model="m",code="504"} 2.0',
            'kiln_server_requests_total{model="m",code="400"} 1.0',
            'kiln_server_requests_total{model="other",code="503"} 3.0',
            "# TYPE kiln_server_request_duration_seconds histogram",
            'kiln_server_request_duration_seconds_bucket{model="m",le="0.1"} 4.0',
            'kiln_server_request_duration_seconds_bucket{model="m",le="+Inf"} 10.0',
            'kiln_server_request_duration_seconds_bucket{model="other",le="+Inf"} 3.0',
            'kiln_server_request_duration_seconds_bucket{model="other",le="0.1"} 3.0',
            'kiln_server_request_duration_seconds_count{model="m"} 10.0',
            'kiln_server_request_duration_seconds_sum{model="m"} 0.5',
            "# TYPE kiln_server_queue_duration_seconds histogram",
            'kiln_server_queue_duration_seconds_bucket{model="m",le="+Inf"} 99.0',
        ]
    )
    assert parse_counters(text + "\n") == Counters(13, 5, ((0.1, 7), (INF, 13)))


DRIFT_PAGE = "\n".join(
    [
        "# TYPE kiln_server_predictions_total counter",
        'kiln_server_predictions_total{model="m",class="pos"} 30.0',
        'kiln_server_predictions_total{model="m",class="neg"} 10.0',
        "# TYPE kiln_server_drift_score gauge",
        'kiln_server_drift_score{model="m",signal="prediction"} 0.25',
        'kiln_server_drift_score{model="m",signal="confidence"} 0.05',
        "# TYPE kiln_server_drift_threshold gauge",
        'kiln_server_drift_threshold{model="m",signal="prediction"} 0.2',
        "# TYPE kiln_server_drift_window_samples gauge",
        'kiln_server_drift_window_samples{model="m"} 640.0',
        "# TYPE kiln_server_drift_min_samples gauge",
        'kiln_server_drift_min_samples{model="m"} 200.0',
        "# TYPE kiln_server_anomalies_total counter",
        'kiln_server_anomalies_total{model="m",kind="low_confidence"} 4.0',
        "# TYPE kiln_server_reference_info gauge",
        'kiln_server_reference_info{model="m",source="traffic"} 1.0',
    ]
)


def test_parse_counters_reads_answers_by_class_and_the_drift_gauges():
    c = parse_counters(DRIFT_PAGE + "\n")
    assert c.predictions == (("neg", 10.0), ("pos", 30.0))
    assert c.drift == PodDrift(
        640.0, 200.0, "traffic", {"prediction": 0.25, "confidence": 0.05}, {"prediction": 0.2}, {"low_confidence": 4.0}
    )
    assert parse_counters('kiln_server_requests_total{code="200"} 1\n').drift is None  # monitoring off
    later = Counters(50, 0, (), (("neg", 12.0), ("pos", 58.0)))
    assert since({"u": later}, {"u": c}).predictions == {"neg": 2.0, "pos": 28.0}
    restarted = Counters(60, 0, (), (("neg", 3.0), ("pos", 2.0)))  # a count went down: a new process
    assert since({"u": restarted}, {"u": c}).predictions == {"neg": 3.0, "pos": 2.0}


def test_prometheus_drift_groups_gauges_by_pod_and_predictions_by_class():
    sel = {"namespace": "ns", "kiln_dev_revision": "r"}

    def series(value: str, **labels: str) -> dict[str, Any]:
        return {"metric": labels, "value": [1700000000.0, value]}

    def vector(*items: dict[str, Any]) -> str:
        return json.dumps({"status": "success", "data": {"resultType": "vector", "result": list(items)}})

    answers = {
        "kiln_server_drift_score": vector(
            series("0.3", pod="a", signal="prediction"), series("0.1", pod="b", signal="prediction")
        ),
        "kiln_server_drift_threshold": vector(series("0.2", pod="a", signal="prediction")),
        "kiln_server_drift_window_samples": vector(series("500", pod="a"), series("300", pod="b")),
        "kiln_server_drift_min_samples": vector(series("200", pod="a"), series("200", pod="b")),
        "kiln_server_anomalies_total": vector(series("2", pod="a", kind="low_confidence")),
        "kiln_server_reference_info": vector(series("1", pod="a", source="artifact")),
    }

    async def main() -> None:
        async def answer(query: str) -> tuple[int, str]:
            if query.startswith("sum by (class)"):
                return 200, vector(series("12", **{"class": "pos"}), series("NaN", **{"class": "neg"}))
            return 200, answers.get(query.split("{")[0], vector())

        async with canned_prometheus(answer) as (url, seen):
            prom = Prometheus(url)
            try:
                pods = sorted(await prom.drift(sel), key=lambda d: d.samples)
                assert [d.samples for d in pods] == [300, 500]
                assert pods[1].scores == {"prediction": 0.3}
                assert pods[1].reference == "artifact"
                assert pods[0].scores == {"prediction": 0.1}
                assert all('kiln_dev_revision="r"' in q for q in seen)
                assert await prom.predictions(sel, 90) == {"pos": 12.0}  # NaN: no answer to count
            finally:
                await prom.close()

    asyncio.run(main())


# ------------------------------------------------------------------ Prometheus client against canned answers


@contextlib.asynccontextmanager
async def canned_prometheus(answer: Any) -> Any:
    """A real HTTP server on loopback answering /api/v1/query with `answer(query)` -> (status, body)."""
    seen: list[str] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.query["query"])
        status, body = await answer(request.query["query"])
        return web.Response(status=status, text=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/api/v1/query", handler)
    runner = web.AppRunner(app, shutdown_timeout=1)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        yield f"http://127.0.0.1:{port}", seen
    finally:
        await runner.cleanup()


def _vector(*values: str) -> str:
    result = [{"metric": {}, "value": [1700000000.0, v]} for v in values]
    return json.dumps({"status": "success", "data": {"resultType": "vector", "result": result}})


def test_prometheus_client_reads_vectors_nan_and_empty():
    sel = {"namespace": "ns", "kiln_dev_revision": "r"}
    requests_q, errors_q, p95_q = promql_queries(sel, 120)

    async def main() -> None:
        answers = {requests_q: _vector("12"), errors_q: _vector("3"), p95_q: _vector("NaN")}

        async def answer(query: str) -> tuple[int, str]:
            return 200, answers[query]

        async with canned_prometheus(answer) as (url, seen):
            prom = Prometheus(url + "/")
            try:
                assert await prom.sample(sel, 120) == Sample(12, 3, None)
                assert sorted(seen) == sorted([requests_q, errors_q, p95_q])  # exactly the three queries
                answers.update({requests_q: _vector("40"), errors_q: _vector(), p95_q: _vector("17.5")})
                assert await prom.sample(sel, 120) == Sample(40, 0, 17.5)  # same session, second use
                answers.update({requests_q: _vector(), errors_q: _vector(), p95_q: _vector()})
                assert await prom.sample(sel, 120) == Sample(0, 0, None)
            finally:
                await prom.close()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("status", "body", "problem"),
    [
        (503, "overloaded", "HTTP 503"),
        (400, json.dumps({"status": "error", "errorType": "bad_data", "error": "parse error"}), "parse error"),
        (200, "<html>a proxy page</html>", "not a JSON object"),
        (200, json.dumps({"status": "error", "error": "boom"}), "boom"),
        (200, json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}), "vector"),
        (200, _vector("1", "2"), "2 series"),
        (200, _vector("many"), "expected one sample"),
    ],
)
def test_prometheus_bad_answers_are_unavailable(status, body, problem):
    async def main() -> None:
        async def answer(_query: str) -> tuple[int, str]:
            return status, body

        async with canned_prometheus(answer) as (url, _):
            prom = Prometheus(url)
            try:
                with pytest.raises(AnalysisUnavailable, match=problem) as e:
                    await prom.sample({"a": "b"}, 60)
                assert url in str(e.value)
            finally:
                await prom.close()

    asyncio.run(main())


def test_prometheus_that_does_not_answer_in_time_is_unavailable():
    async def main() -> None:
        release = asyncio.Event()

        async def answer(_query: str) -> tuple[int, str]:
            await release.wait()  # a hung server: answers only when the test is over
            return 200, _vector("1")

        async with canned_prometheus(answer) as (url, _):
            prom = Prometheus(url, timeout=0.3)
            try:
                with pytest.raises(AnalysisUnavailable, match="Timeout") as e:
                    await prom.sample({"a": "b"}, 60)
                assert url in str(e.value)
            finally:
                release.set()
                await prom.close()

    asyncio.run(main())


def test_prometheus_not_listening_is_unavailable():
    url = f"http://127.0.0.1:{free_port()}"

    async def main() -> None:
        prom = Prometheus(url, timeout=5)
        try:
            with pytest.raises(AnalysisUnavailable, match="ClientConnectorError") as e:
                await prom.sample({"namespace": "ns"}, 60)
            assert url in str(e.value)
        finally:
            await prom.close()

    asyncio.run(main())


# ------------------------------------------------------------------ real servers, real Prometheus

N_A, N_B, E_B = 30, 20, 5  # good requests to A, good and 504 requests to B, after the priming
LABELS = {"namespace": "ns", "kiln_dev_modeldeployment": "md"}
WINDOW_S = 300  # far longer than the test runs: the window holds every sample Prometheus took


@dataclass
class Traffic:
    a: ServerProcess
    b: ServerProcess
    baseline: dict[str, Any]  # scrape() before any request
    prometheus: str | None  # base URL, None when not installed (the Prometheus tests skip or fail)

    @property
    def urls(self) -> list[str]:
        return [f"http://127.0.0.1:{s.metrics_port}/metrics" for s in (self.a, self.b)]


def _good(server: ServerProcess) -> None:
    pixels = np.random.default_rng(0).standard_normal((1, 1, 8, 8)).astype(np.float32)
    status, doc = server.infer(image_request(pixels))
    assert status == 200, doc


def _deadline_passed(server: ServerProcess) -> None:
    # a 1 us deadline has passed before the batch can run: 504, counted in kiln_server_requests_total
    pixels = np.zeros((1, 1, 8, 8), dtype=np.float32)
    status, doc = server.infer(image_request(pixels), {"Kiln-Timeout-Ms": "0.001"})
    assert (status, doc["error"]) == (504, "deadline exceeded")


def promql(url: str, query: str) -> list[dict[str, Any]]:
    """An instant query by hand (urllib), to check Prometheus' state independently of the code under test."""
    with urllib.request.urlopen(f"{url}/api/v1/query?{urllib.parse.urlencode({'query': query})}", timeout=5) as r:
        doc = json.loads(r.read())
    assert doc["status"] == "success", doc
    return doc["data"]["result"]


def by_revision(url: str, query: str) -> dict[str, float]:
    return {r["metric"].get("kiln_dev_revision", ""): float(r["value"][1]) for r in promql(url, query)}


@pytest.fixture(scope="module")
def traffic(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Traffic]:
    tmp = tmp_path_factory.mktemp("analysis")
    uri, _ = image_artifact(str(tmp_path_factory.getbasetemp() / "server-artifacts"))
    a = ServerProcess(tmp, uri, name="digits").start()
    b = ServerProcess(tmp, uri, name="digits").start()
    with contextlib.ExitStack() as stack:
        for s in (a, b):
            stack.callback(s.kill)
        a.wait_ready()
        b.wait_ready()
        t = Traffic(a, b, {}, None)
        t.baseline = asyncio.run(scrape(t.urls))
        # Prime every series before Prometheus' first scrape: `increase` needs a first sample to count from, and
        # kiln_server_requests_total{code} only exists after a request with that code.
        _good(a)
        _good(b)
        _deadline_passed(b)
        if prometheus_binary() is not None:
            targets = [
                (f"127.0.0.1:{a.metrics_port}", {**LABELS, "kiln_dev_revision": "a"}),
                (f"127.0.0.1:{b.metrics_port}", {**LABELS, "kiln_dev_revision": "b"}),
            ]
            t.prometheus = stack.enter_context(run_prometheus(tmp, targets, scrape_interval="250ms"))
            # 3 s of samples before the traffic bounds `increase`'s extrapolation (see test_prometheus_sample)
            url = t.prometheus

            def history() -> bool:
                counts = by_revision(
                    url, "min by (kiln_dev_revision) (count_over_time(kiln_server_requests_total[5m]))"
                )
                return set(counts) == {"a", "b"} and min(counts.values()) >= 13

            wait_for(history, what="13 samples of each target's request counters", timeout=30)
        for _ in range(N_A):
            _good(a)
        for _ in range(N_B):
            _good(b)
        for _ in range(E_B):
            _deadline_passed(b)
        yield t
        assert a.terminate() == 0, a.log
        assert b.terminate() == 0, b.log


def wait_scraped(t: Traffic) -> None:
    """Until Prometheus' latest samples hold every request sent (the priming included)."""
    assert t.prometheus is not None
    query = "sum by (kiln_dev_revision) (kiln_server_requests_total)"
    want = {"a": 1 + N_A, "b": 2 + N_B + E_B}
    wait_for(lambda: by_revision(t.prometheus, query) == want, what=f"prometheus to have scraped {want}", timeout=30)


def test_scrape_and_since_count_exactly(traffic: Traffic):
    now = asyncio.run(scrape(traffic.urls))
    ua, ub = traffic.urls
    assert set(now) == {ua, ub}
    s = since(now, traffic.baseline)
    # since the baseline: A 1 + N_A good; B 1 + N_B good and 1 + E_B deadline 504s
    assert (s.requests, s.errors) == (1 + N_A + 2 + N_B + E_B, 1 + E_B)
    assert s.p95_ms is not None
    assert 0 < s.p95_ms < 10_000
    sa = since({ua: now[ua]}, traffic.baseline)
    assert (sa.requests, sa.errors) == (1 + N_A, 0)
    sb = since({ub: now[ub]}, traffic.baseline)
    assert (sb.requests, sb.errors) == (2 + N_B + E_B, 1 + E_B)
    # the histogram counted every request too
    assert sum(dict(c.buckets)[INF] for c in now.values()) == s.requests


def test_scrape_leaves_out_what_does_not_answer(traffic: Traffic):
    closed = f"http://127.0.0.1:{free_port()}/metrics"
    not_metrics = f"http://127.0.0.1:{traffic.a.port}/nothing"  # a 404 from the inference port
    got = asyncio.run(scrape([traffic.urls[0], closed, not_metrics]))
    assert list(got) == [traffic.urls[0]]
    with pytest.raises(AnalysisUnavailable) as e:
        asyncio.run(scrape([closed, not_metrics], timeout=5))
    assert closed in str(e.value)
    assert f"{not_metrics}: ValueError: HTTP 404" in str(e.value)
    assert asyncio.run(scrape([])) == {}


def test_prometheus_sample(traffic: Traffic):
    require_prometheus()
    wait_scraped(traffic)
    assert traffic.prometheus is not None

    async def main() -> tuple[Sample, Sample, Sample]:
        prom = Prometheus(traffic.prometheus)
        try:
            return (
                await prom.sample({**LABELS, "kiln_dev_revision": "a"}, WINDOW_S),
                await prom.sample({**LABELS, "kiln_dev_revision": "b"}, WINDOW_S),
                # a value that needs every escape: Prometheus refusing the query would raise here
                await prom.sample({**LABELS, "kiln_dev_revision": 'no "such"\\ rev\n'}, WINDOW_S),
            )
        finally:
            await prom.close()

    a, b, nothing = asyncio.run(main())
    # `increase` over a window that holds every sample: the raw difference (N, the priming was in the first
    # sample) times an extrapolation factor >= 1 of at most (S + 1.1 i + 1.1 i) / S for S >= 3 s of samples at
    # i = 0.25 s (the fixture waits for 13 before the traffic): <= 1.19, so within +25% and never below.
    assert N_A <= a.requests <= 1.25 * N_A
    assert N_B + E_B <= b.requests <= 1.25 * (N_B + E_B)
    assert a.errors == 0  # no 5xx series at all on A: an empty vector
    assert E_B <= b.errors <= 1.25 * E_B
    for s in (a, b):
        assert s.p95_ms is not None
        assert 0 < s.p95_ms < 10_000  # ms: the largest finite bucket is 10 s
    assert nothing == Sample(0, 0, None)


def test_quantile_matches_prometheus_histogram_quantile(traffic: Traffic):
    require_prometheus()
    wait_scraped(traffic)
    assert traffic.prometheus is not None
    now = asyncio.run(scrape(traffic.urls))  # no traffic since: the same values Prometheus scraped last
    summed = [le_count for c in now.values() for le_count in c.buckets]
    for q in (0.5, 0.9, 0.95, 0.99):
        query = f"histogram_quantile({q}, sum by (le) (kiln_server_request_duration_seconds_bucket))"
        (result,) = promql(traffic.prometheus, query)
        assert quantile(q, summed) == pytest.approx(float(result["value"][1]), rel=1e-9), q


def test_prometheus_wrong_url_is_unavailable(traffic: Traffic):
    url = f"http://127.0.0.1:{traffic.a.metrics_port}"  # a server, but not Prometheus: 404

    async def main() -> None:
        prom = Prometheus(url)
        try:
            with pytest.raises(AnalysisUnavailable, match="HTTP 404") as e:
                await prom.sample(LABELS, 60)
            assert url in str(e.value)
        finally:
            await prom.close()

    asyncio.run(main())
