"""The ModelDeployment state machine: source -> revisions (stable, candidate) -> canary steps with analysis ->
promotion or rollback. Pure.

``decide(md, source, deployments, pods, now, config, analysis, monitoring)`` returns a Plan. The rollout state
lives on the revisions' Deployments (role, canary step, when the step's replicas were all ready), so every pass
recomputes the same decision from what exists; the status is a report. ``analysis_due`` and ``monitoring_due`` tell
the handler when to read the metrics it passes back in as ``analysis`` (a canary step) and ``monitoring`` (drift of
the serving revision from its reference profile).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kiln_artifacts.contract import ExitCode, read_termination_message
from kiln_artifacts.profile import js_distance
from kiln_operator import labels
from kiln_operator.analysis import PodDrift, Sample
from kiln_operator.builders import modeldeployment as b
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.status import Condition, find, flag, kstatus, merge_conditions, parse_time, rfc3339

Obj = dict[str, Any]
HISTORY = 20
REJECTED = 20
# A crash-looping candidate, or one whose model does not load, is rolled back at once; a slow image pull or an
# unschedulable pod only when the progress deadline passes.
FATAL = {"CrashLoopBackOff", "ModelLoadFailed", "ArtifactUntrusted", "PodFailed"}
WAITING = {
    "CrashLoopBackOff",
    "ImagePullBackOff",
    "ErrImagePull",
    "CreateContainerConfigError",
    "CreateContainerError",
    "InvalidImageName",
    "RunContainerError",
}
# The server's exit codes for a bad flag, artifact, model contract or session: the model cannot load.
LOAD_FAILURES = {ExitCode.USER_ERROR, ExitCode.ARTIFACT, ExitCode.CONTRACT, ExitCode.RUNTIME}
# Pod problems that no restart, node or wait can fix: the server refused or could not load these exact bytes with
# this spec, so only a new artifact or a spec change helps. When the only revision has one and is not ready, the
# ModelDeployment is Stalled (kstatus: Failed), not Reconciling: GitOps tools report it instead of waiting for their
# timeout. Image pulls, scheduling and other crash loops stay Reconciling (they may clear on their own).
PERMANENT = {"ModelLoadFailed", "ArtifactUntrusted"}


@dataclass(frozen=True)
class Config:
    image_default: str | None = None
    artifact_env: tuple[Obj, ...] = ()


@dataclass(frozen=True)
class Analysis:
    """What the handler read for the candidate (and the stable revision) over ``window`` seconds."""

    revision: int
    step: int
    window: int
    candidate: Sample | None = None
    stable: Sample | None = None
    error: str | None = None  # metrics could not be read


@dataclass(frozen=True)
class Monitoring:
    """The drift gauges the handler read from the serving revision's servers (one PodDrift per pod that answered)."""

    revision: int
    pods: tuple[PodDrift, ...] = ()
    error: str | None = None  # metrics could not be read


@dataclass(frozen=True)
class Revision:
    name: str
    key: str
    number: int
    uri: str
    digest: str | None
    role: str
    step: int
    step_started: float | None
    entered: float
    replicas: int
    ready: int
    annotations: Mapping[str, str] = field(default_factory=dict)

    @property
    def short(self) -> str:
        return (self.digest or "")[7:19] or self.key

    def report(self) -> Obj:
        out: Obj = {"revision": self.number, "uri": self.uri, "deployment": self.name, "replicas": self.replicas}
        out["readyReplicas"] = self.ready
        if self.digest:
            out.update(digest=self.digest, shortDigest=self.short)
        return out


def _int(value: Any, default: int = 0) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return default


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def revisions(deployments: Sequence[Mapping[str, Any]]) -> list[Revision]:
    """The live revisions (not being deleted), oldest first."""
    out = []
    for d in deployments:
        meta = d["metadata"]
        if meta.get("deletionTimestamp"):
            continue
        notes, lbls = meta.get("annotations") or {}, meta.get("labels") or {}
        out.append(
            Revision(
                name=meta["name"],
                key=lbls.get(labels.REVISION, ""),
                number=_int(notes.get(labels.REVISION_NUMBER)),
                uri=notes.get(labels.ARTIFACT_URI, ""),
                digest=notes.get(labels.ARTIFACT_DIGEST),
                role=notes.get(labels.ROLE, ""),
                step=_int(notes.get(labels.CANARY_STEP)),
                step_started=_float(notes.get(labels.STEP_STARTED)),
                entered=_float(notes.get(labels.CREATED)) or 0.0,
                replicas=_int((d.get("spec") or {}).get("replicas")),
                ready=_int((d.get("status") or {}).get("readyReplicas")),
                annotations=dict(notes),
            )
        )
    return sorted(out, key=lambda r: r.number)


