"""The TrainingJob state machine: what its children say -> the status to write and the actions to take.

Pure functions, no API calls: ``decide(tj, jobs, pods, progress, now)`` returns a ``Plan``. The handler feeds it
the cached children and applies the plan (creates first, then deletes, then the status patch), so an operator
killed between any two calls recomputes the same plan from the children and converges.

The bookkeeping that must survive (restarts per failure class, preemptions, GPU-seconds of finished attempts, the
first start) lives in the ``kiln.dev/ledger`` annotation of each attempt's Job, written when the Job is created;
status is only a projection of it, so a stale status (our patch not yet seen) never double-counts.
"""

from __future__ import annotations

import datetime
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from kiln_operator.builders import trainingjob as b
from kiln_operator.conditions import Condition, set_condition
from kiln_operator.lifecycle.plan import Plan

Obj = dict[str, Any]

TERMINAL = ("Succeeded", "Failed")
USER_CLASSES = ("UserError", "OutOfMemory", "Unknown")
IMAGE_ERRORS = (
    "ErrImagePull",
    "ImagePullBackOff",
    "InvalidImageName",
    "ErrImageNeverPull",
    "CreateContainerConfigError",
    "CreateContainerError",
)
TRAINER_REASONS = {  # the trainer's termination-message reasons (README, Trainer: exit codes)
    "UserError": "UserError",
    "OutOfMemory": "OutOfMemory",
    "Infrastructure": "Infrastructure",
    "Preemption": "Preemption",
    "Unknown": "Unknown",
}
EXIT_CODES = {2: "UserError", 3: "OutOfMemory", 4: "Infrastructure", 5: "Preemption"}
# DisruptionTarget reasons: DeletionByTaintManager means the node went away (infrastructure); the others are
# someone taking the capacity back (preemption), which never spends a budget.
NODE_LOST = ("DeletionByTaintManager", "NodeLost")
LOG_TAIL_LINES = 40
DEFAULT_CHILD_TTL = 3600


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    return datetime.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def fmt_time(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class Ledger:
    """What all attempts before the current one used up; carried from Job to Job."""

    user: int = 0
    infrastructure: int = 0
    preemptions: int = 0
    gpu_seconds: float = 0.0
    started_at: str | None = None  # when the first attempt's pods all ran
    resume_from: str | None = None  # the latest complete checkpoint known when this attempt was created
    previous: Obj | None = None  # the failure that replaced the previous attempt

    def dump(self) -> str:
        return json.dumps({k: v for k, v in asdict(self).items() if v not in (None, 0, 0.0)}, sort_keys=True)

    @classmethod
    def load(cls, text: str | None) -> Ledger:
        try:
            raw = json.loads(text or "{}")
        except ValueError:
            raw = {}
        known = {f: raw[f] for f in cls.__dataclass_fields__ if f in raw}
        return cls(**known)


@dataclass(frozen=True)
class Failure:
    cls: str  # one of api.trainingjob.FAILURE_CLASSES
    reason: str
    message: str
    exit_code: int | None = None
    pod: str | None = None
    log_tail: str | None = None
    last_checkpoint: Obj | None = None

    def to_status(self, now: float) -> Obj:
        out: Obj = {"class": self.cls, "reason": self.reason, "message": self.message[:4096], "time": fmt_time(now)}
        if self.exit_code is not None:
            out["exitCode"] = self.exit_code
        if self.pod:
            out["pod"] = self.pod
        if self.log_tail:
            out["logTail"] = self.log_tail[-16384:]
        return out


@dataclass(frozen=True)
class Config:
    image_default: str | None = None
    artifact_root: str | None = None
    artifact_env: tuple[Obj, ...] = ()
    progress_poll_seconds: float = 15.0


# ---------------------------------------------------------------------------------------------------------- pods


def _condition(obj: Mapping[str, Any], type_: str) -> Obj | None:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), None)


def _terminated(pod: Mapping[str, Any]) -> Obj | None:
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if cs.get("name") == b.CONTAINER and (cs.get("state") or {}).get("terminated"):
            return cs["state"]["terminated"]
    for cs in (pod.get("status") or {}).get("containerStatuses") or []:
        if (cs.get("state") or {}).get("terminated"):
            return cs["state"]["terminated"]
    return None


