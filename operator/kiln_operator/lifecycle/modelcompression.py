"""The ModelCompression state machine: source -> compressor Job -> report -> gates -> promotion. Pure.

``decide(mc, source_tj, jobs, pods, now, config)`` returns a Plan; the handler resolves nothing itself except the
promotion (``plan.promote``: a registry write it records into status.promoted).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

from kiln_artifacts.contract import GATE_REASONS
from kiln_operator import labels
from kiln_operator.builders import modelcompression as b
from kiln_operator.lifecycle.plan import Plan, job
from kiln_operator.lifecycle.pods import attempt_of, classify, condition_true, deleting, report
from kiln_operator.status import Condition, kstatus, merge_conditions, rfc3339

Obj = dict[str, Any]
MAX_INFRA_ATTEMPTS = 3
HISTORY = 20
REPORT_KEYS = (
    "source",
    "candidate",
    "sizeRatio",
    "speedup",
    "p95Ms",
    "accuracyDrop",
    "agreement",
    "maxLogitDiff",
    "nodesByProvider",
    "cpuFallbackNodes",
    "recipe",
    "gates",
)


@dataclass(frozen=True)
class Config:
    image_default: str | None = None
    artifact_root: str | None = None
    registry_root: str | None = None
    artifact_env: tuple[Obj, ...] = ()


def output_uri(mc: Mapping[str, Any], key: str, config: Config) -> str | None:
    if not config.artifact_root:
        return None
    meta = mc["metadata"]
    return f"{config.artifact_root.rstrip('/')}/{meta['namespace']}/{meta['name']}-{str(meta.get('uid', ''))[:8]}/{key}"


def resolve_source(spec: Mapping[str, Any], tj: Mapping[str, Any] | None) -> tuple[Obj | None, str, str]:
    """(source {uri, digest} or None, condition reason, message)."""
    src = spec.get("source") or {}
    pin = src.get("digest")
    if src.get("uri"):
        found: Obj = {"uri": src["uri"], "digest": pin}
    else:
        ref = (src.get("trainingJobRef") or {}).get("name")
        if tj is None:
            return None, "SourceNotFound", f"TrainingJob {ref} does not exist (yet)"
        status = tj.get("status") or {}
        if status.get("phase") == "Failed":
            failure = status.get("failure") or {}
            return None, "SourceFailed", f"TrainingJob {ref} failed: {failure.get('message', 'no message')}"
        artifact = status.get("artifact") or {}
        ready = next((c for c in status.get("conditions") or [] if c.get("type") == "ModelReady"), {})
        if ready.get("status") != "True" or not artifact.get("uri"):
            return None, "SourceNotReady", f"waiting for TrainingJob {ref} (phase {status.get('phase', 'unknown')})"
        found = {"uri": artifact["uri"], "digest": artifact.get("digest")}
    if pin and found.get("digest") and found["digest"] != pin:
        return None, "SourceDigestMismatch", f"source digest {found['digest']} is not the pinned {pin}"
    return found, "SourceReady", f"{found['uri']} ({found.get('digest') or 'digest unknown'})"


def decide(
    mc: Mapping[str, Any],
    source_tj: Mapping[str, Any] | None,
    jobs: Sequence[Mapping[str, Any]],
    pods: Sequence[Mapping[str, Any]],
    now: float,
    config: Config = Config(),
) -> Plan:
    """One reconcile pass of a ModelCompression, from its source (``source_tj``: the TrainingJob it follows, or
    None for a URI source), its compressor ``jobs`` and their ``pods``. Decides whether the source is ready, which
    Job compresses the current source artifact (a new artifact means a new Job; an infrastructure failure or a
    preemption another attempt), and, from the compressor's report in the termination message, the gates'
    verdict and the promotion (``plan.promote``, which the handler records in the registry)."""
    meta, spec = mc["metadata"], mc.get("spec") or {}
    old: Obj = dict(mc.get("status") or {})
    status: Obj = {k: v for k, v in old.items() if k != "conditions"}
    status["observedGeneration"] = meta.get("generation")
    plan = Plan(status=status)
    conds: list[Condition] = []

    source, reason, message = resolve_source(spec, source_tj)
    if source is None:
        stalled = reason in ("SourceFailed", "SourceDigestMismatch")
        conds += [
            Condition("SourceReady", "False", reason, message),
            *_summary(reason, message, reconciling=not stalled, stalled=stalled),
        ]
        status["phase"] = "Failed" if stalled else "Pending"
        return _finish(plan, old, conds, now)
    conds.append(Condition("SourceReady", "True", "SourceReady", message))
    key = b.source_key(source["uri"], source.get("digest"))
    previous = old.get("sourceArtifact") or {}
    if previous and (previous.get("uri"), previous.get("digest")) != (source["uri"], source.get("digest")):
        # A new source artifact (the TrainingJob re-ran): remember the last run, compress again.
        entry = {
            "sourceDigest": previous.get("digest") or "",
            "candidateDigest": (old.get("candidate") or {}).get("digest") or "",
            "outcome": old.get("phase") or "",
            "time": rfc3339(now),
        }
        status["history"] = ([entry, *list(old.get("history") or [])])[:HISTORY]
        for stale in ("report", "candidate", "failure"):
            status.pop(stale, None)
        plan.events.append(("Normal", "NewSource", f"new source artifact {source['uri']}: compressing again"))
    status["sourceArtifact"] = {
        k: v
        for k, v in (
            ("uri", source["uri"]),
            ("digest", source.get("digest")),
            ("shortDigest", (source.get("digest") or "")[7:19] or None),
        )
        if v
    }
    mine = [j for j in jobs if j["metadata"].get("labels", {}).get(labels.SOURCE) == key]
    plan.delete = [job(j["metadata"]["name"]) for j in jobs if j not in mine and not deleting(j)]
    current = max(mine, key=attempt_of, default=None)
    out = output_uri(mc, key, config)
    if out is None:
        msg = "the operator has no artifact store (KILN_ARTIFACT_ROOT) to publish the candidate to"
        conds += _summary("NoArtifactStore", msg, stalled=True)
        status["phase"] = "Failed"
        return _finish(plan, old, conds, now)

    if current is None:
        if old.get("phase") in ("Promoted", "Rejected", "AwaitingApproval") and "candidate" in status:
            return _outcome(plan, old, conds, spec, meta, status, config, now)  # Jobs gone (TTL); the result stands
        plan.create = [
            b.compressor_job(mc, source, 1, out, image_default=config.image_default, artifact_env=config.artifact_env)
        ]
        return _running(plan, old, conds, status, "Compressing", f"compressing {source['uri']} (attempt 1)", now)

    attempt = attempt_of(current)
    cpods = [p for p in pods if p["metadata"].get("labels", {}).get(labels.ATTEMPT) == str(attempt)
             and p["metadata"].get("labels", {}).get(labels.SOURCE) == key]  # fmt: skip
    done = [p for p in cpods if (p.get("status") or {}).get("phase") == "Succeeded"]
    if condition_true(current, "Complete") or done:
        said = report(done[0], b.CONTAINER) if done else None
        if not said or not isinstance(said.get("artifact"), Mapping):
            status["failure"] = {
                "class": "Unknown",
                "reason": "NoReport",
                "message": "the compressor succeeded without a report in its termination message",
                "time": rfc3339(now),
            }
            msg = status["failure"]["message"]
            conds += [Condition("Compressed", "False", "NoReport", msg), *_summary("NoReport", msg, stalled=True)]
            status["phase"] = "Failed"
            return _finish(plan, old, conds, now)
        artifact = said["artifact"]
        digest = artifact.get("digest") or ""
        summary = said.get("report") if isinstance(said.get("report"), Mapping) else {}
        status["report"] = {k: summary[k] for k in REPORT_KEYS if k in summary}
        status["candidate"] = {
            "uri": artifact["uri"],
            "digest": digest,
            "shortDigest": digest[7:19],
            "format": "onnx",
            "metrics": {
                k: float(v)
                for k, v in (
                    ("accuracyDrop", summary.get("accuracyDrop")),
                    ("agreement", summary.get("agreement")),
                    ("sizeRatio", summary.get("sizeRatio")),
                    ("speedup", summary.get("speedup")),
                    ("p95Ms", summary.get("p95Ms")),
                )
                if isinstance(v, int | float)
            },
        }
        status["gatesPassed"] = bool(said.get("gatesPassed"))
        status.pop("failure", None)
        return _outcome(plan, old, conds, spec, meta, status, config, now)

    failed = condition_true(current, "Failed") or any((p.get("status") or {}).get("phase") == "Failed" for p in cpods)
    if failed:
        failure = classify(current, cpods, container=b.CONTAINER, oom_hint=_oom_hint(spec))
        said = next((r for p in cpods if (r := report(p, b.CONTAINER))), None) or {}
        # The compressor's own classes, which no exit code alone says: a step's check, a source refused unverified.
        cls = said["reason"] if said.get("reason") in ("ParityCheck", "Untrusted") else failure.cls
        retry = cls == "Preemption" or (cls == "Infrastructure" and attempt < MAX_INFRA_ATTEMPTS)
        if retry and attempt < 99:
            plan.create = [
                b.compressor_job(
                    mc, source, attempt + 1, out, image_default=config.image_default, artifact_env=config.artifact_env
                )
            ]
            plan.delete_once(job(current["metadata"]["name"]))
            msg = f"attempt {attempt} failed ({cls}: {failure.message}); retrying as attempt {attempt + 1}"
            plan.events.append(("Warning", "Retrying", msg[:1024]))
            return _running(plan, old, conds, status, cls, msg, now)
        known = cls if cls in ("UserError", "OutOfMemory", "Infrastructure", "ParityCheck", "Untrusted") else "Unknown"
        status["failure"] = replace(failure, cls=known, reason=said.get("reason") or failure.reason).to_status(now)
        if failure.pod and not failure.log_tail:
            plan.want_log_tail = failure.pod
        msg = f"compression failed ({cls}): {failure.message}"
        conds += [
            Condition("Compressed", "False", cls, msg),
            *_summary(cls, msg, stalled=True),
        ]
        status["phase"] = "Failed"
        if old.get("phase") != "Failed":
            plan.events.append(("Warning", "Failed", msg[:1024]))
        return _finish(plan, old, conds, now)
    return _running(plan, old, conds, status, "Compressing", f"compressing {source['uri']} (attempt {attempt})", now)


def _summary(
    reason: str, msg: str, *, ready: bool = False, reconciling: bool = False, stalled: bool = False
) -> list[Condition]:
    """Ready / Reconciling / Stalled, the kstatus trio every outcome sets, with one reason and message."""
    return kstatus(reason, msg, ready=ready, reconciling=reconciling, stalled=stalled)


def _running(plan: Plan, old: Obj, conds: list[Condition], status: Obj, reason: str, msg: str, now: float) -> Plan:
    conds += [
        Condition("Compressed", "False", reason, msg),
        *_summary(reason, msg, reconciling=True),
    ]
    status["phase"] = "Running"
    if old.get("phase") != "Running":
        plan.events.append(("Normal", "Compressing", msg[:1024]))
    return _finish(plan, old, conds, now)


def _oom_hint(spec: Mapping[str, Any]) -> str:
    return f"raise resources.memory (now {(spec.get('resources') or {}).get('memory') or 'unset'})"


def _gate_verdict(report: Mapping[str, Any]) -> tuple[str, str]:
    failed = [g for g in report.get("gates") or [] if not g.get("passed")]
    if not failed:
        return "GatesPassed", "every gate passed"
    first = failed[0]
    reason = GATE_REASONS.get(first.get("name", ""), "GateFailed")
    detail = "; ".join(f"{g.get('name')}: {g.get('message') or (g.get('value'), g.get('threshold'))}" for g in failed)
    return reason, detail


def _outcome(
    plan: Plan,
    old: Obj,
    conds: list[Condition],
    spec: Mapping[str, Any],
    meta: Mapping[str, Any],
    status: Obj,
    config: Config,
    now: float,
) -> Plan:
    candidate = status["candidate"]
    report = status.get("report") or {}
    conds.append(Condition("Compressed", "True", "Compressed", f"candidate {candidate['uri']} ({candidate['digest']})"))
    if not status.get("gatesPassed"):
        reason, detail = _gate_verdict(report)
        conds += [
            Condition("GatesPassed", "False", reason, detail),
            Condition("Promoted", "False", reason, "rejected by the gates"),
            *_summary(reason, detail, stalled=True),
        ]
        status["phase"] = "Rejected"
        if old.get("phase") != "Rejected":
            plan.events.append(("Warning", reason, f"candidate rejected: {detail}"[:1024]))
        return _finish(plan, old, conds, now)
    conds.append(Condition("GatesPassed", "True", "GatesPassed", "every gate passed"))
    promotion = spec.get("promotion") or {}
    name = promotion.get("modelName") or meta["name"]
    promoted = status.get("promoted") or {}
    if promoted.get("digest") == candidate["digest"]:
        msg = f"{name} version {promoted.get('version')} = {candidate['digest']}"
        conds += [
            Condition("Promoted", "True", "Promoted", msg),
            *_summary("Promoted", msg, ready=True),
        ]
        status["phase"] = "Promoted"
        return _finish(plan, old, conds, now)
    manual = promotion.get("policy") == "Manual"
    if manual and promotion.get("approvedDigest") != candidate["digest"]:
        how = (
            f"approve with: kubectl patch modelcompression {meta['name']} --type=merge "
            f'-p \'{{"spec":{{"promotion":{{"approvedDigest":"{candidate["digest"]}"}}}}}}\''
        )
        # Held for a person, as spec.promotion asks: a state reached, not one converging, so kstatus must read
        # Current, which takes Ready=True (it reads Ready=False as InProgress: a GitOps sync would wait for the
        # approval that only a later commit brings). Promoted=False says it is not promoted; Ready's message says how.
        conds += [
            Condition("Promoted", "False", "AwaitingApproval", how),
            *_summary("AwaitingApproval", how, ready=True),
        ]
        status["phase"] = "AwaitingApproval"
        if old.get("phase") != "AwaitingApproval":
            plan.events.append(("Normal", "AwaitingApproval", how[:1024]))
        return _finish(plan, old, conds, now)
    if not config.registry_root:
        msg = "the operator has no registry (KILN_REGISTRY_ROOT or KILN_ARTIFACT_ROOT) to promote into"
        conds += [Condition("Promoted", "False", "NoRegistry", msg), *_summary("NoRegistry", msg, stalled=True)]
        status["phase"] = "Failed"
        return _finish(plan, old, conds, now)
    # The handler records the version (plan.promote) and fills status.promoted before the status is written.
    plan.promote = (candidate["uri"], name)
    how = "approved" if manual else "automatic"
    msg = f"{name} <- {candidate['digest']} ({how})"
    conds += [
        Condition("Promoted", "True", "Promoted", msg),
        *_summary("Promoted", msg, ready=True),
    ]
    status["phase"] = "Promoted"
    plan.events.append(("Normal", "Promoted", msg))
    return _finish(plan, old, conds, now)


def _finish(plan: Plan, old: Mapping[str, Any], conds: list[Condition], now: float) -> Plan:
    plan.status["conditions"] = merge_conditions(
        old.get("conditions"), conds, plan.status.get("observedGeneration"), now
    )
    return plan