def resolve_source(
    md: Mapping[str, Any], source: Mapping[str, Any] | None, serving: Revision | None
) -> tuple[Obj | None, str, str]:
    """(artifact {uri, digest} to serve or None, condition reason, message)."""
    src = (md.get("spec") or {}).get("source") or {}
    pin = src.get("digest")
    if src.get("uri"):
        found: Obj = {"uri": src["uri"], "digest": pin}
        return found, "SourceReady", f"{found['uri']} ({pin or 'digest not pinned'})"
    kind, ref = (
        ("ModelCompression", src["modelCompressionRef"]["name"])
        if src.get("modelCompressionRef")
        else ("TrainingJob", (src.get("trainingJobRef") or {}).get("name"))
    )
    if pin and serving is not None and serving.digest == pin:
        return {"uri": serving.uri, "digest": pin}, "SourceReady", f"pinned to {pin}"
    if source is None:
        return None, "SourceNotFound", f"{kind} {ref} does not exist (yet)"
    status = source.get("status") or {}
    if kind == "ModelCompression":
        artifact = status.get("promoted") or {}
        waiting = f"waiting for ModelCompression {ref} to promote an artifact (phase {status.get('phase', 'unknown')})"
    else:
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "ModelReady"), {})
        artifact = (status.get("artifact") or {}) if ready.get("status") == "True" else {}
        waiting = f"waiting for TrainingJob {ref}'s model (phase {status.get('phase', 'unknown')})"
    if not artifact.get("uri"):
        return None, "SourceNotReady", waiting
    found = {"uri": artifact["uri"], "digest": artifact.get("digest")}
    if pin and found["digest"] != pin:
        return None, "SourceDigestMismatch", f"{kind} {ref} promotes {found['digest']}, not the pinned {pin}"
    return found, "SourceReady", f"{kind} {ref}: {found['uri']} ({found.get('digest') or 'digest unknown'})"


def pod_problem(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) when a serving pod cannot serve: crash-looping, model not loading, image not pulling."""
    name, st = pod["metadata"]["name"], pod.get("status") or {}
    if st.get("phase") == "Failed":
        return "PodFailed", f"pod {name} failed: {st.get('reason') or ''} {st.get('message') or ''}".strip()
    for cs in st.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") not in WAITING:
            continue
        last = (cs.get("lastState") or {}).get("terminated") or {}
        # The server's JSON summary, or (FallbackToLogsOnError) its log's last lines.
        text = last.get("message") or ""
        said = str((read_termination_message(text) or {}).get("message") or text).strip()[-512:]
        if waiting["reason"] == "CrashLoopBackOff" and last.get("exitCode") == ExitCode.UNTRUSTED:
            return "ArtifactUntrusted", f"pod {name}: the server refused the artifact: {said or 'no message'}"
        if waiting["reason"] == "CrashLoopBackOff" and last.get("exitCode") in LOAD_FAILURES:
            return "ModelLoadFailed", f"pod {name}: the server exited {last['exitCode']}: {said or 'no message'}"
        detail = f"; last exit {last.get('exitCode')}: {said}" if last else ""
        return waiting["reason"], f"pod {name}: {waiting['reason']}: {waiting.get('message') or ''}{detail}"
    return None


def _newest_template(pods: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """The pods of a revision's newest pod template (``pod-template-hash``, set by its Deployment's ReplicaSets).
    While a spec change rolls a revision's pods, the old template's pods stay until the new ones are ready
    (maxUnavailable 0): their failures say nothing about whether the change fixed them."""
    if not pods:
        return []
    newest = max(pods, key=lambda pod: str(pod["metadata"].get("creationTimestamp") or ""))
    template = (newest["metadata"].get("labels") or {}).get("pod-template-hash")
    return [pod for pod in pods if (pod["metadata"].get("labels") or {}).get("pod-template-hash") == template]


def _unschedulable(pods: Sequence[Mapping[str, Any]]) -> str | None:
    for pod in pods:
        for c in (pod.get("status") or {}).get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                return f"pod {pod['metadata']['name']}: {c.get('message') or 'unschedulable'}"
    return None


def _rejected(md: Mapping[str, Any], digest: str | None) -> Obj | None:
    if not digest:
        return None
    spec, meta = md.get("spec") or {}, md["metadata"]
    for entry in (md.get("status") or {}).get("rejected") or []:
        if entry.get("digest") != digest:
            continue
        retry = (spec.get("rollout") or {}).get("retryDigest") == digest
        if retry and _int(meta.get("generation")) > _int(entry.get("generation")):
            return None  # a person asked for another try, after the rollback
        return entry
    return None


def step_replicas(n: int, weight: int) -> tuple[int, int]:
    """(candidate, stable) replicas for a canary weight. Without a Gateway the split follows the replica ratio, and
    the candidate's pods come on top of the stable revision's: the stable revision keeps all n replicas (its full
    capacity, should the candidate fail) until the last step, 100 %, where it makes way as the candidate's pods
    become ready."""
    if weight >= 100:
        return n, 0
    return max(1, round(n * weight / (100 - weight))), n


def verdict(analysis: Mapping[str, Any], a: Analysis) -> tuple[str, str]:
    """Pass, Fail or Wait for one analysis (Unavailable when the metrics could not be read)."""
    if a.error or a.candidate is None:
        return "Unavailable", a.error or "no metrics for the candidate"
    c = a.candidate
    max_rate = float(analysis.get("maxErrorRate", 0.01))
    min_requests = int(analysis.get("minRequests", 100))
    p95_limit = analysis.get("maxP95LatencyMs")
    stable = ""
    if a.stable is not None:
        stable = (
            f"; stable: {a.stable.requests:.0f} requests, error rate {a.stable.error_rate:.4f}, "
            f"p95 {_ms(a.stable.p95_ms)}"
        )
    figures = f"candidate: {c.requests:.0f} requests, error rate {c.error_rate:.4f}, p95 {_ms(c.p95_ms)}{stable}"
    # Fail early when the errors already exceed the budget of the minimum request count.
    if c.errors > max_rate * max(c.requests, min_requests) and c.errors > 0:
        return "Fail", f"error rate {c.error_rate:.4f} > maxErrorRate {max_rate} ({figures})"
    if c.requests < min_requests:
        return "Wait", f"{c.requests:.0f} of minRequests {min_requests} requests so far ({figures})"
    if p95_limit is not None and c.p95_ms is not None and c.p95_ms > float(p95_limit):
        return "Fail", f"p95 latency {c.p95_ms:.1f} ms > maxP95LatencyMs {p95_limit} ({figures})"
    drift_limit = analysis.get("maxPredictionDrift")
    if drift_limit is not None:
        drift = prediction_drift(a)
        if drift is None:
            return "Wait", f"no answers by class from both revisions yet for maxPredictionDrift ({figures})"
        if drift > float(drift_limit):
            return "Fail", (
                f"prediction drift {drift:.3f} from the stable revision > maxPredictionDrift {drift_limit} ({figures})"
            )
        figures += f"; prediction drift {drift:.3f}"
    return "Pass", figures


def prediction_drift(a: Analysis) -> float | None:
    """Jensen-Shannon distance between the candidate's and the stable revision's answers by class in the window;
    None unless both answered."""
    if a.candidate is None or a.stable is None or not a.candidate.predictions or not a.stable.predictions:
        return None
    c, s = a.candidate.predictions, a.stable.predictions
    classes = sorted(set(c) | set(s))
    if sum(c.values()) <= 0 or sum(s.values()) <= 0:
        return None
    return js_distance([max(c.get(k, 0.0), 0.0) for k in classes], [max(s.get(k, 0.0), 0.0) for k in classes])


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1f} ms"


def _sample(s: Sample | None) -> Obj | None:
    if s is None:
        return None
    out: Obj = {"requests": round(s.requests, 2), "errorRate": round(s.error_rate, 6)}
    if s.p95_ms is not None:
        out["p95LatencyMs"] = round(s.p95_ms, 3)
    return out


def analysis_due(md: Mapping[str, Any], deployments: Sequence[Mapping[str, Any]], now: float) -> Analysis | None:
    """The analysis to run now (with no figures yet), or None: a canary step whose replicas are all ready gets one
    every intervalSeconds, over the window since the step's replicas were ready."""
    spec = md.get("spec") or {}
    rollout = spec.get("rollout") or {}
    if rollout.get("strategy") != "Canary":
        return None
    candidate = next((r for r in reversed(revisions(deployments)) if r.role == "candidate"), None)
    if candidate is None or candidate.step_started is None:
        return None
    interval = int((rollout.get("analysis") or {}).get("intervalSeconds", 60))
    last = (md.get("status") or {}).get("analysis") or {}
    since = candidate.step_started
    if last.get("revision") == candidate.number and last.get("step") == candidate.step:
        since = max(since, parse_time(last.get("time")) or since)
    if now - since < interval:
        return None
    return Analysis(revision=candidate.number, step=candidate.step, window=int(now - candidate.step_started))