def _message_json(terminated: Mapping[str, Any] | None) -> Obj | None:
    text = (terminated or {}).get("message") or ""
    if text.lstrip().startswith("{"):
        try:
            value = json.loads(text)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None
    return None


def _index(pod: Mapping[str, Any]) -> int:
    ann = (pod.get("metadata") or {}).get("annotations") or {}
    try:
        return int(ann.get("batch.kubernetes.io/job-completion-index", 0))
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
        scheduled = _condition(pod, "PodScheduled")
        if scheduled and scheduled.get("status") == "False":
            return scheduled.get("reason") or "Unschedulable", scheduled.get("message") or "pod is not scheduled"
    return None


def classify(job: Mapping[str, Any], pods: Sequence[Mapping[str, Any]], spec: Mapping[str, Any]) -> Failure:
    """The failure class of a failed attempt, from its first failing pod (or the Job when the pods are gone)."""
    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]

    def finished(p: Mapping[str, Any]) -> tuple[str, int]:
        return ((_terminated(p) or {}).get("finishedAt") or "~", _index(p))

    for pod in sorted(failed, key=finished):
        name = pod["metadata"]["name"]
        disruption = _condition(pod, "DisruptionTarget")
        if disruption and disruption.get("status") == "True":
            why = disruption.get("reason") or "Disrupted"
            message = f"pod {name}: {disruption.get('message') or why}"
            cls = "Infrastructure" if why in NODE_LOST else "Preemption"
            return Failure(cls, why, message, pod=name)
        if (pod.get("status") or {}).get("reason") == "Evicted":
            return Failure(
                "Preemption", "Evicted", f"pod {name}: {pod['status'].get('message') or 'evicted'}", pod=name
            )
        term = _terminated(pod)
        if term is None:
            return Failure("Infrastructure", "PodFailed", f"pod {name} failed without a container status", pod=name)
        code = term.get("exitCode")
        report = _message_json(term)
        tail = None if report else (term.get("message") or None)  # FallbackToLogsOnError: the log's last lines
        if report and report.get("reason") in TRAINER_REASONS:
            cls = TRAINER_REASONS[report["reason"]]
            message = str(report.get("message") or report["reason"])
            reason = report["reason"]
        elif term.get("reason") == "OOMKilled":
            cls, reason, message = "OutOfMemory", "OOMKilled", "the container was killed at its memory limit"
        elif code in EXIT_CODES:
            cls = EXIT_CODES[code]
            reason, message = cls, f"the trainer exited with code {code} ({cls})"
        elif code in (137, 143):
            cls, reason, message = "Infrastructure", "Killed", f"the container was killed by a signal (exit {code})"
        else:
            cls, reason, message = "Unknown", "Error", f"the container exited with code {code}"
        if cls == "OutOfMemory":
            memory = (spec.get("resources") or {}).get("memory") or "unset"
            message += (
                f"; hint: raise resources.memory (now {memory}) or lower hyperparameters.batchSize "
                "(gradientAccumulationSteps keeps the global batch)"
            )
        checkpoint = (report or {}).get("lastCheckpoint")
        return Failure(
            cls,
            reason,
            f"pod {name}: {message}",
            exit_code=code,
            pod=name,
            log_tail=tail,
            last_checkpoint=checkpoint if isinstance(checkpoint, dict) else None,
        )
    failed_condition = _condition(job, "Failed") or {}
    text = failed_condition.get("message") or "the attempt's Job failed"
    if "DisruptionTarget" in text:
        return Failure("Preemption", "Disrupted", text)
    return Failure("Infrastructure", failed_condition.get("reason") or "PodsLost", text)


def gpu_seconds(pods: Sequence[Mapping[str, Any]], gpus: int, now: float) -> float:
    """GPU-seconds of one attempt: per pod, from its start to its end (or now), times its GPUs."""
    if not gpus:
        return 0.0
    total = 0.0
    for pod in pods:
        start = parse_time((pod.get("status") or {}).get("startTime"))
        if start is None:
            continue
        end = parse_time((_terminated(pod) or {}).get("finishedAt")) or now
        total += max(0.0, end - start) * gpus
    return total


# ---------------------------------------------------------------------------------------------------- the plan


