"""Waiting on state with a deadline, never a fixed sleep."""

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_for(probe: Callable[[], T], *, what: str, timeout: float = 60, interval: float = 0.25) -> T:
    """Call `probe` until it returns something truthy and return that; fail with `what` and the last value
    seen when `timeout` seconds pass. Exceptions from the probe propagate: a broken probe is a broken test."""
    deadline = time.monotonic() + timeout
    while True:
        value = probe()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} (last: {value!r})")
        time.sleep(interval)  # poll interval between checks of the condition, not a wait for state
