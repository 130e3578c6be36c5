"""The trainer's progress file, next to the checkpoints, which the operator reads with no pod permissions beyond its
own. Exit codes, failure classes and the termination message: kiln_artifacts.contract.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def write_json_atomic(path: Path, data: Mapping[str, Any]) -> None:
    """Write-then-rename: a reader sees the previous complete file or the new one, never a partial one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".kiln-tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, separators=(",", ":"))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ProgressReporter:
    """Rank 0's progress file: the periodic report (step, loss, rate) every ``interval`` seconds, and every state
    change (evaluation, checkpoint, phase) at once. The state changes never delay the periodic report: with an
    evaluation or a checkpoint more often than ``interval``, the step would otherwise never be reported."""

    def __init__(self, path: Path | None, total_steps: int, interval: float = 5.0) -> None:
        self.path = path
        self.total_steps = total_steps
        self.interval = interval
        self._last_report = 0.0
        self.state: dict[str, Any] = {"phase": "Running", "step": 0, "totalSteps": total_steps}

    def update(self, *, force: bool = False, **fields: Any) -> None:
        self.state.update(fields)
        if self.path is None:
            return
        if not force:
            if not self.due():
                return
            self._last_report = time.monotonic()
        self.state["heartbeat"] = now_iso()
        write_json_atomic(self.path, self.state)

    def due(self) -> bool:
        """Whether the next periodic update would be written (so the caller computes costly fields only then)."""
        return self.path is not None and time.monotonic() - self._last_report >= self.interval