def _progress_status(progress: Mapping[str, Any] | None) -> Obj | None:
    if not progress:
        return None
    out: Obj = {}
    for src, dst in (("step", "step"), ("totalSteps", "totalSteps"), ("resumedFromStep", "resumedFromStep")):
        if isinstance(progress.get(src), int) and progress[src] >= 0:
            out[dst] = progress[src]
    for src, dst in (("epoch", "epoch"), ("loss", "loss"), ("samplesPerSecond", "samplesPerSecond")):
        if isinstance(progress.get(src), int | float):
            out[dst] = round(float(progress[src]), 6)
    if out.get("totalSteps") and "step" in out:
        out["percent"] = max(0, min(100, int(100 * out["step"] / out["totalSteps"])))
    heartbeat = parse_time(progress.get("heartbeat")) if isinstance(progress.get("heartbeat"), str) else None
    if heartbeat is not None:
        out["heartbeatTime"] = fmt_time(heartbeat)
        eta = progress.get("etaSeconds")
        if isinstance(eta, int | float) and eta >= 0:
            out["eta"] = fmt_time(heartbeat + eta)
    return out or None


def _checkpoint_status(value: Any) -> Obj | None:
    if not isinstance(value, Mapping) or not value.get("uri"):
        return None
    out: Obj = {"uri": str(value["uri"])[:2048]}
    if isinstance(value.get("step"), int):
        out["step"] = value["step"]
    if isinstance(value.get("time"), str) and parse_time(value["time"]) is not None:
        out["time"] = fmt_time(parse_time(value["time"]) or 0)
    return out


def _artifact_status(report: Mapping[str, Any] | None) -> Obj | None:
    artifact = (report or {}).get("artifact")
    if not isinstance(artifact, Mapping) or not artifact.get("uri"):
        return None
    out: Obj = {"uri": str(artifact["uri"])}
    digest = artifact.get("digest")
    if isinstance(digest, str) and digest.startswith("sha256:"):
        out["digest"] = digest
        out["shortDigest"] = digest[7:19]
    out["format"] = str(artifact.get("format") or "hf-transformers")
    metrics = {k: float(v) for k, v in ((report or {}).get("metrics") or {}).items() if isinstance(v, int | float)}
    if metrics:
        out["metrics"] = metrics
    return out


def _attempt_of(job: Mapping[str, Any]) -> int:
    try:
        return int(((job.get("metadata") or {}).get("labels") or {}).get(b.ATTEMPT_LABEL, 0))
    except ValueError:
        return 0


def _ledger(job: Mapping[str, Any] | None) -> Ledger:
    return Ledger.load((((job or {}).get("metadata") or {}).get("annotations") or {}).get(b.LEDGER_ANNOTATION))


def _job_condition_true(job: Mapping[str, Any], type_: str) -> bool:
    return (_condition(job, type_) or {}).get("status") == "True"


def build_attempt(tj: Mapping[str, Any], attempt: int, ledger: Ledger, config: Config) -> Obj:
    body = {"metadata": tj["metadata"], "spec": b.resolve_locations(tj, config.artifact_root)}
    return b.indexed_job(
        body,
        attempt,
        image_default=config.image_default,
        artifact_env=config.artifact_env,
        annotations={b.LEDGER_ANNOTATION: ledger.dump()},
    )


