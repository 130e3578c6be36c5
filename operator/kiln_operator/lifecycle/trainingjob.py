"""The TrainingJob state machine: what its children say -> the status to write and the actions to take.

Pure functions, no API calls: ``decide(tj, jobs, pods, progress, now)`` returns a ``Plan``. The handler feeds it
the cached children and applies the plan (creates first, then deletes, then the status patch), so an operator
killed between any two calls recomputes the same plan from the children and converges.

The bookkeeping that must survive (restarts per failure class, preemptions, GPU-seconds of finished attempts, the
first start) lives in the ``kiln.dev/ledger`` annotation of each attempt's Job, written when the Job is created;
status is only a projection of it, so a stale status (our patch not yet seen) never double-counts.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from kiln_operator import labels
from kiln_operator.builders import trainingjob as b
from kiln_operator.lifecycle.plan import Plan, job, service, workload_ref
from kiln_operator.lifecycle.pods import (
    Failure,
    attempt_of,
    classify,
    completion_index,
    condition,
    condition_true,
    deleting,
    pending_reason,
    report,
)
from kiln_operator.lifecycle.pods import gpu_seconds as pod_gpu_seconds
from kiln_operator.status import Condition, flag, kstatus, merge_conditions, parse_time, rfc3339

Obj = dict[str, Any]

TERMINAL = ("Succeeded", "Failed")
USER_CLASSES = ("UserError", "OutOfMemory", "Unknown")
DEFAULT_CHILD_TTL = 3600
# Evictions Kueue makes because it was asked to (spec.suspend deactivates the Workload), not preemptions.
KUEUE_OWN_EVICTIONS = ("Deactivated", "InactiveWorkload")
QUEUE_POLL_SECONDS = 30.0  # how stale the reason a queued job waits may get (one list of Workloads per look)


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
class Config:
    image_default: str | None = None
    artifact_root: str | None = None
    artifact_env: tuple[Obj, ...] = ()
    progress_poll_seconds: float = 15.0


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
        out["heartbeatTime"] = rfc3339(heartbeat)
        eta = progress.get("etaSeconds")
        if isinstance(eta, int | float) and eta >= 0:
            out["eta"] = rfc3339(heartbeat + eta)
    return out or None


def _checkpoint_status(value: Any) -> Obj | None:
    if not isinstance(value, Mapping) or not value.get("uri"):
        return None
    out: Obj = {"uri": str(value["uri"])[:2048]}
    if isinstance(value.get("step"), int):
        out["step"] = value["step"]
    if isinstance(value.get("time"), str) and parse_time(value["time"]) is not None:
        out["time"] = rfc3339(parse_time(value["time"]) or 0)
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


def _ledger(job: Mapping[str, Any] | None) -> Ledger:
    return Ledger.load((((job or {}).get("metadata") or {}).get("annotations") or {}).get(labels.LEDGER))


def build_attempt(tj: Mapping[str, Any], attempt: int, ledger: Ledger, config: Config) -> Obj:
    body = {"metadata": tj["metadata"], "spec": b.resolve_locations(tj, config.artifact_root)}
    return b.indexed_job(
        body,
        attempt,
        image_default=config.image_default,
        artifact_env=config.artifact_env,
        annotations={labels.LEDGER: ledger.dump()},
    )


def kueue_workload(workload: Mapping[str, Any] | None, current: Mapping[str, Any]) -> Mapping[str, Any] | None:
    """The Kueue Workload of this attempt's Job, or None (not queued, not created yet, or another Job's)."""
    uid = (current.get("metadata") or {}).get("uid")
    if not workload or not uid:
        return None
    return workload if ((workload.get("metadata") or {}).get("labels") or {}).get(labels.KUEUE_JOB_UID) == uid else None


def kueue_evictions(workload: Mapping[str, Any] | None) -> int:
    """How often Kueue took this Job's quota back (preemption, a stopped queue, node failures, ...): Kueue's own
    count, kept on the Workload, so nothing is counted twice however often a pass runs. Deactivation is left out:
    that is Kiln asking Kueue to suspend (spec.suspend), not something done to the job."""
    evictions = (((workload or {}).get("status") or {}).get("schedulingStats") or {}).get("evictions") or []
    return sum(int(e.get("count") or 0) for e in evictions if e.get("reason") not in KUEUE_OWN_EVICTIONS)


def decide(
    tj: Mapping[str, Any],
    jobs: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    progress: Mapping[str, Any] | None,
    now: float,
    config: Config = Config(),
    workload: Mapping[str, Any] | None = None,
) -> Plan:
    """One reconcile pass. ``jobs`` are this TrainingJob's Jobs (all attempts), ``pods`` its pods (any attempt),
    ``progress`` the trainer's latest progress report (or None), ``workload`` the Kueue Workload of the current
    attempt's Job when the TrainingJob names a queue (or None)."""
    meta, spec = tj["metadata"], tj.get("spec") or {}
    old: Obj = dict(tj.get("status") or {})
    policy = spec.get("runPolicy") or {}
    gpus = int((spec.get("resources") or {}).get("gpus") or 0)
    status: Obj = {k: v for k, v in old.items() if k not in ("conditions",)}
    status["observedGeneration"] = meta.get("generation")
    plan = Plan(status=status)

    if old.get("phase") in TERMINAL:
        return _finished(tj, jobs, plan, now)

    live = [j for j in jobs if attempt_of(j) > 0]
    current = max(live, key=attempt_of, default=None)
    plan.delete = [job(j["metadata"]["name"]) for j in live if j is not current and not deleting(j)]
    if current is None:
        attempt = int(old.get("attempt") or 0)
        ledger = Ledger()
        if attempt:  # the current attempt's Job vanished (deleted by someone): replace it as an infra failure
            prior = _ledger_from_status(old)
            failure = Failure("Infrastructure", "JobDeleted", f"the Job of attempt {attempt} disappeared")
            return _replace(tj, plan, attempt, prior, failure, None, [], now, config)
        if spec.get("suspend") and (spec.get("scheduling") or {}).get("queueName"):
            # Kueue admits a Job as soon as its Workload exists, before Kiln could deactivate that Workload: a
            # queued job that starts suspended gets its first Job when it is resumed.
            status.update(attempt=0, pods={"pending": 0, "running": 0, "succeeded": 0, "failed": 0})
            why = "spec.suspend is true: the Job is created, and queued, when it is resumed"
            _set_conditions(plan, old, "Suspended", "Suspended", why, None, now)
            return plan
        # The status says what is true once the first Job exists (suspended, or waiting for its pods): one status
        # write for a new TrainingJob instead of "creating" then the same again when the Job's event comes back.
        current = build_attempt(tj, 1, ledger, config)
        plan.create = [*_service(tj), current]

    attempt = attempt_of(current)
    queue = (spec.get("scheduling") or {}).get("queueName")
    wl = kueue_workload(workload, current) if queue else None
    # Kueue's evictions of this attempt count as preemptions: no budget, and the same Job resumes when Kueue
    # admits it again (the trainer picks up its latest checkpoint). A later replacement carries them on.
    ledger = _ledger(current)
    ledger = replace(ledger, preemptions=ledger.preemptions + kueue_evictions(wl))
    mine = [p for p in pods if ((p.get("metadata") or {}).get("labels") or {}).get(labels.ATTEMPT) == str(attempt)]
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
    status["gpuSeconds"] = int(ledger.gpu_seconds + pod_gpu_seconds(mine, gpus, now, b.CONTAINER))
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

    # ---- terminal outcomes of this attempt
    if condition_true(current, "Complete") or counts["succeeded"] >= nodes:
        rank0 = min((p for p in mine if p["status"].get("phase") == "Succeeded"), key=completion_index, default=None)
        said = report(rank0, b.CONTAINER)
        artifact = _artifact_status(said)
        if artifact:
            status["artifact"] = artifact
        if said and _checkpoint_status(said.get("lastCheckpoint")):
            status["lastCheckpoint"] = _checkpoint_status(said["lastCheckpoint"])
        if said and isinstance(said.get("step"), int):
            done = dict(status.get("progress") or {})
            done.update(step=said["step"], percent=100)
            if isinstance(said.get("totalSteps"), int):
                done["totalSteps"] = said["totalSteps"]
            status["progress"] = done
        status.update(phase="Succeeded", completionTime=rfc3339(now))
        status.pop("failure", None)
        status.setdefault("startTime", status.get("startTime") or rfc3339(now))
        where = f"; model {artifact['uri']} ({artifact.get('digest', 'no digest')})" if artifact else ""
        plan.events.append(("Normal", "Succeeded", f"attempt {attempt} succeeded{where}"))
        _set_conditions(plan, old, "Succeeded", "Succeeded", f"attempt {attempt} succeeded{where}", artifact, now)
        plan.requeue_after = _ttl_delay(spec, now, now)
        return plan

    # A suspended Job's pods were stopped by the suspension (spec.suspend, or Kueue's eviction), and the trainer
    # exits non-zero after its SIGTERM checkpoint: that is not the attempt failing; the same Job resumes.
    attempt_failed = condition_true(current, "Failed") or (counts["failed"] > 0 and not job_suspended)
    if attempt_failed:
        failure = classify(current, mine, container=b.CONTAINER, oom_hint=oom_hint(spec))
        return _replace(tj, plan, attempt, ledger, failure, current, mine, now, config)

    # ---- suspend. Without a queue, Kiln mirrors spec.suspend onto the Job.
    # With one, Kueue owns the Job's suspend (it unsuspends whatever it admitted): Kiln asks Kueue instead, by
    # deactivating the Workload, which Kueue answers by evicting it and suspending the Job.
    if queue:
        want_active = not spec.get("suspend")
        if wl is not None and bool((wl.get("spec") or {}).get("active", True)) != want_active:
            plan.patch.append((workload_ref(wl["metadata"]["name"]), {"spec": {"active": want_active}}))
    elif spec.get("suspend") and not job_suspended:
        plan.patch.append((job(current["metadata"]["name"]), _suspend_patch(True)))
    elif not spec.get("suspend") and job_suspended:
        plan.patch.append((job(current["metadata"]["name"]), _suspend_patch(False)))
    if ledger.preemptions > int(old.get("preemptions") or 0) and wl is not None:
        evicted = condition(wl, "Evicted") or {}
        message = f"Kueue evicted the Job ({evicted.get('reason') or 'Preempted'}: {evicted.get('message') or ''})"
        plan.events.append(("Warning", "Preempted", message[:1024]))

    started = parse_time(ledger.started_at) or parse_time(old.get("startTime"))
    active = policy.get("activeDeadlineSeconds")
    if active and started and now - started > active:
        failure = Failure("DeadlineExceeded", "ActiveDeadlineExceeded", f"the job ran longer than {active}s")
        return _fail(plan, old, attempt, failure, current, now, delete_current=True)

    if spec.get("suspend") or job_suspended:
        status["pods"] = counts
        if spec.get("suspend"):
            _set_conditions(plan, old, "Suspended", "Suspended", "spec.suspend is true", None, now)
            if queue and wl is None:
                plan.requeue_after = 1.0  # Kueue makes the Workload in a moment: deactivate it then
        elif queue:
            reason, why = _queued(queue, wl, status)
            _set_conditions(plan, old, "Pending", reason, why, None, now)
            # Kueue's verdict changes the Workload, not the Job, so no event brings it here: look again, soon
            # while Kueue has not said anything yet, then now and then while the job waits.
            plan.requeue_after = QUEUE_POLL_SECONDS if condition(wl or {}, "QuotaReserved") else 2.0
        else:
            _set_conditions(plan, old, "Pending", "JobSuspended", "the Job is suspended", None, now)
        return plan

    ran_all = counts["running"] + counts["succeeded"] >= nodes and len(mine) >= nodes
    if ran_all:
        if not status.get("startTime"):
            status["startTime"] = rfc3339(now)
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
        _set_conditions(plan, old, "Running", "Running", message, None, now)
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
    _set_conditions(plan, old, phase, why[0], why[1], None, now)
    return plan


