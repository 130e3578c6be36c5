"""The operator's work queue (kiln_operator.runtime.WorkQueue) on a real event loop: requests for one key coalesce,
one key never runs twice at once while different keys run in parallel up to `workers`, failures back off along the
backoff tuple and success resets it, timers keep the earliest due, `forget` cancels, and `request(coalesce=...)`
turns a burst into one pass.

Every wait is on a condition with a deadline. That nothing more happens is shown with a marker key whose timer is
due after everything under test: the queue fires timers in due order, so once the marker's pass has run, any
stray pass before it would have run too."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable

import pytest

from kiln_operator.runtime import WorkQueue

MARKER = "marker"


async def until(condition: Callable[[], bool], what: str, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.005)  # poll interval between checks of the condition


class Recorder:
    """A reconcile function that records each pass (key, start time) and runs `body` for it, if given."""

    def __init__(self, body: Callable[[str, int], Awaitable[float | None]] | None = None) -> None:
        self.body = body
        self.starts: list[tuple[str, float]] = []
        self.passes: Counter[str] = Counter()

    async def __call__(self, key: str) -> float | None:
        self.passes[key] += 1
        self.starts.append((key, time.monotonic()))
        if self.body is not None:
            return await self.body(key, self.passes[key])
        return None

    def times(self, key: str) -> list[float]:
        return [t for k, t in self.starts if k == key]


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


async def settle(queue: WorkQueue, rec: Recorder, after: float) -> None:
    """Let the queue run until a marker timer due `after` seconds from now has fired."""
    queue.at(MARKER, after)
    await until(lambda: rec.passes[MARKER] == 1, "the marker's pass")


def test_requests_while_a_pass_runs_make_exactly_one_more_pass():
    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def body(key: str, n: int) -> None:
            if key == "a" and n == 1:
                started.set()
                await release.wait()

        rec = Recorder(body)
        queue = WorkQueue(rec, backoff=(0.05,))
        queue.start()
        try:
            queue.request("a")
            await asyncio.wait_for(started.wait(), 5)
            for _ in range(10):
                queue.request("a")
            assert rec.passes["a"] == 1  # the burst waits for the running pass
            release.set()
            await until(lambda: rec.passes["a"] >= 2, "the follow-up pass")
            await settle(queue, rec, 0.2)
            assert rec.passes["a"] == 2
        finally:
            await queue.stop()

    run(scenario)


def test_one_pass_per_key_at_a_time_and_different_keys_in_parallel_up_to_workers():
    async def scenario() -> None:
        gate = asyncio.Event()
        running: Counter[str] = Counter()
        most_per_key: Counter[str] = Counter()
        most_in_total = 0

        async def body(key: str, n: int) -> None:
            nonlocal most_in_total
            if key == MARKER:
                return
            running[key] += 1
            most_per_key[key] = max(most_per_key[key], running[key])
            most_in_total = max(most_in_total, sum(running.values()))
            try:
                await gate.wait()
            finally:
                running[key] -= 1

        rec = Recorder(body)
        queue = WorkQueue(rec, workers=2, backoff=(0.05,))
        queue.start()
        try:
            for key in ("a", "b", "c"):
                queue.request(key)
            await until(lambda: sum(running.values()) == 2, "two passes running")
            assert set(+running) == {"a", "b"}  # c waits for a worker
            for _ in range(5):
                queue.request("a")  # a is running: these make one more pass, never a second concurrent one
            gate.set()
            await until(lambda: rec.passes["c"] == 1 and rec.passes["a"] == 2, "c and a's follow-up pass")
            await settle(queue, rec, 0.2)
        finally:
            await queue.stop()
        assert dict(rec.passes) == {"a": 2, "b": 1, "c": 1, MARKER: 1}
        assert max(most_per_key.values()) == 1
        assert most_in_total == 2

    run(scenario)


def test_failures_back_off_along_the_tuple_and_a_success_resets_it():
    backoff = (0.05, 0.25, 0.5)

    async def scenario() -> None:
        async def body(key: str, n: int) -> None:
            # passes 1-4 fail (the 4th past the end of the tuple), 5 succeeds, 6 fails again, 7 succeeds
            if n in (1, 2, 3, 4, 6):
                raise RuntimeError(f"pass {n} fails")

        rec = Recorder(body)
        queue = WorkQueue(rec, backoff=backoff)
        queue.start()
        try:
            queue.request("a")
            await until(lambda: rec.passes["a"] == 5, "four failures and the successful retry", within=10)
            queue.request("a")
            await until(lambda: rec.passes["a"] == 7, "a failure after the success and its retry")
            await settle(queue, rec, 0.6)
        finally:
            await queue.stop()
        assert rec.passes["a"] == 7  # a success schedules nothing
        t = rec.times("a")
        gaps = [t[1] - t[0], t[2] - t[1], t[3] - t[2], t[4] - t[3], t[6] - t[5]]
        assert backoff[0] <= gaps[0] < backoff[1], gaps
        assert backoff[1] <= gaps[1] < backoff[2], gaps
        assert backoff[2] <= gaps[2], gaps
        assert backoff[2] <= gaps[3], gaps  # past the end, the last delay repeats
        assert backoff[0] <= gaps[4] < backoff[1], gaps  # the success reset the count

    run(scenario)


def test_a_request_during_a_failing_pass_waits_for_the_backoff():
    backoff = (0.3,)

    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def body(key: str, n: int) -> None:
            if n == 1:
                started.set()
                await release.wait()
                raise RuntimeError("pass 1 fails")

        rec = Recorder(body)
        queue = WorkQueue(rec, backoff=backoff)
        queue.start()
        try:
            queue.request("a")
            await asyncio.wait_for(started.wait(), 5)
            queue.request("a")  # an event while the pass runs, which then fails
            release.set()
            await until(lambda: rec.passes["a"] == 2, "the retry")
            failed_at = time.monotonic()
            await settle(queue, rec, backoff[0])
        finally:
            await queue.stop()
        assert rec.passes["a"] == 2  # the event and the retry are one pass
        t = rec.times("a")
        assert t[1] - t[0] >= backoff[0], t
        assert failed_at >= t[1]

    run(scenario)


def test_a_returned_delay_asks_for_one_more_pass_then():
    async def scenario() -> None:
        async def body(key: str, n: int) -> float | None:
            return 0.1 if key == "a" and n == 1 else None

        rec = Recorder(body)
        queue = WorkQueue(rec, backoff=(0.05,))
        queue.start()
        try:
            queue.request("a")
            await until(lambda: rec.passes["a"] == 2, "the pass the first one asked for")
            await settle(queue, rec, 0.3)
        finally:
            await queue.stop()
        assert rec.passes["a"] == 2
        first, second = rec.times("a")
        assert second - first >= 0.1

    run(scenario)


@pytest.mark.parametrize("delays", [(0.3, 0.05), (0.05, 0.3)], ids=["earlier-replaces", "later-is-ignored"])
def test_the_earliest_timer_wins_and_fires_once(delays: tuple[float, float]):
    async def scenario() -> None:
        rec = Recorder()
        queue = WorkQueue(rec, backoff=(0.05,))
        queue.start()
        try:
            t0 = time.monotonic()
            for delay in delays:
                queue.at("a", delay)
            await settle(queue, rec, 0.5)  # after the later timer's due time too
        finally:
            await queue.stop()
        assert rec.passes["a"] == 1
        assert 0.05 <= rec.times("a")[0] - t0 < 0.3

    run(scenario)


def test_forget_cancels_the_timer():
    async def scenario() -> None:
        rec = Recorder()
        queue = WorkQueue(rec, backoff=(0.05,))
        queue.start()
        try:
            queue.at("a", 0.05)
            queue.forget("a")
            await settle(queue, rec, 0.2)
        finally:
            await queue.stop()
        assert rec.passes["a"] == 0

    run(scenario)


def test_forget_cancels_the_retry_and_resets_the_backoff():
    backoff = (0.05, 0.4)

    async def scenario() -> None:
        async def body(key: str, n: int) -> None:
            if key == "a" and n <= 3:
                raise RuntimeError(f"pass {n} fails")

        rec = Recorder(body)
        queue = WorkQueue(rec, backoff=backoff)
        queue.start()
        try:
            queue.request("a")
            # the failure's retry is scheduled before the queue yields, so once pass 2 is seen it is due
            await until(lambda: rec.passes["a"] == 2, "the first retry")
            queue.forget("a")
            queue.request("a")
            await until(lambda: rec.passes["a"] == 4, "the retry of the pass after forget")
        finally:
            await queue.stop()
        t = rec.times("a")
        # without forget, pass 2's retry (due 0.4 s after it) or the third failure's (0.4 s) would set the pace
        assert backoff[0] <= t[3] - t[2] < backoff[1] / 2, t

    run(scenario)


def test_a_coalesced_burst_is_one_pass_after_the_window():
    async def scenario() -> None:
        rec = Recorder()
        queue = WorkQueue(rec, backoff=(0.05,))
        queue.start()
        try:
            t0 = time.monotonic()
            for _ in range(10):
                queue.request("a", coalesce=0.1)
            assert rec.passes["a"] == 0
            await until(lambda: rec.passes["a"] == 1, "the coalesced pass")
            await settle(queue, rec, 0.3)
        finally:
            await queue.stop()
        assert rec.passes["a"] == 1
        assert rec.times("a")[0] - t0 >= 0.1  # the window runs from the first request of the burst

    run(scenario)


def test_a_coalesced_request_while_the_key_runs_makes_one_follow_up_pass():
    async def scenario() -> None:
        started, release = asyncio.Event(), asyncio.Event()

        async def body(key: str, n: int) -> None:
            if key == "a" and n == 1:
                started.set()
                await release.wait()

        rec = Recorder(body)
        queue = WorkQueue(rec, backoff=(0.05,))
        queue.start()
        try:
            queue.request("a")
            await asyncio.wait_for(started.wait(), 5)
            for _ in range(3):
                queue.request("a", coalesce=5.0)
            release.set()
            # the follow-up runs when the running pass ends, not after the 5 s window
            await until(lambda: rec.passes["a"] == 2, "the follow-up pass", within=2)
            await settle(queue, rec, 0.2)
        finally:
            await queue.stop()
        assert rec.passes["a"] == 2

    run(scenario)