@dataclass
class _Pass:
    """One pass's working state: what it decided so far."""

    md: Mapping[str, Any]
    now: float
    config: Config
    plan: Plan
    conds: list[Condition] = field(default_factory=list)
    history: list[Obj] = field(default_factory=list)
    route_weight: int = 0  # the candidate's weight on the HTTPRoute, when there is a Gateway
    serving: tuple[Revision | None, Revision | None] = (None, None)  # (stable, candidate) the status reports

    @property
    def gateway(self) -> bool:
        return bool(((self.md.get("spec") or {}).get("service") or {}).get("gateway"))

    def deployment(self, art: Mapping[str, Any], key: str, number: int, role: str, replicas: int, **notes: str) -> Obj:
        return b.deployment(
            self.md,
            key,
            uri=art["uri"],
            digest=art.get("digest"),
            number=number,
            role=role,
            replicas=replicas,
            created=float(notes.pop("entered", self.now)),
            image_default=self.config.image_default,
            artifact_env=self.config.artifact_env,
            annotations=notes,
        )

    def keep(self, rev: Revision, role: str, replicas: int, entered: float | None = None, **notes: str) -> None:
        """Apply ``rev`` as desired, if that differs from what exists (replicas, role, step, pod template)."""
        art = {"uri": rev.uri, "digest": rev.digest}
        when = str(int(rev.entered if entered is None else entered))
        want = self.deployment(art, rev.key, rev.number, role, replicas, entered=when, **notes)
        have = rev.annotations
        same = (
            rev.replicas == replicas
            and all(have.get(k) == v for k, v in want["metadata"]["annotations"].items())
            and not (set(have) & {labels.CANARY_STEP, labels.STEP_STARTED}) - set(want["metadata"]["annotations"])
        )
        if not same:
            self.plan.apply.append(want)

    def delete(self, rev: Revision) -> None:
        self.plan.delete.append(("apps/v1", "Deployment", rev.name))
        if self.gateway:
            self.plan.delete.append(("v1", "Service", b.revision_service_name(self.md["metadata"]["name"], rev.key)))

    def record(self, rev: Revision, outcome: str, reason: str) -> None:
        self.history.append(
            {
                "revision": rev.number,
                "digest": rev.digest or "",
                "outcome": outcome,
                "reason": reason[:1024],
                "startTime": rfc3339(rev.entered) if rev.entered else rfc3339(self.now),
                "endTime": rfc3339(self.now),
            }
        )


