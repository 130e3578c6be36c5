"""Dynamic batching: requests queue up (bounded), a worker merges them up to ``max_batch_size`` samples or until
the oldest has waited ``max_queue_delay``, runs the batch in an executor thread (ONNX Runtime releases the GIL,
so the event loop keeps parsing requests meanwhile) and hands each request its own rows back.

With more than one instance and no queue delay, a worker takes only its share of what is queued: ``ceil(queued
samples / idle instances)`` (itself included), at most ``max_batch_size``. A burst that finds several instances
idle is spread over them, which run at the same time, instead of riding in one long batch while the others idle;
when the other instances are busy, the worker takes everything (up to ``max_batch_size``), as one instance
does, so merging under load is unchanged. With a queue delay, batches fill up to ``max_batch_size`` as asked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .errors import DeadlineExceeded, InferenceFailed, Overloaded, Unavailable
from .metrics import Metrics

log = logging.getLogger("kiln_server")


@dataclass(eq=False)
class Job:
    payload: Any
    size: int
    future: asyncio.Future[np.ndarray]
    enqueued: float
    deadline: float | None = None
    started: float = field(default=0.0)
    # Told the size of the batch the job ran in (its ``batch_size`` attribute), for the access log.
    outcome: Any = None


class Batcher:
    def __init__(
        self,
        run_batch: Callable[[Sequence[Any]], np.ndarray],
        *,
        max_batch_size: int,
        max_queue_delay: float,
        max_queue_size: int,
        instances: int,
        metrics: Metrics,
    ) -> None:
        self._run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_queue_delay = max_queue_delay
        self.max_queue_size = max_queue_size
        self.instances = instances
        self.metrics = metrics
        self._queue: deque[Job] = deque()
        self._queued_samples = 0
        self._running = 0
        self._nonempty = asyncio.Event()
        self._full = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._executor = ThreadPoolExecutor(max_workers=instances, thread_name_prefix="kiln-infer")
        self._workers: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self._workers = [asyncio.create_task(self._worker(), name=f"kiln-batcher-{i}") for i in range(self.instances)]

    @property
    def depth(self) -> int:
        return len(self._queue)

    def submit(
        self, payload: Any, size: int, deadline: float | None, outcome: Any = None
    ) -> asyncio.Future[np.ndarray]:
        """Queue one request (``size`` samples); raises Overloaded at once when the queue is full. ``outcome``, if
        given, gets the executed batch's size in its ``batch_size`` attribute."""
        if self._closed:
            raise Unavailable("shutting down")
        if len(self._queue) >= self.max_queue_size:
            raise Overloaded(f"queue full ({self.max_queue_size} requests waiting); retry later")
        loop = asyncio.get_running_loop()
        job = Job(payload, size, loop.create_future(), loop.time(), deadline, outcome=outcome)
        self._queue.append(job)
        self._queued_samples += size
        self.metrics.queue_depth.set(len(self._queue))
        self._idle.clear()
        self._nonempty.set()
        if self._queued_samples >= self.max_batch_size:
            self._full.set()
        return job.future

    async def _worker(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if not self._queue:
                self._nonempty.clear()
                if self._running == 0:
                    self._idle.set()
                await self._nonempty.wait()
                continue
            if self._queued_samples < self.max_batch_size and not self._closed:
                remaining = self._queue[0].enqueued + self.max_queue_delay - loop.time()
                if remaining > 0:
                    self._full.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._full.wait(), remaining)
            batch = self._take(loop.time())
            if not batch:
                continue
            self._running += 1
            try:
                await self._execute(loop, batch)
            finally:
                self._running -= 1
                if not self._queue and self._running == 0:
                    self._idle.set()

    def share(self) -> int:
        """Samples the worker about to take a batch takes: up to ``max_batch_size`` with one instance or a queue
        delay, else its share of the queue among the idle instances (itself included: it is not running yet)."""
        idle = self.instances - self._running
        if idle <= 1 or self.max_queue_delay > 0:
            return self.max_batch_size
        return max(1, min(self.max_batch_size, math.ceil(self._queued_samples / idle)))

    def _take(self, now: float) -> list[Job]:
        batch: list[Job] = []
        total = 0
        queue = self._queue
        limit = self.share()
        while queue:
            job = queue[0]
            if job.future.done():  # the client gave up (deadline) or went away
                queue.popleft()
                self._queued_samples -= job.size
                continue
            if job.deadline is not None and job.deadline <= now:
                queue.popleft()
                self._queued_samples -= job.size
                job.future.set_exception(DeadlineExceeded("deadline exceeded while queued"))
                continue
            if batch and total + job.size > limit:  # the first job always fits (prepare() checked its size)
                break
            queue.popleft()
            self._queued_samples -= job.size
            total += job.size
            job.started = now
            self.metrics.queue_duration.observe(now - job.enqueued)
            batch.append(job)
        if len(queue) < 1 or self._queued_samples < self.max_batch_size:
            self._full.clear()
        self.metrics.queue_depth.set(len(queue))
        return batch

    async def _execute(self, loop: asyncio.AbstractEventLoop, batch: list[Job]) -> None:
        payloads = [j.payload for j in batch]
        total = sum(j.size for j in batch)
        started = loop.time()
        try:
            logits = await loop.run_in_executor(self._executor, self._run_batch, payloads)
            if logits.shape[0] != total:
                raise RuntimeError(f"model returned {logits.shape[0]} rows for a batch of {total}")
        except Exception as e:
            self.metrics.inference_errors.inc()
            log.exception("batch of %d requests (%d samples) failed", len(batch), total)
            if len(batch) > 1:  # isolate the failing request: the others must not pay for it
                for job in batch:
                    await self._execute(loop, [job])
                return
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(InferenceFailed(f"inference failed: {type(e).__name__}: {e}"[:500]))
            return
        self.metrics.inference_duration.observe(loop.time() - started)
        self.metrics.batch_size.observe(total)
        offset = 0
        for job in batch:
            if job.outcome is not None:
                job.outcome.batch_size = total
            if not job.future.done():
                job.future.set_result(logits[offset : offset + job.size])
            offset += job.size

    def close(self) -> None:
        """Refuse new requests; queued ones still run."""
        self._closed = True
        self._full.set()

    async def drain(self) -> None:
        """Wait until the queue is empty and no batch runs."""
        while self._queue or self._running:
            self._idle.clear()
            await self._idle.wait()

    def fail_pending(self, message: str) -> None:
        while self._queue:
            job = self._queue.popleft()
            if not job.future.done():
                job.future.set_exception(Unavailable(message))
        self._queued_samples = 0
        self.metrics.queue_depth.set(0)

    async def stop(self) -> None:
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        self._executor.shutdown(wait=False, cancel_futures=True)
