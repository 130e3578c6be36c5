"""Reading what pods and Jobs say, for every state machine: conditions, the workload's terminated state and its
termination message, why pods have not started, and the failure class of a failed batch attempt.

Pure: plain dicts in, values out. The caller names its workload container and the hint a failure class gets."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kiln_artifacts.contract import FAILURE_CLASS, ExitCode, read_termination_message
from kiln_operator import labels
from kiln_operator.status import parse_time, rfc3339

Obj = dict[str, Any]

IMAGE_ERRORS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
)
# DisruptionTarget reasons: DeletionByTaintManager means the node went away (infrastructure); the others are
# someone taking the capacity back (preemption), which never spends a budget.
NODE_LOST = ("DeletionByTaintManager", "NodeLost")
# The failure classes a batch workload's exit code or termination message may name; any other code is Unknown.
BATCH_CLASSES = ("UserError", "OutOfMemory", "Infrastructure", "Preemption", "Unknown")
BATCH_EXIT_CODES = {
    int(c): FAILURE_CLASS[c]
    for c in (ExitCode.USER_ERROR, ExitCode.OUT_OF_MEMORY, ExitCode.INFRASTRUCTURE, ExitCode.PREEMPTED)
}


@dataclass(frozen=True)
class Failure:
    cls: str  # a failure class of the kind's API (e.g. api.trainingjob.FAILURE_CLASSES)
    reason: str
    message: str
    exit_code: int | None = None
    pod: str | None = None
    log_tail: str | None = None
    last_checkpoint: Obj | None = None

    def to_status(self, now: float) -> Obj:
        out: Obj = {"class": self.cls, "reason": self.reason, "message": self.message[:4096], "time": rfc3339(now)}
        if self.exit_code is not None:
            out["exitCode"] = self.exit_code
        if self.pod:
            out["pod"] = self.pod
        if self.log_tail:
            out["logTail"] = self.log_tail[-16384:]
        return out


def condition(obj: Mapping[str, Any], type_: str) -> Obj | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def condition_true(obj: Mapping[str, Any], type_: str) -> bool:
    return (condition(obj, type_) or {}).get("status") == "True"


def terminated(pod: Mapping[str, Any], container: str) -> Obj | None:
    """The terminated state of the workload container, else of any container that terminated."""
    statuses = (pod.get("status") or {}).get("containerStatuses") or []
    for cs in statuses:
        if cs.get("name") == container and (cs.get("state") or {}).get("terminated"):
            return cs["state"]["terminated"]
    for cs in statuses:
        if (cs.get("state") or {}).get("terminated"):
            return cs["state"]["terminated"]
    return None


def report(pod: Mapping[str, Any] | None, container: str) -> Obj | None:
    """The workload's JSON summary from its termination message (None: none, or a log tail)."""
    if pod is None:
        return None
    return read_termination_message((terminated(pod, container) or {}).get("message"))


def completion_index(pod: Mapping[str, Any]) -> int:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(ann.get(labels.COMPLETION_INDEX, 0))
    except ValueError:
        return 0


def deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def attempt_of(obj: Mapping[str, Any]) -> int:
    """The attempt number a Job or pod carries in its labels (0: none)."""
    try:
        return int(((obj.get("metadata") or {}).get("labels") or {}).get(labels.ATTEMPT, 0))
    except ValueError:
        return 0


def pending_reason(pods: Sequence[Mapping[str, Any]]) -> tuple[str, str] | None:
    """Why pods have not started: the image (the container's waiting reason) or the scheduler's message."""
    for pod in pods:
        for cs in (pod.get("status") or {}).get("containerStatuses") or []:
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in IMAGE_ERRORS:
                return waiting["reason"], waiting.get("message") or f"container {cs.get('name')}: {waiting['reason']}"
    for pod in pods:
        scheduled = condition(pod, "PodScheduled")
        if scheduled and scheduled.get("status") == "False":
            return scheduled.get("reason") or "Unschedulable", scheduled.get("message") or "pod is not scheduled"
    return None


def classify(
    job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], *, container: str, oom_hint: str = ""
) -> Failure:
    """The failure class of a failed batch attempt, from its first failing pod (or the Job when the pods are
    gone). ``container`` is the workload's container; ``oom_hint`` is appended to an OutOfMemory message."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]

    def finished(p: Mapping[str, Any]) -> tuple[str, int]:
        return ((terminated(p, container) or {}).get("finishedAt") or "~", completion_index(p))

    for pod in sorted(failed, key=finished):
        name = pod["metadata"]["name"]
        disruption = condition(pod, "DisruptionTarget")
        if disruption and disruption.get("status") == "True":
            why = disruption.get("reason") or "Disrupted"
            message = f"pod {name}: {disruption.get('message') or why}"
            cls = "Infrastructure" if why in NODE_LOST else "Preemption"
            return Failure(cls, why, message, pod=name)
        if (pod.get("status") or {}).get("reason") == "Evicted":
            return Failure(
                "Preemption", "Evicted", f"pod {name}: {pod['status'].get('message') or 'evicted'}", pod=name
            )
        term = terminated(pod, container)
        if term is None:
            return Failure("Infrastructure", "PodFailed", f"pod {name} failed without a container status", pod=name)
        code = term.get("exitCode")
        said = read_termination_message(term.get("message"))
        tail = None if said else (term.get("message") or None)  # FallbackToLogsOnError: the log's last lines
        if said and said.get("reason") in BATCH_CLASSES:
            cls = reason = said["reason"]
            message = str(said.get("message") or reason)
        elif term.get("reason") == "OOMKilled":
            cls, reason, message = "OutOfMemory", "OOMKilled", "the container was killed at its memory limit"
        elif code in BATCH_EXIT_CODES:
            cls = reason = BATCH_EXIT_CODES[code] or "Unknown"
            message = f"the {container} exited with code {code} ({cls})"
        elif code in (137, 143):
            cls, reason, message = "Infrastructure", "Killed", f"the container was killed by a signal (exit {code})"
        else:
            cls, reason, message = "Unknown", "Error", f"the container exited with code {code}"
        if said and said.get("message") and said.get("reason") not in BATCH_CLASSES:
            # A class of the kind's own (a compression's parity check, an untrusted source): the program's words.
            message = f"{message}: {said['message']}"
        if cls == "OutOfMemory" and oom_hint:
            message += f"; hint: {oom_hint}"
        checkpoint = (said or {}).get("lastCheckpoint")
        return Failure(
            cls,
            reason,
            f"pod {name}: {message}",
            exit_code=code,
            pod=name,
            log_tail=tail,
            last_checkpoint=checkpoint if isinstance(checkpoint, dict) else None,
        )
    failed_condition = condition(job, "Failed") or {}
    text = failed_condition.get("message") or "the attempt's Job failed"
    if "DisruptionTarget" in text:
        return Failure("Preemption", "Disrupted", text)
    return Failure("Infrastructure", failed_condition.get("reason") or "PodsLost", text)


def gpu_seconds(pods: Sequence[Mapping[str, Any]], gpus: int, now: float, container: str) -> float:
    """GPU-seconds of one attempt: per pod, from its start to its end (or now), times its GPUs."""
    if not gpus:
        return 0.0
    total = 0.0
    for pod in pods:
        start = parse_time((pod.get("status") or {}).get("startTime"))
        if start is None:
            continue
        end = parse_time((terminated(pod, container) or {}).get("finishedAt")) or now
        total += max(0.0, end - start) * gpus
    return total