def decide(
    md: Mapping[str, Any],
    source: Mapping[str, Any] | None,
    deployments: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    now: float,
    config: Config = Config(),
    analysis: Analysis | None = None,
    monitoring: Monitoring | None = None,
) -> Plan:
    """One reconcile pass of a ModelDeployment, from its source's promoted artifact (``source``: the
    ModelCompression or TrainingJob it follows, or None), the revisions' ``deployments`` and ``pods``, and the
    ``analysis`` of the canary step the handler measured (``analysis_due`` says when). Decides which revisions
    serve with how many replicas (a new artifact starts a candidate; a canary step advances when its replicas are
    ready, its pause or approval has passed and its analysis says Pass; the candidate is promoted after the last
    step, or rolled back on a fatal pod problem, the progress deadline or a failed analysis), the traffic children
    (HTTPRoute and per-revision Services with a Gateway), the status that reports all of it, and, from the
    ``monitoring`` read (``monitoring_due`` says when), whether the serving revision drifts from its reference."""
    old: Obj = dict(md.get("status") or {})
    status: Obj = {k: v for k, v in old.items() if k != "conditions"}
    status["observedGeneration"] = md["metadata"].get("generation")
    p = _Pass(md, now, config, Plan(status=status))
    _revisions(p, old, source, deployments, pods, analysis)
    _traffic(p)
    _monitor(p, old, monitoring)
    return p.plan


