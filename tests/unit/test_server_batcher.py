"""The batcher in-process, with a stand-in model whose runs block until the test lets them finish: which requests
ride in which batch (greedy with one instance; with several, a burst is shared by the idle instances, a busy
one's queue is taken whole, a long queue still gives batches of the largest size, and a queue delay still fills
batches). Nothing here depends on
timing: the tests wait for states."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Sequence

import numpy as np
import pytest
from support.server import counter

from kiln_server.batcher import Batcher
from kiln_server.metrics import Metrics


class GatedModel:
    """``run_batch`` stand-in: payloads are sample counts; every run waits until ``release()`` lets it end."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.started: list[list[int]] = []  # samples per request, per batch, in start order
        self.running = 0
        self.most_running = 0
        self._gates: list[threading.Event] = []

    def __call__(self, payloads: Sequence[int]) -> np.ndarray:
        gate = threading.Event()
        with self._lock:
            self.started.append(list(payloads))
            self._gates.append(gate)
            self.running += 1
            self.most_running = max(self.most_running, self.running)
        gate.wait(30)
        with self._lock:
            self.running -= 1
        total = sum(payloads)
        return np.arange(total, dtype=np.float32).reshape(total, 1)

    def sizes(self) -> list[int]:
        return [sum(b) for b in self.started]

    def release(self, index: int | None = None) -> None:
        """Let one run (by start order) or every run started so far finish."""
        with self._lock:
            gates = self._gates if index is None else [self._gates[index]]
        for gate in gates:
            gate.set()


async def until(condition: Callable[[], bool], what: str) -> None:
    for _ in range(3000):  # a state to reach, not a timing to meet: give up only after many seconds
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"never reached: {what}")


def make(
    model: GatedModel, instances: int, max_batch_size: int = 32, max_queue_delay: float = 0.0
) -> tuple[Batcher, Metrics]:
    metrics = Metrics("m", max_batch_size)
    batcher = Batcher(
        model,
        max_batch_size=max_batch_size,
        max_queue_delay=max_queue_delay,
        max_queue_size=1024,
        instances=instances,
        metrics=metrics,
    )
    batcher.start()
    return batcher, metrics


def batch_count(metrics: Metrics) -> float:
    """Batches run, as ``kiln_server_batch_size`` counts them."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            out[f"{s.name}{{{labels}}}"] = s.value
    return counter(out, "kiln_server_batch_size_count", model="m")


async def _results(futures: list[asyncio.Future[np.ndarray]], sizes: list[int]) -> None:
    for future, size in zip(futures, sizes, strict=True):
        rows = await future
        assert rows.shape == (size, 1)


def test_one_instance_is_greedy():
    async def scenario() -> None:
        model = GatedModel()
        batcher, metrics = make(model, instances=1)
        first = [batcher.submit(1, 1, None)]
        await until(lambda: model.sizes() == [1], "the first request runs alone")
        rest = [batcher.submit(1, 1, None) for _ in range(9)]
        model.release(0)
        await until(lambda: model.sizes() == [1, 9], "everything queued meanwhile rides in the next batch")
        model.release()
        await _results(first + rest, [1] * 10)
        assert model.most_running == 1
        assert batch_count(metrics) == 2
        await batcher.stop()

    asyncio.run(scenario())


def test_a_burst_is_shared_by_the_idle_instances():
    async def scenario() -> None:
        model = GatedModel()
        batcher, metrics = make(model, instances=2)
        # Ten queue at once while both instances idle: the first takes ceil(10 / 2) = 5, the other the 5 left.
        burst = [batcher.submit(1, 1, None) for _ in range(10)]
        await until(lambda: len(model.started) == 2, "both instances run")
        assert model.sizes() == [5, 5]
        assert model.running == 2  # at the same time
        assert batcher.depth == 0
        # Six more while both are busy: the instance that frees up first is the only idle one and takes all six.
        more = [batcher.submit(1, 1, None) for _ in range(6)]
        model.release(0)
        await until(lambda: len(model.started) == 3, "the freed instance takes the queue")
        assert model.sizes() == [5, 5, 6]
        model.release()
        await _results(burst + more, [1] * 16)
        assert model.most_running == 2
        assert batch_count(metrics) == 3
        await batcher.stop()

    asyncio.run(scenario())


def test_one_idle_instance_takes_everything_like_one_instance():
    async def scenario() -> None:
        model = GatedModel()
        batcher, _ = make(model, instances=2)
        first = [batcher.submit(1, 1, None)]
        await until(lambda: model.sizes() == [1], "the first request runs on one instance")
        rest = [batcher.submit(1, 1, None) for _ in range(9)]  # the other instance is idle, the first one busy
        await until(lambda: model.sizes() == [1, 9], "the idle instance takes all nine")
        model.release()
        await _results(first + rest, [1] * 10)
        await batcher.stop()

    asyncio.run(scenario())


def test_a_request_bigger_than_the_share_still_runs_whole():
    async def scenario() -> None:
        model = GatedModel()
        batcher, _ = make(model, instances=4, max_batch_size=8)
        futures = [batcher.submit(6, 6, None), batcher.submit(1, 1, None)]
        await until(lambda: len(model.started) == 2, "both requests run")
        model.release()
        await until(lambda: model.running == 0 and batcher.depth == 0, "both finished")
        model.release()
        await _results(futures, [6, 1])
        assert model.started == [[6], [1]]  # share ceil(7 / 4) = 2: the 6-sample request is not split or refused
        await batcher.stop()

    asyncio.run(scenario())


def test_with_a_queue_delay_batches_fill_up_to_the_largest_size():
    async def scenario() -> None:
        model = GatedModel()
        # A queue delay asks for full batches: with 4 queued, one instance takes all 4 (its share would be 2).
        batcher, metrics = make(model, instances=2, max_batch_size=4, max_queue_delay=60.0)
        futures = [batcher.submit(1, 1, None) for _ in range(4)]
        await until(lambda: len(model.started) == 1, "the full batch runs")
        model.release()
        await _results(futures, [1] * 4)
        assert model.sizes() == [4]
        assert batch_count(metrics) == 1
        await batcher.stop()

    asyncio.run(scenario())


@pytest.mark.parametrize("instances", [1, 2, 3])
def test_a_long_queue_still_runs_batches_of_the_largest_size(instances: int):
    async def scenario() -> None:
        model = GatedModel()
        batcher, metrics = make(model, instances=instances, max_batch_size=4)
        blockers = [batcher.submit(1, 1, None) for _ in range(instances)]
        await until(lambda: len(model.started) == instances, "every instance busy")
        assert model.sizes() == [1] * instances
        # 8 samples per instance queue up. While at least instances x 4 are queued, every share (queued / idle
        # instances) is >= 4, so every batch is full (what a saturated server sees), whichever instance frees first.
        queued = [batcher.submit(1, 1, None) for _ in range(8 * instances)]
        while sum(model.sizes()) < 9 * instances:
            model.release()
            await asyncio.sleep(0.001)
        model.release()
        await _results(blockers + queued, [1] * (9 * instances))
        sizes = model.sizes()[instances:]
        assert sum(sizes) == 8 * instances
        full = 2 if instances == 1 else instances + 1  # batches taken while >= instances x 4 samples were queued
        assert sizes[:full] == [4] * full
        assert batch_count(metrics) == instances + len(sizes)
        await batcher.stop()

    asyncio.run(scenario())
