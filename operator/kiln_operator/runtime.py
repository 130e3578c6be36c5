"""A per-object work queue, like controller-runtime's: requests for one key coalesce (a burst of child events is
one reconcile pass), one key never runs twice at once, a bounded number of keys run in parallel, failures back
off, and ``at(key, delay)`` asks for a pass later (deadlines, TTLs, progress polls) without a task per object."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Hashable

Key = Hashable
log = logging.getLogger("kiln.runtime")


class WorkQueue:
    def __init__(
        self,
        reconcile: Callable[[Key], Awaitable[float | None]],
        *,
        workers: int = 32,
        backoff: tuple[float, ...] = (1, 2, 5, 10, 30, 60),
    ) -> None:
        self._reconcile = reconcile
        self._sem = asyncio.Semaphore(workers)
        self._backoff = backoff
        self._running: set[Key] = set()
        self._dirty: set[Key] = set()
        self._failures: dict[Key, int] = {}
        self._timers: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._seq = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self._ticker: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._ticker = asyncio.create_task(self._tick())

    async def stop(self) -> None:
        tasks = [t for t in [self._ticker, *self._tasks] if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def request(self, key: Key, *, coalesce: float = 0.0) -> None:
        """Reconcile `key` soon; if a pass is running, one more pass follows it (with the newest state).
        ``coalesce`` waits that long first, so a burst of events (a Job's pods starting) makes one pass."""
        if coalesce > 0 and key not in self._running:
            self.at(key, coalesce)
            return
        if key in self._running:
            self._dirty.add(key)
            return
        self._running.add(key)
        task = asyncio.create_task(self._run(key))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def at(self, key: Key, delay: float) -> None:
        """Reconcile `key` after `delay` seconds, unless an earlier pass is already due."""
        when = time.monotonic() + max(0.0, delay)
        if self._due.get(key, float("inf")) <= when:
            return
        self._due[key] = when
        self._seq += 1
        heapq.heappush(self._timers, (when, self._seq, key))
        self._wake.set()

    def forget(self, key: Key) -> None:
        self._due.pop(key, None)
        self._failures.pop(key, None)
        self._dirty.discard(key)

    async def _run(self, key: Key) -> None:
        try:
            while True:
                self._dirty.discard(key)
                delay: float | None = None
                async with self._sem:
                    try:
                        delay = await self._reconcile(key)
                        self._failures.pop(key, None)
                    except asyncio.CancelledError:
                        raise
                    except Exception:
                        n = self._failures.get(key, 0)
                        self._failures[key] = n + 1
                        delay = self._backoff[min(n, len(self._backoff) - 1)]
                        log.exception("reconcile of %s failed (attempt %d); again in %ss", key, n + 1, delay)
                        # Requests that came meanwhile wait for the backoff too: a failing pass is not retried
                        # at once because an event arrived.
                        self._dirty.discard(key)
                        self.at(key, delay)
                        return
                if delay is not None:
                    self.at(key, delay)
                if key not in self._dirty:
                    return
        finally:
            self._running.discard(key)

    async def _tick(self) -> None:
        while True:
            now = time.monotonic()
            while self._timers and self._timers[0][0] <= now:
                when, _, key = heapq.heappop(self._timers)
                if self._due.get(key) == when:
                    del self._due[key]
                    self.request(key)
            timeout = self._timers[0][0] - now if self._timers else 60.0
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.01, timeout))