def _revisions(
    p: _Pass,
    old: Obj,
    source: Mapping[str, Any] | None,
    deployments: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    analysis: Analysis | None,
) -> Plan:
    """The revisions to run and the status; every branch ends in ``_report``."""
    md, now, status = p.md, p.now, p.plan.status
    meta, spec = md["metadata"], md.get("spec") or {}
    n = b.replicas(md)
    rollout = spec.get("rollout") or {}
    canary = rollout.get("strategy") == "Canary" and n > 0  # scaled to zero: no traffic to analyse

    revs = revisions(deployments)
    stables = [r for r in revs if r.role == "stable"]
    candidates = [r for r in revs if r.role == "candidate"]
    stable = stables[-1] if stables else None
    candidate = candidates[-1] if candidates else None
    # Leftovers of a pass cut short (a promotion's old stable, an older candidate): the newest of each role wins.
    for rev in [*stables[:-1], *candidates[:-1]]:
        p.delete(rev)
    seen = [_int((old.get(k) or {}).get("revision")) for k in ("current", "candidate")]
    seen += [r.number for r in revs] + [_int(h.get("revision")) for h in old.get("history") or []]
    next_number = 1 + max(seen)
    by_key: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        if not pod["metadata"].get("deletionTimestamp"):
            by_key.setdefault((pod["metadata"].get("labels") or {}).get(labels.REVISION, ""), []).append(pod)

    def problems(rev: Revision | None) -> list[tuple[str, str]]:
        return [x for x in (pod_problem(pod) for pod in by_key.get(rev.key, []) if rev) if x]

    found, reason, message = resolve_source(md, source, stable)
    p.conds.append(Condition("SourceReady", "True" if found else "False", reason, message))
    target_key = b.revision_key(found["uri"], found.get("digest")) if found else None
    rejected = _rejected(md, found.get("digest")) if found else None

    if stable is None:
        if found is None:
            return _report(p, old, None, None, by_key, n, stalled=reason == "SourceDigestMismatch")
        if candidate is not None and candidate.key == target_key:
            p.keep(candidate, "stable", n)  # the stable revision was deleted under a rollout: the candidate serves
            stable, candidate = candidate, None
        else:
            if candidate is not None:
                p.delete(candidate)
                candidate = None
            p.plan.apply.append(p.deployment(found, target_key, next_number, "stable", n))
            p.plan.events.append(("Normal", "Deploying", f"revision {next_number}: {found['uri']}"))
            return _report(p, old, None, None, by_key, n)
    assert stable is not None

    rollback: tuple[str, str] | None = None
    if found is None or target_key == stable.key or rejected is not None:
        # Nothing new to roll out: the stable revision serves all replicas; a candidate left over goes.
        if candidate is not None:
            p.delete(candidate)
            p.record(candidate, "Superseded", f"the source serves revision {stable.number} again")
            candidate = None
        p.keep(stable, "stable", n)
        rolled_back = None
        if rejected is not None and target_key != stable.key:
            why = str(rejected.get("reason") or "")
            p.conds.append(
                Condition(
                    "RolledBack",
                    "True",
                    why.split(":", 1)[0] or "RolledBack",
                    f"{found and found.get('digest')} was rolled back and is not retried until "
                    f"spec.rollout.retryDigest names it: {why}",
                )
            )
            rolled_back = _not_retried(str(found and found.get("digest")), why)
        return _report(p, old, stable, None, by_key, n, rolled_back=rolled_back)

    assert found is not None
    assert target_key is not None
    if candidate is not None and candidate.key != target_key:
        p.delete(candidate)
        p.record(candidate, "Superseded", f"superseded by {found.get('digest') or found['uri']}")
        p.plan.events.append(("Normal", "Superseded", f"revision {candidate.number} superseded by a newer artifact"))
        candidate = None
    if candidate is None:
        steps = rollout.get("steps") or [{"weight": 100}]
        c, _s = step_replicas(n, int(steps[0]["weight"])) if canary else (n, n)
        p.plan.apply.append(p.deployment(found, target_key, next_number, "candidate", c, **{labels.CANARY_STEP: "0"}))
        p.keep(stable, "stable", n)
        how = f"canary step 0 ({steps[0]['weight']}%)" if canary else "rolling update"
        p.plan.events.append(("Normal", "RolloutStarted", f"revision {next_number} ({found['uri']}): {how}"))
        return _report(p, old, stable, None, by_key, n, starting=f"revision {next_number}: {how}")

    # A rollout in progress.
    fatal = [x for x in problems(candidate) if x[0] in FATAL]
    deadline = int(rollout.get("progressDeadlineSeconds", 600))
    steps = (rollout.get("steps") if canary else None) or [{"weight": 100}]
    step = min(candidate.step, len(steps) - 1)
    weight = int(steps[step]["weight"]) if canary else 100
    want_c, want_s = step_replicas(n, weight) if canary else (n, 0)
    if fatal:
        rollback = (fatal[0][0], f"revision {candidate.number} cannot serve: {fatal[0][1]}")
    elif candidate.ready < want_c and now - candidate.entered > deadline:
        rollback = (
            "ProgressDeadlineExceeded",
            f"revision {candidate.number}: {candidate.ready}/{want_c} replicas ready after {deadline}s",
        )
    a_verdict: tuple[str, str] | None = None
    if analysis is not None and analysis.revision == candidate.number and analysis.step == step:
        a_verdict = verdict(rollout.get("analysis") or {}, analysis)
        status["analysis"] = {
            k: v
            for k, v in {
                "time": rfc3339(now),
                "revision": analysis.revision,
                "step": analysis.step,
                "windowSeconds": analysis.window,
                "candidate": _sample(analysis.candidate),
                "stable": _sample(analysis.stable),
                "verdict": a_verdict[0],
                "message": a_verdict[1][:1024],
            }.items()
            if v is not None
        }
        drift = prediction_drift(analysis)
        if drift is not None and "candidate" in status["analysis"]:
            status["analysis"]["candidate"]["predictionDrift"] = round(drift, 6)
        if analysis.stable is not None and analysis.stable.p95_ms is not None:
            status["p95LatencyMs"] = round(analysis.stable.p95_ms, 3)
        if a_verdict[0] == "Fail":
            rollback = ("AnalysisFailed", f"revision {candidate.number} step {step} ({weight}%): {a_verdict[1]}")
    if rollback is not None:
        return _rollback(p, old, stable, candidate, n, by_key, *rollback)

    # Surge first: the stable revision shrinks only as far as the candidate's ready pods make up for.
    stable_want = min(n, max(want_s, n - candidate.ready))
    step_ready = candidate.ready >= want_c
    notes = {labels.CANARY_STEP: str(step)}
    if candidate.step_started is not None:
        notes[labels.STEP_STARTED] = str(int(candidate.step_started))
    elif step_ready and canary:
        notes[labels.STEP_STARTED] = str(int(now))
    wake: list[float] = [candidate.entered + deadline] if not step_ready else []
    passed, approval = False, None
    # With a Gateway the weight is exact: the step's weight once its pods are ready, the previous one until then.
    p.route_weight = weight if step_ready and canary else (int(steps[step - 1]["weight"]) if canary and step else 0)
    if step_ready and not canary:
        passed = True
    elif step_ready and candidate.step_started is not None:
        pause = steps[step].get("pauseSeconds")
        short = candidate.short
        approved = (md["metadata"].get("annotations") or {}).get(labels.APPROVE) == f"{short}/{step}"
        held = now - candidate.step_started >= pause if pause is not None else approved
        last = status.get("analysis") or {}
        fresh = last.get("revision") == candidate.number and last.get("step") == step
        passed = held and fresh and last.get("verdict") == "Pass"
        interval = int((rollout.get("analysis") or {}).get("intervalSeconds", 60))
        start = parse_time(last.get("time")) if fresh else None
        wake.append(max(start or candidate.step_started, candidate.step_started) + interval)
        if pause is not None:
            wake.append(candidate.step_started + pause)
        if pause is None and not approved and fresh and last.get("verdict") == "Pass":
            approval = f"kubectl annotate md/{meta['name']} --overwrite {labels.APPROVE}={short}/{step}"
    if passed and step + 1 < len(steps):
        nxt = step + 1
        c2, _ = step_replicas(n, int(steps[nxt]["weight"]))
        p.keep(candidate, "candidate", c2, entered=now, **{labels.CANARY_STEP: str(nxt)})
        p.keep(stable, "stable", min(n, max(step_replicas(n, int(steps[nxt]["weight"]))[1], n - candidate.ready)))
        p.plan.events.append(
            ("Normal", "CanaryStep", f"revision {candidate.number}: step {nxt} ({steps[nxt]['weight']}%)")
        )
        p.plan.requeue_after = 1.0
        return _report(p, old, stable, candidate, by_key, n)
    if passed:
        # Promotion: the candidate (all n replicas ready) becomes stable, then the old revision goes.
        p.keep(candidate, "stable", n)
        p.delete(stable)
        msg = f"revision {candidate.number} ({candidate.digest or candidate.uri}) promoted"
        p.record(candidate, "Promoted", msg)
        p.record(stable, "Superseded", f"replaced by revision {candidate.number}")
        p.plan.events.append(("Normal", "Promoted", msg))
        p.conds.append(Condition("RolledBack", "False", "Promoted", msg))
        return _report(p, old, candidate, None, by_key, n, promoted=True)
    p.keep(candidate, "candidate", want_c, **notes)
    p.keep(stable, "stable", stable_want)
    if wake:
        p.plan.requeue_after = max(0.5, min(wake) - now)
    return _report(p, old, stable, candidate, by_key, n, approval=approval)


