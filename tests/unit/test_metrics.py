import asyncio
import urllib.error
import urllib.request

import pytest
from prometheus_client import REGISTRY

from kiln_operator import metrics


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_instrumented_counts_outcomes_and_durations():
    kind = "UnitKind"

    @metrics.instrumented(kind)
    async def handler(outcome: str) -> str:
        if outcome == "error":
            raise KeyError("boom")
        return "done"

    assert asyncio.run(handler("ok")) == "done"
    with pytest.raises(KeyError):
        asyncio.run(handler("error"))

    assert sample("kiln_reconciles_total", kind=kind, outcome="success") == 1
    assert sample("kiln_reconciles_total", kind=kind, outcome="error") == 1
    assert sample("kiln_reconcile_errors_total", kind=kind, error="KeyError") == 1
    assert sample("kiln_reconcile_duration_seconds_count", kind=kind) == 2


@pytest.mark.parametrize(
    ("address", "expected"),
    [("0.0.0.0:9090", ("0.0.0.0", 9090)), (":8000", ("0.0.0.0", 8000)), ("[::1]:1", ("::1", 1))],
)
def test_parse_address(address, expected):
    assert metrics.parse_address(address) == expected


@pytest.mark.parametrize("address", ["9090", "host:", "host:http", "host:70000"])
def test_parse_address_rejects_bad_input_naming_it(address):
    with pytest.raises(ValueError, match="metrics address"):
        metrics.parse_address(address)


def test_serve_exposes_metrics_over_http_and_stops():
    handle = metrics.serve("127.0.0.1:0")
    port = handle[0].server_port
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert "kiln_reconciles_total" in body
    finally:
        metrics.stop(handle)
    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