def decide(
    tj: Mapping[str, Any],
    jobs: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    progress: Mapping[str, Any] | None,
    now: float,
    config: Config = Config(),
) -> Plan:
    """One reconcile pass. ``jobs`` are this TrainingJob's Jobs (all attempts), ``pods`` its pods (any attempt),
    ``progress`` the trainer's latest progress report (or None)."""
    meta, spec = tj["metadata"], tj.get("spec") or {}
    old: Obj = dict(tj.get("status") or {})
    policy = spec.get("runPolicy") or {}
    gpus = int((spec.get("resources") or {}).get("gpus") or 0)
    status: Obj = {k: v for k, v in old.items() if k not in ("conditions",)}
    status["observedGeneration"] = meta.get("generation")
    plan = Plan(status=status)

    if old.get("phase") in TERMINAL:
        return _finished(tj, jobs, plan, now)

    live = [j for j in jobs if _attempt_of(j) > 0]
    current = max(live, key=_attempt_of, default=None)
    plan.delete_jobs = [j["metadata"]["name"] for j in live if j is not current and not _deleting(j)]
    if current is None:
        attempt = int(old.get("attempt") or 0)
        ledger = Ledger()
        if attempt:  # the current attempt's Job vanished (deleted by someone): replace it as an infra failure
            prior = _ledger_from_status(old)
            failure = Failure("Infrastructure", "JobDeleted", f"the Job of attempt {attempt} disappeared")
            return _replace(tj, plan, attempt, prior, failure, None, [], now, config)
        # The status says what is true once the first Job exists (suspended, or waiting for its pods): one status
        # write for a new TrainingJob instead of "creating" then the same again when the Job's event comes back.
        current = build_attempt(tj, 1, ledger, config)
        plan.create = [*_service(tj), current]

    attempt = _attempt_of(current)
    ledger = _ledger(current)
    mine = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(b.ATTEMPT_LABEL) == str(attempt)]
    status.update(
        attempt=attempt,
        jobName=current["metadata"]["name"],
        restarts={"infrastructure": ledger.infrastructure, "user": ledger.user},
        preemptions=ledger.preemptions,
    )
    counts = {"pending": 0, "running": 0, "succeeded": 0, "failed": 0}
    for p in mine:
        phase = (p.get("status") or {}).get("phase") or "Pending"
        counts[{"Running": "running", "Succeeded": "succeeded", "Failed": "failed"}.get(phase, "pending")] += 1
    status["pods"] = counts
    status["gpuSeconds"] = int(ledger.gpu_seconds + gpu_seconds(mine, gpus, now))
    progress_status = _progress_status(progress)
    if progress_status:
        status["progress"] = progress_status
    checkpoint = _checkpoint_status((progress or {}).get("lastCheckpoint"))
    if checkpoint:
        status["lastCheckpoint"] = checkpoint
    if ledger.started_at:
        status.setdefault("startTime", ledger.started_at)
    if ledger.previous and "failure" not in status:
        status["failure"] = ledger.previous
    nodes = int(spec.get("nodes") or 1)
    job_suspended = bool((current.get("spec") or {}).get("suspend"))
    by_kiln = ((current.get("metadata") or {}).get("annotations") or {}).get(b.SUSPENDED_BY_KILN) == "true"

    # ---- terminal outcomes of this attempt
    if _job_condition_true(current, "Complete") or counts["succeeded"] >= nodes:
        rank0 = min((p for p in mine if p["status"].get("phase") == "Succeeded"), key=_index, default=None)
        report = _message_json(_terminated(rank0)) if rank0 else None
        artifact = _artifact_status(report)
        if artifact:
            status["artifact"] = artifact
        if report and _checkpoint_status(report.get("lastCheckpoint")):
            status["lastCheckpoint"] = _checkpoint_status(report["lastCheckpoint"])
        if report and isinstance(report.get("step"), int):
            done = dict(status.get("progress") or {})
            done.update(step=report["step"], percent=100)
            if isinstance(report.get("totalSteps"), int):
                done["totalSteps"] = report["totalSteps"]
            status["progress"] = done
        status.update(phase="Succeeded", completionTime=fmt_time(now))
        status.pop("failure", None)
        status.setdefault("startTime", status.get("startTime") or fmt_time(now))
        where = f"; model {artifact['uri']} ({artifact.get('digest', 'no digest')})" if artifact else ""
        plan.events.append(("Normal", "Succeeded", f"attempt {attempt} succeeded{where}"))
        _set_conditions(plan, old, "Succeeded", "Succeeded", f"attempt {attempt} succeeded{where}", artifact)
        plan.requeue_after = _ttl_delay(spec, now, now)
        return plan

    attempt_failed = _job_condition_true(current, "Failed") or counts["failed"] > 0
    if attempt_failed:
        failure = classify(current, mine, spec)
        return _replace(tj, plan, attempt, ledger, failure, current, mine, now, config)

    # ---- suspend: mirror spec.suspend; unsuspend only what we suspended (Kueue owns its own suspension)
    queue = (spec.get("scheduling") or {}).get("queueName")
    if spec.get("suspend") and not job_suspended:
        plan.patch_job = (current["metadata"]["name"], _suspend_patch(True))
    elif not spec.get("suspend") and job_suspended and (by_kiln or not queue):
        plan.patch_job = (current["metadata"]["name"], _suspend_patch(False))

    started = parse_time(ledger.started_at) or parse_time(old.get("startTime"))
    active = policy.get("activeDeadlineSeconds")
    if active and started and now - started > active:
        failure = Failure("DeadlineExceeded", "ActiveDeadlineExceeded", f"the job ran longer than {active}s")
        return _fail(plan, old, attempt, failure, current, now, delete_current=True)

    if spec.get("suspend") or job_suspended:
        status["pods"] = counts
        if spec.get("suspend"):
            _set_conditions(plan, old, "Suspended", "Suspended", "spec.suspend is true", None)
        else:
            why = f"waiting for Kueue to admit the Job from queue {queue}" if queue else "the Job is suspended"
            _set_conditions(plan, old, "Pending", "WaitingForQuota" if queue else "JobSuspended", why, None)
        return plan

    ran_all = counts["running"] + counts["succeeded"] >= nodes and len(mine) >= nodes
    if ran_all:
        if not status.get("startTime"):
            status["startTime"] = fmt_time(now)
        attempt_start = max((parse_time((p.get("status") or {}).get("startTime")) or now for p in mine), default=now)
        deadline = int(policy.get("progressDeadlineSeconds") or 1800)
        if progress is not None:  # a progress source exists (None: the operator cannot read one)
            last = max(parse_time((progress_status or {}).get("heartbeatTime")) or 0.0, attempt_start)
            if now - last > deadline:
                failure = Failure(
                    "DeadlineExceeded",
                    "ProgressDeadlineExceeded",
                    f"no progress reported for {int(now - last)}s (runPolicy.progressDeadlineSeconds={deadline})",
                )
                if policy.get("onProgressDeadline", "Restart") == "Fail":
                    return _fail(plan, old, attempt, failure, current, now, delete_current=True)
                return _replace(tj, plan, attempt, ledger, failure, current, mine, now, config, budget="infrastructure")
            plan.requeue_after = max(1.0, min(config.progress_poll_seconds, last + deadline - now))
        step = (progress_status or {}).get("step")
        message = f"attempt {attempt}: {nodes} pod(s) running" + (f", step {step}" if step is not None else "")
        if old.get("phase") != "Running":
            plan.events.append(("Normal", "Running", message))
        _set_conditions(plan, old, "Running", "Running", message, None)
        if active and started:
            plan.requeue_after = min(plan.requeue_after or active, max(1.0, started + active - now))
        return plan

    # ---- pods not all started yet: say why, and enforce the startup deadline
    why = pending_reason(mine) or ("PodsStarting", f"{counts['running']}/{nodes} pod(s) running")
    since = parse_time((current.get("status") or {}).get("startTime")) or parse_time(
        (current.get("metadata") or {}).get("creationTimestamp")
    )
    startup = int(policy.get("startupDeadlineSeconds") or 900)
    if since is not None and now - since > startup:
        failure = Failure(
            "DeadlineExceeded",
            "StartupDeadlineExceeded",
            f"pods did not all start within {startup}s: {why[0]}: {why[1]}",
        )
        return _fail(plan, old, attempt, failure, current, now, delete_current=True)
    if since is not None:
        plan.requeue_after = max(1.0, since + startup - now)
    phase = "Restarting" if old.get("phase") == "Restarting" and attempt > 1 else "Pending"
    if old.get("phase") not in (None, "Pending", "Restarting") or (_reason(old) != why[0] and why[0] != "PodsStarting"):
        plan.events.append(("Warning" if why[0] != "PodsStarting" else "Normal", why[0], why[1]))
    _set_conditions(plan, old, phase, why[0], why[1], None)
    return plan