def _rollback(
    p: _Pass,
    old: Obj,
    stable: Revision,
    candidate: Revision,
    n: int,
    by_key: Mapping[str, list[Mapping[str, Any]]],
    reason: str,
    message: str,
) -> Plan:
    """The candidate goes at once, the stable revision takes all replicas again, and the digest is remembered."""
    p.delete(candidate)
    p.keep(stable, "stable", n)
    p.record(candidate, "RolledBack", f"{reason}: {message}")
    status = p.plan.status
    if candidate.digest:
        entry = {
            "digest": candidate.digest,
            "reason": f"{reason}: {message}"[:1024],
            "generation": p.md["metadata"].get("generation"),
            "time": rfc3339(p.now),
        }
        kept = [e for e in old.get("rejected") or [] if e.get("digest") != candidate.digest]
        status["rejected"] = [*kept, entry][-REJECTED:]
    p.conds.append(Condition("RolledBack", "True", reason, message))
    p.plan.events.append(("Warning", "RolledBack", message[:1024]))
    why = f"{reason}: {message}"
    return _report(p, old, stable, None, by_key, n, rolled_back=_not_retried(candidate.digest or candidate.uri, why))


def _not_retried(artifact: str, why: str) -> str:
    """The Stalled message of a rollback: what was rejected, why, and what moves the ModelDeployment on."""
    return (
        f"{artifact} was rolled back ({why}); the stable revision serves. A newer artifact rolls out; this one only "
        "when spec.rollout.retryDigest names it in a newer spec generation (or pin spec.source.digest to the digest "
        "that serves)"
    )


def _traffic(p: _Pass) -> None:
    """With a Gateway: a Service per revision in service, and the HTTPRoute's exact weights over them."""
    md, status = p.md, p.plan.status
    stable, candidate = p.serving
    if p.gateway and stable is not None:
        weights = [(stable.key, 100 - (p.route_weight if candidate else 0))]
        if candidate is not None:
            weights.append((candidate.key, p.route_weight))
        p.plan.apply += [b.revision_service(md, key) for key, _ in weights] + [b.http_route(md, weights)]
        status["route"] = b.base(md["metadata"]["name"])
        status["routeUrl"] = b.route_url(md)
    elif not p.gateway and status.pop("route", None):
        p.plan.delete.append(("gateway.networking.k8s.io/v1", "HTTPRoute", b.base(md["metadata"]["name"])))
    if status.get("routeUrl") is None:
        status.pop("routeUrl", None)