def _queued(queue: str, wl: Mapping[str, Any] | None, status: Obj) -> tuple[str, str]:
    """Reason and message of a Job Kueue holds: evicted (status.failure says so: a preemption, no budget), or
    waiting for quota, with Kueue's own words on why when the Workload has them."""
    evicted = condition(wl or {}, "Evicted") or {}
    if evicted.get("status") == "True":
        message = (
            f"Kueue evicted the Job ({evicted.get('reason')}: {evicted.get('message') or ''}); it resumes from its "
            f"latest checkpoint when queue {queue} admits it again"
        )
        when = parse_time(evicted.get("lastTransitionTime"))
        why = "Preempted" if evicted.get("reason") == "Preempted" else "EvictedByKueue"
        failure = Failure("Preemption", why, message)
        status["failure"] = failure.to_status(when if when is not None else 0.0)
        return failure.reason, message
    reserved = condition(wl or {}, "QuotaReserved") or {}
    detail = f": {reserved['message']}" if reserved.get("status") == "False" and reserved.get("message") else ""
    return "WaitingForQuota", f"waiting for Kueue to admit the Job from queue {queue}{detail}"


def _service(tj: Mapping[str, Any]) -> list[Obj]:
    """The headless Service gives ranks each other's DNS names; one node needs none (MASTER_ADDR is localhost)."""
    return [b.headless_service(tj)] if int((tj.get("spec") or {}).get("nodes") or 1) > 1 else []