def _service(tj: Mapping[str, Any]) -> list[Obj]:
    """The headless Service gives ranks each other's DNS names; one node needs none (MASTER_ADDR is localhost)."""
    return [b.headless_service(tj)] if int((tj.get("spec") or {}).get("nodes") or 1) > 1 else []


def _deleting(obj: Mapping[str, Any]) -> bool:
    return bool((obj.get("metadata") or {}).get("deletionTimestamp"))


def _reason(status: Mapping[str, Any]) -> str | None:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("reason")
    return None


def _suspend_patch(value: bool) -> Obj:
    return {"metadata": {"annotations": {b.SUSPENDED_BY_KILN: "true" if value else None}}, "spec": {"suspend": value}}


def _ledger_from_status(status: Mapping[str, Any]) -> Ledger:
    restarts = status.get("restarts") or {}
    return Ledger(
        user=int(restarts.get("user") or 0),
        infrastructure=int(restarts.get("infrastructure") or 0),
        preemptions=int(status.get("preemptions") or 0),
        gpu_seconds=float(status.get("gpuSeconds") or 0),
        started_at=status.get("startTime"),
    )


def _replace(
    tj: Mapping[str, Any],
    plan: Plan,
    attempt: int,
    ledger: Ledger,
    failure: Failure,
    current: Mapping[str, Any] | None,
    pods: Sequence[Mapping[str, Any]],
    now: float,
    config: Config,
    budget: str | None = None,
) -> Plan:
    """A failed attempt: replace the whole group with a new attempt if the class's budget allows, else fail."""
    spec, old = tj.get("spec") or {}, dict(tj.get("status") or {})
    policy = spec.get("runPolicy") or {}
    gpus = int((spec.get("resources") or {}).get("gpus") or 0)
    kind = budget or (
        None if failure.cls == "Preemption" else "user" if failure.cls in USER_CLASSES else "infrastructure"
    )
    limit = {"user": int(policy.get("maxUserRetries", 1)), "infrastructure": int(policy.get("maxInfraRetries", 5))}
    used = {"user": ledger.user, "infrastructure": ledger.infrastructure}
    checkpoint = _checkpoint_status(failure.last_checkpoint) or plan.status.get("lastCheckpoint")
    if checkpoint:
        plan.status["lastCheckpoint"] = checkpoint
    if kind is not None and used[kind] >= limit[kind]:
        budget_name = "maxUserRetries" if kind == "user" else "maxInfraRetries"
        exhausted = replace(failure, message=f"{failure.message} (runPolicy.{budget_name}={limit[kind]} used up)")
        return _fail(plan, old, attempt, exhausted, current, now, delete_current=False)
    started = ledger.started_at or old.get("startTime")
    resume = (checkpoint or {}).get("uri") if (spec.get("resume") or {}).get("policy", "Latest") == "Latest" else None
    status_failure = failure.to_status(now)
    nxt = Ledger(
        user=ledger.user + (kind == "user"),
        infrastructure=ledger.infrastructure + (kind == "infrastructure"),
        preemptions=ledger.preemptions + (failure.cls == "Preemption"),
        gpu_seconds=ledger.gpu_seconds + gpu_seconds(pods, gpus, now),
        started_at=started,
        resume_from=resume,
        previous=status_failure,
    )
    new_attempt = attempt + 1
    job = build_attempt(tj, new_attempt, nxt, config)
    if resume:
        job["metadata"]["annotations"]["kiln.dev/resume-from"] = resume
    plan.create = [*_service(tj), job]
    if current is not None:
        plan.delete_jobs = sorted({*plan.delete_jobs, current["metadata"]["name"]})
    plan.status.update(
        attempt=new_attempt,
        jobName=job["metadata"]["name"],
        phase="Restarting",
        restarts={"infrastructure": nxt.infrastructure, "user": nxt.user},
        preemptions=nxt.preemptions,
        failure=status_failure,
        gpuSeconds=int(nxt.gpu_seconds),
        pods={"pending": 0, "running": 0, "succeeded": 0, "failed": 0},
    )
    if started:
        plan.status["startTime"] = started
    spent = "no budget spent" if kind is None else f"{kind} restart {used[kind] + 1}/{limit[kind]}"
    where = f", resuming from {resume}" if resume else ""
    message = (
        f"attempt {attempt} failed ({failure.cls}: {failure.message}); "
        f"attempt {new_attempt} replaces the whole group ({spent}){where}"
    )
    plan.events.append(("Warning", "Restarting", message[:1024]))
    _set_conditions(plan, old, "Restarting", failure.reason, message, None)
    if failure.pod and not failure.log_tail:
        plan.want_log_tail = failure.pod
    return plan


