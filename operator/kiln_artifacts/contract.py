"""The contract between Kiln's workload programs (trainer, compressor, server) and the operator that runs them.

A workload tells the operator what happened in three ways, all readable with no pod permissions beyond the
operator's own: its exit code, a JSON summary in the container's termination message (the kubelet copies it
into the pod status), and ``kiln-progress {...}`` lines in its log (or a progress file beside its checkpoints).
Every side reads and writes them through this module only, so the meanings cannot drift apart.
"""

from __future__ import annotations

import contextlib
import copy
import enum
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .manifest import Producer

# Kubernetes truncates the termination message at 4096 bytes; keep ours well under it.
TERMINATION_LIMIT = 4000
TERMINATION_LOG = "/dev/termination-log"
# Another place for the termination message (a run outside Kubernetes); the --termination-log flag wins over it.
TERMINATION_LOG_ENV = "KILN_TERMINATION_LOG"
# Prefix of a progress line in a workload's log; the rest of the line is one JSON object.
PROGRESS_MARK = "kiln-progress "


class ExitCode(enum.IntEnum):
    """Every Kiln workload's exit codes. 0-5 mean the same for every program; the operator maps each to a
    failure class (``FAILURE_CLASS``) and a retry budget. The server's startup failures have codes of their own
    (10-13), so no code means one thing for the trainer and another for the server; 14 is any reader's refusal of
    an artifact that its trusted keys do not vouch for (compressor, server)."""

    SUCCEEDED = 0
    UNKNOWN = 1  # an unexpected exception (Python's own code for an uncaught exception; traceback in the log)
    USER_ERROR = 2  # bad spec, flag, data or model: retrying the same spec cannot help (argparse uses 2 too)
    OUT_OF_MEMORY = 3  # CUDA or host OOM caught in the program (a kernel OOM kill shows as 137 / OOMKilled)
    INFRASTRUCTURE = 4  # rendezvous timeout, lost peer, storage unreachable, provider missing: retry elsewhere
    PREEMPTED = 5  # SIGTERM received and the work saved (checkpoint, step cache): resume without spending a retry
    PARITY_CHECK = 6  # a compression step's own check failed (export parity over tolerance, fusions absent)
    ARTIFACT = 10  # the server cannot read its artifact or it fails verification (missing, corrupted, digest)
    CONTRACT = 11  # the artifact is not a servable model (format, task, kiln-model.json, graph inputs/outputs)
    RUNTIME = 12  # ONNX Runtime could not create the session or the warm-up failed
    PORT = 13  # a port could not be bound
    UNTRUSTED = 14  # the artifact is unsigned, tampered with, or signed by an untrusted key


# The failure class (TrainingJob/ModelCompression status.failure.class) each exit code stands for.
FAILURE_CLASS: dict[int, str | None] = {
    ExitCode.SUCCEEDED: None,
    ExitCode.UNKNOWN: "Unknown",
    ExitCode.USER_ERROR: "UserError",
    ExitCode.OUT_OF_MEMORY: "OutOfMemory",
    ExitCode.INFRASTRUCTURE: "Infrastructure",
    ExitCode.PREEMPTED: "Preemption",
    ExitCode.PARITY_CHECK: "ParityCheck",
    ExitCode.ARTIFACT: "Artifact",
    ExitCode.CONTRACT: "UserError",
    ExitCode.RUNTIME: "Infrastructure",
    ExitCode.PORT: "Infrastructure",
    ExitCode.UNTRUSTED: "Untrusted",
}
# The termination message's ``reason`` values a workload writes (FAILURE_CLASS's values, and "Succeeded").
REASONS = frozenset(c for c in FAILURE_CLASS.values() if c) | {"Succeeded"}

# Compression gate (spec.gates field) -> the reason a ModelCompression reports when that gate fails.
GATE_REASONS = {
    "maxAccuracyDrop": "AccuracyDropTooLarge",
    "minAgreement": "AgreementTooLow",
    "maxP95LatencyMs": "LatencyTooHigh",
    "minSpeedup": "SpeedupTooSmall",
    "maxSizeBytes": "ArtifactTooLarge",
    "placement": "CPUFallback",  # a GPU candidate with heavy nodes left on the CPU provider
}


class WorkloadError(Exception):
    """A classified failure: the program exits with ``code`` and ``message`` as its one-line reason."""

    code: ExitCode = ExitCode.UNKNOWN

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UserError(WorkloadError):
    code = ExitCode.USER_ERROR


class OutOfMemory(WorkloadError):
    code = ExitCode.OUT_OF_MEMORY


class InfrastructureError(WorkloadError):
    code = ExitCode.INFRASTRUCTURE


class Preempted(WorkloadError):
    code = ExitCode.PREEMPTED