def _report(
    p: _Pass,
    old: Obj,
    stable: Revision | None,
    candidate: Revision | None,
    by_key: Mapping[str, list[Mapping[str, Any]]],
    n: int,
    *,
    stalled: bool = False,
    promoted: bool = False,
    approval: str | None = None,
    starting: str | None = None,
    rolled_back: str | None = None,
) -> Plan:
    """Status from what really runs: replicas and readiness of the revisions in service, problems of their pods.
    ``rolled_back`` says why the artifact the source asks for was rolled back (and is not retried), when it was."""
    status, md = p.plan.status, p.md
    serving = [r for r in (stable, candidate) if r is not None]
    pods = [pod for r in serving for pod in by_key.get(r.key, [])]
    status["replicas"] = sum(1 for pod in pods if (pod.get("status") or {}).get("phase") not in ("Failed", "Succeeded"))
    ready = sum(r.ready for r in serving)
    status["readyReplicas"] = ready
    status["selector"] = ",".join(f"{k}={v}" for k, v in b.selector(md["metadata"]["name"]).items())
    status["url"] = b.service_url(md)
    status["grpcAddress"] = b.grpc_address(md)
    for name, rev in (("current", stable), ("candidate", candidate)):
        if rev is not None:
            status[name] = rev.report()
        else:
            status.pop(name, None)
    if candidate is not None:
        steps = ((md.get("spec") or {}).get("rollout") or {}).get("steps")
        status["canaryStep"] = candidate.step if steps else 0
        both = candidate.ready + (stable.ready if stable else 0)
        status["canaryWeight"] = round(100 * candidate.ready / both) if both else 0
        if p.gateway:
            status["canaryWeight"] = p.route_weight
    else:
        status.pop("canaryStep", None)
        status["canaryWeight"] = 0
    if p.history:
        status["history"] = [*(old.get("history") or []), *p.history][-HISTORY:]
    p.serving = (stable, candidate)

    issues = [x for pod in pods if (x := pod_problem(pod))]
    if issues:
        p.conds.append(Condition("Degraded", "True", issues[0][0], "; ".join(m for _, m in issues[:3])[:4096]))
    else:
        p.conds.append(Condition("Degraded", "False", "AsExpected", "no serving pod is failing"))
    unschedulable = _unschedulable(pods)
    if stable is None:
        reason = next((c.reason for c in p.conds if c.type == "SourceReady" and c.status == "False"), "Deploying")
        msg = next((c.message for c in p.conds if c.type == "SourceReady" and c.status == "False"), "")
        msg = msg or "creating the first revision"
        is_ready, progressing = False, not stalled
    else:
        is_ready = ready >= n and (n == 0 or stable.ready > 0 or candidate is not None)
        if is_ready:
            reason, msg = "Ready", f"{ready}/{n} replicas ready, serving revision {stable.number}"
        else:
            reason = issues[0][0] if issues else ("Unschedulable" if unschedulable else "ReplicasNotReady")
            msg = f"{ready}/{n} replicas ready" + (f": {issues[0][1]}" if issues else "")
            if unschedulable and not issues:
                msg += f": {unschedulable}"
        progressing = candidate is not None or not is_ready or promoted or starting is not None
    # Stalled (kstatus: Failed) when only a new artifact or a spec change can help: the only revision cannot load
    # its model, or the artifact the source asks for was rolled back while the stable revision serves (Ready, but
    # not what the spec and its source ask for: a GitOps sync that brought the new artifact must not read healthy).
    stuck: tuple[str, str] | None = None
    if stable is not None and candidate is None and starting is None:
        if not is_ready and stable.annotations.get(labels.TEMPLATE_HASH) == b.template_hash(md, p.config.image_default):
            problems = (pod_problem(pod) for pod in _newest_template(by_key.get(stable.key, [])))
            stuck = next((x for x in problems if x and x[0] in PERMANENT), None)
        if stuck is None and rolled_back and not progressing:
            stuck = ("RolledBack", rolled_back)
    if stuck is not None:
        progressing = False
    if candidate is not None:
        canary = ((md.get("spec") or {}).get("rollout") or {}).get("strategy") == "Canary"
        what = f"canary step {candidate.step}, {status['canaryWeight']}% of ready pods" if canary else "rolling update"
        prog_reason, prog_msg = "RollingOut", f"revision {candidate.number} ({candidate.short}): {what}"
        if approval:
            prog_reason, prog_msg = "AwaitingApproval", f"{prog_msg}; approve with: {approval}"
        elif (status.get("analysis") or {}).get("revision") == candidate.number:
            prog_msg += f"; analysis: {status['analysis']['verdict']}: {status['analysis'].get('message', '')}"
    elif starting:
        prog_reason, prog_msg = "RollingOut", starting
    elif stuck is not None:
        prog_reason, prog_msg = stuck
    elif progressing:
        prog_reason, prog_msg = reason, msg
    else:
        prog_reason, prog_msg = "Complete", msg
    own = {"Reconciling": (prog_reason, prog_msg[:4096])}
    if stuck is not None:
        own["Stalled"] = (stuck[0], stuck[1][:4096])
    elif not stalled:
        own["Stalled"] = ("AsExpected", "")
    p.conds += [
        Condition("Progressing", flag(progressing), prog_reason, prog_msg[:4096]),
        *kstatus(reason, msg, ready=is_ready, reconciling=progressing, stalled=stalled or stuck is not None, own=own),
    ]
    if stalled or (stable is None and not progressing):
        status["phase"] = "Failed"
    elif issues:
        status["phase"] = "Degraded"
    elif candidate is not None or starting:
        status["phase"] = "Progressing"
    elif is_ready:
        status["phase"] = "Ready"
    else:
        status["phase"] = "Pending"
    status["conditions"] = merge_conditions(old.get("conditions"), p.conds, md["metadata"].get("generation"), p.now)
    return p.plan


# ------------------------------------------------------------------------------------------------ monitoring


def _monitoring_spec(md: Mapping[str, Any]) -> Mapping[str, Any]:
    return (md.get("spec") or {}).get("monitoring") or {}


def monitoring_due(md: Mapping[str, Any], deployments: Sequence[Mapping[str, Any]], now: float) -> int | None:
    """The serving revision whose drift to read now, or None: every intervalSeconds while monitoring is on and a
    stable revision has ready pods, and at once when the serving revision changed."""
    mon = _monitoring_spec(md)
    if not mon.get("enabled", True):
        return None
    stable = next((r for r in reversed(revisions(deployments)) if r.role == "stable"), None)
    if stable is None or stable.ready < 1:
        return None
    last = (md.get("status") or {}).get("monitoring") or {}
    when = parse_time(last.get("time"))
    if last.get("revision") == stable.number and when is not None and now - when < _interval(mon):
        return None
    return stable.number


def _interval(mon: Mapping[str, Any]) -> int:
    return int(mon.get("intervalSeconds", 60))


