"""How the compressor tells the operator what happened: exit codes, failure classes and the termination message.

Mirrors the trainer (README "Trainer"): one-line messages naming the field and the rule, a JSON summary of at
most 4000 bytes in the termination message, and an exit code per failure class.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
from pathlib import Path
from typing import Any

TERMINATION_LIMIT = 4000


class ExitCode(enum.IntEnum):
    """The compressor's exit codes; 0-5 mean what they mean for the trainer."""

    SUCCEEDED = 0  # compressed, measured, published (the gates' verdicts are in the report, passed or not)
    UNKNOWN = 1  # an unexpected exception (traceback in the log)
    USER_ERROR = 2  # bad spec, unsupported source, data that does not match the model, step not for the target
    OUT_OF_MEMORY = 3  # host or CUDA OOM raised in the program (a kernel OOM kill is 137 / OOMKilled)
    INFRASTRUCTURE = 4  # storage unreachable, the target execution provider missing on this node
    PREEMPTED = 5  # SIGTERM: stopped (the step cache keeps the finished steps for the rerun)
    PARITY_CHECK = 6  # a step's own check failed: export parity over tolerance, expected fusions absent


FAILURE_CLASS = {
    ExitCode.SUCCEEDED: None,
    ExitCode.UNKNOWN: "Unknown",
    ExitCode.USER_ERROR: "UserError",
    ExitCode.OUT_OF_MEMORY: "OutOfMemory",
    ExitCode.INFRASTRUCTURE: "Infrastructure",
    ExitCode.PREEMPTED: "Preemption",
    ExitCode.PARITY_CHECK: "ParityCheck",
}


class CompressorError(Exception):
    """A classified failure: the program exits with ``code`` and ``message`` as its one-line reason."""

    code: ExitCode = ExitCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserError(CompressorError):
    code = ExitCode.USER_ERROR


class InfrastructureError(CompressorError):
    code = ExitCode.INFRASTRUCTURE


class OutOfMemory(CompressorError):
    code = ExitCode.OUT_OF_MEMORY


class Preempted(CompressorError):
    code = ExitCode.PREEMPTED


class ParityError(CompressorError):
    code = ExitCode.PARITY_CHECK


def _shrink(body: dict[str, Any]) -> None:
    """Drop the least useful parts of the summary, one at a time, until it fits."""
    report = body.get("report")
    if isinstance(report, dict):
        for who in ("source", "candidate"):
            m = report.get(who)
            if isinstance(m, dict) and len(m.get("latency") or []) > 1:
                m["latency"] = m["latency"][:1]  # the reference cell stays
                return
        if report.get("cpuFallbackNodes"):
            report["cpuFallbackNodes"] = report["cpuFallbackNodes"][: len(report["cpuFallbackNodes"]) // 2]
            return
        for gate in report.get("gates") or []:
            if len(gate.get("message", "")) > 60:
                gate["message"] = gate["message"][:57] + "..."
                return
        body.pop("report")
        return
    body.pop("candidates", None)


def termination_message(code: ExitCode, message: str, **fields: Any) -> str:
    """The JSON summary for the container's termination message, shortened to fit Kubernetes' limit."""
    body: dict[str, Any] = {"exitCode": int(code), "reason": FAILURE_CLASS[code] or "Succeeded", "message": message}
    body.update(copy.deepcopy({k: v for k, v in fields.items() if v is not None}))
    text = json.dumps(body, separators=(",", ":"))
    for _ in range(64):
        if len(text.encode()) <= TERMINATION_LIMIT or ("report" not in body and "candidates" not in body):
            break
        _shrink(body)
        text = json.dumps(body, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT:
        over = len(text.encode()) - TERMINATION_LIMIT
        body["message"] = message[: max(0, len(message) - over - 3)] + "..."
        text = json.dumps(body, separators=(",", ":"))
    return text


def write_termination_message(path: Path | None, text: str) -> None:
    if path is None:
        return
    with contextlib.suppress(OSError):  # outside Kubernetes /dev/termination-log may not be writable
        path.write_text(text)