class ParityError(WorkloadError):
    code = ExitCode.PARITY_CHECK


class UntrustedError(WorkloadError):
    """An input artifact failed the signature check its program was told to make (--trusted-keys)."""

    code = ExitCode.UNTRUSTED


# ------------------------------------------------------------------------------------------ termination message


def termination_message(
    code: ExitCode, message: str, *, shrink: Callable[[dict[str, Any]], bool] | None = None, **fields: Any
) -> str:
    """The JSON summary for the container's termination message, at most ``TERMINATION_LIMIT`` bytes.

    ``shrink(body)`` drops the least useful part of ``body`` in place and says whether it dropped anything; it
    is called until the summary fits, and the message itself is shortened last."""
    body: dict[str, Any] = {"exitCode": int(code), "reason": FAILURE_CLASS[code] or "Succeeded", "message": message}
    body.update(copy.deepcopy({k: v for k, v in fields.items() if v is not None}))
    text = json.dumps(body, separators=(",", ":"))
    while shrink is not None and len(text.encode()) > TERMINATION_LIMIT and shrink(body):
        text = json.dumps(body, separators=(",", ":"))
    if len(text.encode()) > TERMINATION_LIMIT:
        over = len(text.encode()) - TERMINATION_LIMIT
        body["message"] = message[: max(0, len(message) - over - 3)] + "..."
        text = json.dumps(body, separators=(",", ":"))
    return text


def termination_log_path(argv: Sequence[str] | None, env: Mapping[str, str]) -> Path:
    """Where the termination message goes: ``--termination-log``, else ``$KILN_TERMINATION_LOG``, else the kubelet's
    file. Read from the raw command line, so that the message about an invalid command line gets there too."""
    args = list(sys.argv[1:] if argv is None else argv)
    for i, arg in enumerate(args):
        if arg == "--termination-log" and i + 1 < len(args):
            return Path(args[i + 1])
        if arg.startswith("--termination-log="):
            return Path(arg.split("=", 1)[1])
    return Path(env.get(TERMINATION_LOG_ENV) or TERMINATION_LOG)


def write_termination_message(path: Path | str | None, text: str) -> None:
    if path is None:
        return
    # Outside Kubernetes /dev/termination-log may not be writable; the exit code still tells.
    with contextlib.suppress(OSError):
        Path(path).write_text(text)


def read_termination_message(text: str | None) -> dict[str, Any] | None:
    """The workload's JSON summary from a container's terminated state, or None (a log tail, or nothing)."""
    text = text or ""
    if not text.lstrip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


# --------------------------------------------------------------------------------------------------- progress


def progress_line(state: Mapping[str, Any]) -> str:
    """One log line the operator reads as this workload's progress."""
    return PROGRESS_MARK + json.dumps(state, separators=(",", ":"), default=str)


def parse_progress_log(text: str) -> dict[str, Any] | None:
    """The last progress report in a log tail, or None when there is none."""
    for line in reversed(text.splitlines()):
        at = line.find(PROGRESS_MARK)
        if at >= 0:
            try:
                value = json.loads(line[at + len(PROGRESS_MARK) :])
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


# ------------------------------------------------------------------------------------------------------- spec


def spec_from(
    path: str | None, env: Mapping[str, str], variable: str, *, error: type[WorkloadError] = UserError
) -> dict[str, Any]:
    """The spec a workload runs: a JSON file given by flag, else the JSON the operator put in ``variable``."""
    if path:
        try:
            value = json.loads(Path(path).read_text())
        except OSError as e:
            raise error(f"--spec {path}: cannot read: {e.strerror or e}") from None
        except ValueError as e:
            raise error(f"--spec {path}: not valid JSON: {e}") from None
        where = f"--spec {path}"
    elif env.get(variable):
        try:
            value = json.loads(env[variable])
        except ValueError as e:
            raise error(f"{variable}: not valid JSON: {e}") from None
        where = variable
    else:
        return {}
    if not isinstance(value, dict):
        raise error(f"{where}: must be a JSON object, got {type(value).__name__}")
    return value


# ----------------------------------------------------------------------------------------------------- identity


def producer_from(kind: str, env: Mapping[str, str]) -> Producer | None:
    """The resource that runs this workload, from the variables the operator sets in its pods (None outside one):
    the lineage of the artifacts it publishes names it."""
    if not (env.get("KILN_JOB_NAME") and env.get("KILN_JOB_NAMESPACE")):
        return None
    return Producer(kind, env["KILN_JOB_NAMESPACE"], env["KILN_JOB_NAME"], env.get("KILN_JOB_UID", ""))


def image_from(env: Mapping[str, str]) -> str | None:
    """The image this workload runs, as the operator names it in its pods (the artifacts' lineage records it)."""
    return env.get("KILN_IMAGE")
