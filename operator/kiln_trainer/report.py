"""How the trainer tells the operator what happens: exit codes, the progress file and the termination message.

Everything here is cheap for the operator to read with no pod permissions beyond its own: the kubelet copies
the termination message into the pod status, and the progress file lies next to the checkpoints.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import tempfile
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# Kubernetes truncates the termination message at 4096 bytes; keep ours well under it.
TERMINATION_LIMIT = 4000


class ExitCode(enum.IntEnum):
    """The trainer's exit codes; the operator maps them to TrainingJob failure classes and retry budgets."""

    SUCCEEDED = 0
    UNKNOWN = 1  # an unexpected exception (Python's own code for an uncaught exception)
    USER_ERROR = 2  # bad hyperparameters, data or model: retrying the same spec cannot help (argparse uses 2 too)
    OUT_OF_MEMORY = 3  # CUDA or host OOM caught in the program (a kernel OOM kill shows as 137 / OOMKilled)
    INFRASTRUCTURE = 4  # rendezvous timeout, lost peer, storage unreachable: retry on fresh pods
    PREEMPTED = 5  # SIGTERM received and a final checkpoint written: resume without spending a retry


FAILURE_CLASS = {
    ExitCode.SUCCEEDED: None,
    ExitCode.UNKNOWN: "Unknown",
    ExitCode.USER_ERROR: "UserError",
    ExitCode.OUT_OF_MEMORY: "OutOfMemory",
    ExitCode.INFRASTRUCTURE: "Infrastructure",
    ExitCode.PREEMPTED: "Preemption",
}


class TrainerError(Exception):
    """A classified failure: the program exits with ``code`` and ``message`` as its one-line reason."""

    code: ExitCode = ExitCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserError(TrainerError):
    code = ExitCode.USER_ERROR


class InfrastructureError(TrainerError):
    code = ExitCode.INFRASTRUCTURE


class OutOfMemory(TrainerError):
    code = ExitCode.OUT_OF_MEMORY


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


def termination_message(code: ExitCode, message: str, **fields: Any) -> str:
    """The JSON summary for the container's termination message, shortened to fit Kubernetes' limit."""
    body: dict[str, Any] = {"exitCode": int(code), "reason": FAILURE_CLASS[code] or "Succeeded", "message": message}
    body.update({k: v for k, v in fields.items() if v is not None})
    text = json.dumps(body, separators=(",", ":"))
    if len(text) > TERMINATION_LIMIT:
        body["message"] = message[: max(0, len(message) - (len(text) - TERMINATION_LIMIT)) - 3] + "..."
        text = json.dumps(body, separators=(",", ":"))
    return text


def write_termination_message(path: Path | None, text: str) -> None:
    if path is None:
        return
    # Outside Kubernetes /dev/termination-log may not be writable; the exit code still tells.
    with contextlib.suppress(OSError):
        path.write_text(text)
