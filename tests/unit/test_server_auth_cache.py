"""The pure logic of --auth kubernetes (docs/security.md): the decision cache (TTL, LRU bound, expiry at scrape
time), single flight, the Authorization header, and the flags. The reviews themselves run against the real API
server in tests/integration/test_server_auth.py."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from kiln_server import config as config_module
from kiln_server.auth import MALFORMED, MAX_TOKEN, MISSING, Decision, DecisionCache, SingleFlight, bearer_token
from kiln_server.config import UsageError, parse_config


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


ALLOWED = Decision(200, "system:serviceaccount:ns:reader")
DENIED = Decision(403, "system:serviceaccount:ns:stranger", "may not")


def test_cache_entries_expire_after_the_ttl_allowed_and_denied_alike():
    clock = Clock()
    cache = DecisionCache(ttl=10, size=8, clock=clock)
    cache.put(b"a", ALLOWED)
    cache.put(b"d", DENIED)
    clock.now += 9.9
    assert cache.get(b"a") is ALLOWED
    assert cache.get(b"d") is DENIED
    clock.now += 0.1  # ten seconds after each was decided, however often it was used since
    assert cache.get(b"a") is None
    assert cache.get(b"d") is None
    assert len(cache) == 0


def test_cache_is_bounded_dropping_the_least_recently_used():
    clock = Clock()
    cache = DecisionCache(ttl=60, size=3, clock=clock)
    for key in (b"1", b"2", b"3"):
        cache.put(key, ALLOWED)
    assert cache.get(b"1") is ALLOWED  # used: now the most recent
    cache.put(b"4", DENIED)
    assert len(cache) == 3
    assert cache.get(b"2") is None  # the least recently used went
    assert [cache.get(k) for k in (b"1", b"3", b"4")] == [ALLOWED, ALLOWED, DENIED]
    cache.put(b"3", DENIED)  # a new decision replaces the old one, no growth
    assert len(cache) == 3
    assert cache.get(b"3") is DENIED


def test_cache_purge_drops_what_expired_without_being_asked_for():
    clock = Clock()
    cache = DecisionCache(ttl=5, size=100, clock=clock)
    for i in range(10):
        cache.put(bytes([i]), ALLOWED)
        clock.now += 1
    assert cache.purge() == 4  # decided less than five seconds ago: the last four
    assert len(cache) == 4


def test_cache_with_ttl_zero_keeps_nothing():
    cache = DecisionCache(ttl=0, size=10, clock=Clock())
    cache.put(b"a", ALLOWED)
    assert cache.get(b"a") is None
    assert len(cache) == 0


async def settle() -> None:
    """Let every task that is ready run until it waits (a few passes of the loop; no time passes)."""
    for _ in range(5):
        await asyncio.sleep(0)


def test_single_flight_shares_one_run_among_concurrent_callers():
    async def scenario() -> None:
        flight: SingleFlight[str, int] = SingleFlight()
        release = asyncio.Event()
        runs: list[str] = []

        async def work(key: str) -> int:
            runs.append(key)
            await release.wait()
            return len(runs)

        callers = [asyncio.ensure_future(flight.do("t", lambda: work("t"))) for _ in range(32)]
        other = asyncio.ensure_future(flight.do("u", lambda: work("u")))
        await settle()  # every caller has started and is waiting
        assert runs == ["t", "u"]
        assert len(flight) == 2
        # A caller that gives up does not cancel the run the others wait for.
        callers[0].cancel()
        await settle()
        release.set()
        results = await asyncio.gather(*callers[1:])
        assert set(results) == {2}
        assert await other == 2
        assert callers[0].cancelled()
        assert len(flight) == 0  # nothing remembered once done
        assert await flight.do("t", lambda: work("t")) == 3  # a later call runs again

    asyncio.run(scenario())


def test_single_flight_shares_an_error_and_forgets_it():
    async def scenario() -> None:
        flight: SingleFlight[str, int] = SingleFlight()
        calls = 0
        gate = asyncio.Event()

        async def failing() -> int:
            nonlocal calls
            calls += 1
            await gate.wait()
            raise RuntimeError("API server down")

        callers = [asyncio.ensure_future(flight.do("t", failing)) for _ in range(5)]
        await settle()
        gate.set()
        outcomes = await asyncio.gather(*callers, return_exceptions=True)
        assert calls == 1
        assert all(isinstance(o, RuntimeError) for o in outcomes)
        with pytest.raises(RuntimeError):
            await flight.do("t", failing)  # not cached: tried again
        assert calls == 2

    asyncio.run(scenario())


def test_bearer_token_parsing():
    jwt = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl"
    assert bearer_token(f"Bearer {jwt}") == jwt
    assert bearer_token(f"bearer  {jwt} ") == jwt  # the scheme in any case (RFC 7235)
    assert bearer_token("Bearer abc+/==") == "abc+/=="
    assert bearer_token(None) is MISSING
    assert bearer_token("") is MISSING
    for bad in ("Basic dXNlcjpwYXNz", "Bearer", "Bearer ", "Bearer a b", "Bearer a=b", "Token abc", "Bearer é"):
        assert bearer_token(bad) is MALFORMED, bad
    assert bearer_token("Bearer " + "a" * MAX_TOKEN) == "a" * MAX_TOKEN
    assert bearer_token("Bearer " + "a" * (MAX_TOKEN + 1)) is MALFORMED
    assert MISSING.status == MALFORMED.status == 401


def test_auth_flags_and_the_pod_namespace(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    base = ["--model-uri", "file:///m"]
    c = parse_config(base, {})
    assert (c.auth, c.namespace, c.auth_cache_ttl, c.auth_cache_size) == ("none", None, 10.0, 4096)
    c = parse_config(
        [*base, "--auth", "kubernetes", "--deployment", "sentiment"],
        {"KILN_SERVER_NAMESPACE": "team-a", "KILN_SERVER_AUTH_CACHE_TTL": "2.5", "KILN_SERVER_AUTH_CACHE_SIZE": "9"},
    )
    assert (c.auth, c.namespace, c.deployment, c.auth_cache_ttl, c.auth_cache_size) == (
        "kubernetes",
        "team-a",
        "sentiment",
        2.5,
        9,
    )
    # In a pod, the namespace is the pod's own (the ServiceAccount volume says which).
    pod_ns = tmp_path / "namespace"
    pod_ns.write_text("team-b")
    monkeypatch.setattr(config_module, "POD_NAMESPACE_FILE", str(pod_ns))
    c = parse_config([*base, "--auth", "kubernetes"], {"KILN_SERVER_DEPLOYMENT": "sentiment"})
    assert c.namespace == "team-b"
    assert parse_config([*base, "--auth", "kubernetes", "--deployment", "d", "--namespace", "x"], {}).namespace == "x"
    monkeypatch.setattr(config_module, "POD_NAMESPACE_FILE", str(tmp_path / "absent"))
    for argv, message in [
        (["--auth", "kubernetes", "--deployment", "d"], "--namespace (or $KILN_SERVER_NAMESPACE) is required"),
        (["--auth", "kubernetes", "--namespace", "x"], "--deployment (or $KILN_SERVER_DEPLOYMENT) is required"),
        (["--auth-cache-ttl", "3601"], "--auth-cache-ttl: must be a number of seconds from 0 to 3600"),
        (["--auth-cache-ttl", "nan"], "--auth-cache-ttl: must be a number of seconds from 0 to 3600"),
        (["--auth-cache-size", "0"], "--auth-cache-size: must be 1-1000000"),
        (["--namespace=-a"], "--namespace: must be a namespace name"),
    ]:
        with pytest.raises(UsageError) as e:
            parse_config([*base, *argv], {})
        assert message in str(e.value), argv