def drift_report(
    reading: Monitoring, mon: Mapping[str, Any], old: Mapping[str, Any], now: float
) -> tuple[Obj, Condition]:
    """status.monitoring and the Drifting condition from one reading. Pods with fewer than minSamples in their
    window have no say: a handful of requests is noise, not drift. A signal's score is the mean of the pods' that
    have, weighted by their samples (each pod sees a random share of the same traffic)."""
    min_samples = int(mon.get("minSamples", 200))
    default = float(mon.get("driftThreshold", 0.2))
    overrides = mon.get("thresholds") or {}
    out: Obj = {"time": rfc3339(now), "revision": reading.revision, "minSamples": min_samples}
    if reading.error:
        out["message"] = f"drift metrics unavailable: {reading.error}"[:1024]
        return out, Condition("Drifting", "Unknown", "MetricsUnavailable", out["message"])
    pods = reading.pods
    out["pods"] = len(pods)
    if not pods:
        out["message"] = "no serving pod reports drift figures yet"
        return out, Condition("Drifting", "Unknown", "NoData", out["message"])
    out["samples"] = int(sum(pd.samples for pd in pods))
    refs = sorted({pd.reference for pd in pods if pd.reference})
    if refs:
        out["reference"] = ",".join(refs)[:32]
    anomalies: dict[str, float] = {}
    for pd in pods:
        for kind, count in pd.anomalies.items():
            anomalies[kind] = anomalies.get(kind, 0.0) + count
    out["anomalies"] = {k: round(v) for k, v in sorted(anomalies.items())}
    judged = [pd for pd in pods if pd.samples >= min_samples and pd.scores]
    if not judged:
        most = max(int(pd.samples) for pd in pods)
        ref = f" (reference from {refs[0]})" if refs else ""
        out["message"] = f"no pod has minSamples {min_samples} samples in its window yet (most: {most}){ref}"
        return out, Condition("Drifting", "Unknown", "NotEnoughSamples", out["message"])
    before = {s.get("name"): s for s in ((old.get("monitoring") or {}).get("signals") or [])}
    signals, over = [], []
    for name in sorted({n for pd in judged for n in pd.scores}):
        weights = [(pd.scores[name], pd.samples) for pd in judged if name in pd.scores]
        score = sum(v * w for v, w in weights) / sum(w for _, w in weights)
        limit = float(
            overrides.get(name, next((pd.thresholds[name] for pd in judged if name in pd.thresholds), default))
        )
        entry: Obj = {"name": name, "score": round(score, 6), "threshold": limit, "drifting": score > limit}
        if score > limit:
            was = before.get(name) or {}
            entry["since"] = was.get("since") if was.get("drifting") and was.get("since") else rfc3339(now)
            over.append(f"{name} {score:.3f} > {limit:g}")
        signals.append(entry)
    out["signals"] = signals
    figures = f"{out['samples']} samples in {len(pods)} pods, reference: {out.get('reference', 'unknown')}"
    if over:
        return out, Condition("Drifting", "True", "DriftDetected", f"{', '.join(over)} ({figures})"[:4096])
    top = max(signals, key=lambda e: e["score"] - e["threshold"])
    msg = f"no signal over its threshold; nearest: {top['name']} {top['score']:.3f} <= {top['threshold']:g} ({figures})"
    return out, Condition("Drifting", "False", "WithinReference", msg[:4096])


def _monitor(p: _Pass, old: Obj, reading: Monitoring | None) -> None:
    """status.monitoring, the Drifting condition and an Event when it turns True or back to False. Drifting never
    changes Ready: a model that drifts still answers; people decide what to do about it (alerts, retraining)."""
    md, status = p.md, p.plan.status
    mon = _monitoring_spec(md)
    generation = md["metadata"].get("generation")
    if not mon.get("enabled", True):
        status.pop("monitoring", None)
        cond = Condition("Drifting", "Unknown", "MonitoringDisabled", "spec.monitoring.enabled is false")
        status["conditions"] = merge_conditions(status.get("conditions"), [cond], generation, p.now)
        return
    stable = p.serving[0]
    last = status.get("monitoring") or {}
    if reading is not None and stable is not None and reading.revision == stable.number:
        report, cond = drift_report(reading, mon, old, p.now)
        status["monitoring"] = report
        was = (find(old.get("conditions"), "Drifting") or {}).get("status")
        if cond.status == "True" and was != "True":
            p.plan.events.append(("Warning", "DriftDetected", f"revision {stable.number}: {cond.message}"[:1024]))
        elif cond.status == "False" and was == "True":
            p.plan.events.append(("Normal", "DriftResolved", f"revision {stable.number}: {cond.message}"[:1024]))
        status["conditions"] = merge_conditions(status.get("conditions"), [cond], generation, p.now)
        last = report
    elif stable is None or last.get("revision") != stable.number:
        status.pop("monitoring", None)
        msg = "no serving revision yet" if stable is None else f"revision {stable.number} not measured yet"
        cond = Condition("Drifting", "Unknown", "NoData", msg)
        status["conditions"] = merge_conditions(status.get("conditions"), [cond], generation, p.now)
        last = {}
    if stable is not None and stable.ready > 0:
        when = parse_time(last.get("time"))
        wake = (when + _interval(mon) - p.now) if when is not None else 1.0
        wake = max(wake, 1.0)
        p.plan.requeue_after = wake if p.plan.requeue_after is None else min(p.plan.requeue_after, wake)