def _reason(status: Mapping[str, Any]) -> str | None:
    for c in status.get("conditions") or []:
        if c.get("type") == "Ready":
            return c.get("reason")
    return None


def _suspend_patch(value: bool) -> Obj:
    return {"spec": {"suspend": value}}


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
        gpu_seconds=ledger.gpu_seconds + pod_gpu_seconds(pods, gpus, now, b.CONTAINER),
        started_at=started,
        resume_from=resume,
        previous=status_failure,
    )
    new_attempt = attempt + 1
    attempt_job = build_attempt(tj, new_attempt, nxt, config)
    if resume:
        attempt_job["metadata"]["annotations"][labels.RESUME_FROM] = resume
    plan.create = [*_service(tj), attempt_job]
    if current is not None:
        plan.delete_once(job(current["metadata"]["name"]))
    plan.status.update(
        attempt=new_attempt,
        jobName=attempt_job["metadata"]["name"],
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
    _set_conditions(plan, old, "Restarting", failure.reason, message, None, now)
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
    plan.status.update(phase="Failed", completionTime=rfc3339(now), failure=failure.to_status(now))
    if delete_current and current is not None:
        # Running pods hold GPUs: stop them now; the Job's record is in status.
        plan.delete_once(job(current["metadata"]["name"]))
    message = f"attempt {attempt} failed ({failure.cls}): {failure.message}"
    plan.events.append(("Warning", "Failed", message[:1024]))
    _set_conditions(plan, old, "Failed", failure.reason, message, None, now)
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
        plan.delete = [job(j["metadata"]["name"]) for j in jobs if not deleting(j)]
        plan.delete.append(service(b.service_name(tj["metadata"]["name"])))
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


def oom_hint(spec: Mapping[str, Any]) -> str:
    memory = (spec.get("resources") or {}).get("memory") or "unset"
    return (
        f"raise resources.memory (now {memory}) or lower hyperparameters.batchSize "
        "(gradientAccumulationSteps keeps the global batch)"
    )


def _set_conditions(
    plan: Plan,
    old: Mapping[str, Any],
    phase: str,
    reason: str,
    message: str,
    artifact: Mapping[str, Any] | None,
    now: float,
) -> None:
    """Phase and the conditions that say the same thing in kstatus' shape: Ready (succeeded), Reconciling
    (still converging), Stalled (failed for good), one per phase, and ModelReady for downstream kinds."""
    plan.status["phase"] = phase
    message = message[:4096]
    failed = phase == "Failed"
    # Suspended as the spec asks is a state reached, not one converging: GitOps tools (kstatus) read it as Current.
    # That takes Ready=True too: with neither Reconciling nor Stalled True, kstatus falls back on Ready, and reads
    # Ready=False as InProgress (a sync would wait for a job that waits for its spec). Succeeded says whether it ran.
    suspended = phase == "Suspended"
    settled = phase in TERMINAL or suspended
    model_reason = "ModelPublished" if artifact else ("NoArtifact" if phase == "Succeeded" else phase)
    model_message = (
        f"{artifact['uri']} ({artifact.get('digest', '')})"
        if artifact
        else ("the trainer reported no artifact (no output location)" if phase == "Succeeded" else message)
    )
    own = {}
    if settled:
        own["Reconciling"] = (phase, message)
    if not failed:
        own["Stalled"] = ("NotStalled", message)
    wanted = [
        *kstatus(
            reason, message, ready=phase == "Succeeded" or suspended, reconciling=not settled, stalled=failed, own=own
        ),
        *(Condition(t, flag(phase == t), reason, message) for t in ("Running", "Suspended", "Succeeded", "Failed")),
        Condition("ModelReady", flag(bool(artifact)), model_reason, model_message),
    ]
    plan.status["conditions"] = merge_conditions(
        old.get("conditions"), wanted, plan.status.get("observedGeneration"), now
    )