def _fail(
    plan: Plan,
    old: Mapping[str, Any],
    attempt: int,
    failure: Failure,
    current: Mapping[str, Any] | None,
    now: float,
    *,
    delete_current: bool,
) -> Plan:
    plan.status.update(phase="Failed", completionTime=fmt_time(now), failure=failure.to_status(now))
    if delete_current and current is not None:
        # Running pods hold GPUs: stop them now; the Job's record is in status.
        plan.delete_jobs = sorted({*plan.delete_jobs, current["metadata"]["name"]})
    message = f"attempt {attempt} failed ({failure.cls}): {failure.message}"
    plan.events.append(("Warning", "Failed", message[:1024]))
    _set_conditions(plan, old, "Failed", failure.reason, message, None)
    if failure.pod and not failure.log_tail:
        plan.want_log_tail = failure.pod
    return plan


def _ttl_delay(spec: Mapping[str, Any], completed: float, now: float) -> float | None:
    policy = spec.get("runPolicy") or {}
    delays = [completed + int(policy.get("childrenTtlSecondsAfterFinished", DEFAULT_CHILD_TTL)) - now]
    if policy.get("ttlSecondsAfterFinished") is not None:
        delays.append(completed + int(policy["ttlSecondsAfterFinished"]) - now)
    return max(0.0, min(delays))


def _finished(tj: Mapping[str, Any], jobs: Sequence[Mapping[str, Any]], plan: Plan, now: float) -> Plan:
    """A terminal TrainingJob: nothing restarts; children go after their TTL, the TrainingJob after its own.
    The artifact is never touched."""
    spec, old = tj.get("spec") or {}, tj.get("status") or {}
    policy = spec.get("runPolicy") or {}
    # The verdict holds for any later generation (a finished job does not re-run): say it was looked at.
    generation = plan.status.get("observedGeneration")
    plan.status["conditions"] = [{**c, "observedGeneration": generation} for c in old.get("conditions") or []]
    done = parse_time(old.get("completionTime")) or now
    child_ttl = int(policy.get("childrenTtlSecondsAfterFinished", DEFAULT_CHILD_TTL))
    pending = []
    if now >= done + child_ttl:
        plan.delete_jobs = [j["metadata"]["name"] for j in jobs if not _deleting(j)]
        plan.delete_service = True
    else:
        pending.append(done + child_ttl - now)
    ttl = policy.get("ttlSecondsAfterFinished")
    if ttl is not None:
        if now >= done + int(ttl):
            plan.delete_self = True
        else:
            pending.append(done + int(ttl) - now)
    plan.requeue_after = max(1.0, min(pending)) if pending else None
    return plan


CONDITION_TYPES = ("Ready", "Reconciling", "Stalled", "Running", "Suspended", "Succeeded", "Failed", "ModelReady")


def _set_conditions(
    plan: Plan, old: Mapping[str, Any], phase: str, reason: str, message: str, artifact: Mapping[str, Any] | None
) -> None:
    """Phase and the conditions that say the same thing in kstatus' shape: Ready (succeeded), Reconciling
    (still converging), Stalled (failed for good), one per phase, and ModelReady for downstream kinds."""
    plan.status["phase"] = phase
    generation = plan.status.get("observedGeneration")
    stamp = fmt_time(datetime.datetime.now(datetime.UTC).timestamp())
    message = message[:4096]

    def flag(on: bool) -> Any:
        return "True" if on else "False"

    terminal = phase in TERMINAL
    # Suspended as the spec asks is a state reached, not one converging: GitOps tools (kstatus) read it as Current.
    settled = terminal or phase == "Suspended"
    model_reason = "ModelPublished" if artifact else ("NoArtifact" if phase == "Succeeded" else phase)
    model_message = (
        f"{artifact['uri']} ({artifact.get('digest', '')})"
        if artifact
        else ("the trainer reported no artifact (no output location)" if phase == "Succeeded" else message)
    )
    wanted = [
        Condition("Ready", flag(phase == "Succeeded"), reason, message),
        Condition("Reconciling", flag(not settled), reason if not settled else phase, message),
        Condition("Stalled", flag(phase == "Failed"), reason if phase == "Failed" else "NotStalled", message),
        Condition("Running", flag(phase == "Running"), reason, message),
        Condition("Suspended", flag(phase == "Suspended"), reason, message),
        Condition("Succeeded", flag(phase == "Succeeded"), reason, message),
        Condition("Failed", flag(phase == "Failed"), reason, message),
        Condition("ModelReady", flag(bool(artifact)), model_reason, model_message),
    ]
    conditions: list[Obj] = list(old.get("conditions") or [])
    for c in wanted:
        conditions = set_condition(conditions, c, generation, stamp)
    plan.status["conditions"] = conditions
