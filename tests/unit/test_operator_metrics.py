"""The series the operator exports about the objects it manages (kiln_resource_*, kiln_<kind>_*), without a
cluster: versions of objects go through the base controller's cache as the watch and our own status writes
would bring them, and the values are read back from the process's registry."""

from __future__ import annotations

import asyncio
import copy
import itertools
import uuid
from typing import Any

from prometheus_client import REGISTRY

from kiln_operator import metrics
from kiln_operator.config import Config
from kiln_operator.controller import ApplyOwner
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.resources import MODEL_COMPRESSION, MODEL_DEPLOYMENT, TRAINING_JOB


def value(metric: str, /, **labels: str) -> float | None:
    return REGISTRY.get_sample_value(metric, labels)


def fresh_namespace() -> str:
    """The registry is the process's: each test's objects live in a namespace of their own."""
    return f"ns-{uuid.uuid4().hex[:8]}"


def obj(kind: str, namespace: str, name: str = "m", rv: int = 1, generation: int = 1, **fields: Any) -> dict:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "resourceVersion": str(rv),
            "generation": generation,
        },
        "spec": fields.pop("spec", {}),
        "status": fields.pop("status", {}),
    }


class FakeClient:
    """Answers a status patch as the API server would: the object with the patch merged and a new version."""

    def __init__(self) -> None:
        self.rv = itertools.count(1000)
        self.current: dict[str, Any] = {}

    async def patch(self, api_version: str, kind: str, namespace: str, name: str, body: Any, **kw: Any) -> Any:
        out = copy.deepcopy(self.current)
        out["status"] = {k: v for k, v in {**out.get("status", {}), **body["status"]}.items() if v is not None}
        out["metadata"]["resourceVersion"] = str(next(self.rv))
        self.current = out
        return out

    async def create_or_get(self, obj: dict[str, Any]) -> dict[str, Any]:  # Events
        return obj

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        return obj


class Planned(ApplyOwner):
    """A controller whose plan is the status set by the test, carried out by the real base controller."""

    owner_label = key_label = "test/owner"

    def __init__(self, kind: Any) -> None:
        self.kind = kind  # before the base's __init__, which names the kind's metrics
        super().__init__(FakeClient(), Config())  # type: ignore[arg-type]
        self.status: dict[str, Any] = {}

    def seen(self, body: dict[str, Any]) -> None:
        """A watch event of ``body``."""
        self.client.current = copy.deepcopy(body)
        self.observe(body, "MODIFIED")

    async def plan(self, key, body, children, pods) -> Plan:
        return Plan(status=copy.deepcopy(self.status))


def run_passes(c: Planned, key: tuple[str, str], statuses: list[dict[str, Any]], repeat: int = 2) -> None:
    """Each status as the outcome of ``repeat`` passes in a row (a pass repeated on the same state)."""

    async def scenario() -> None:
        for status in statuses:
            c.status = status
            for _ in range(repeat):
                await c.reconcile(key)
            await asyncio.gather(*c._posting)

    asyncio.run(scenario())


def rolled_back(revision: int) -> dict[str, Any]:
    return {
        "revision": revision,
        "digest": f"sha256:{revision:064x}",
        "outcome": "RolledBack",
        "reason": "AnalysisFailed: error rate 0.2 > 0.01",
        "startTime": "2026-01-01T00:00:00Z",
        "endTime": f"2026-01-01T00:{revision:02d}:00Z",
    }


def test_the_phase_is_one_for_the_current_phase_and_zero_for_the_kinds_others():
    ns = fresh_namespace()
    exported = metrics.ObjectMetrics()
    exported.update("TrainingJob", None, obj("TrainingJob", ns, status={"phase": "Running"}))
    labels = {"kind": "TrainingJob", "namespace": ns, "name": "m"}
    phase = {p: value("kiln_resource_phase", **labels, phase=p) for p in metrics.PHASES["TrainingJob"]}
    assert phase == {"Pending": 0, "Running": 1, "Restarting": 0, "Succeeded": 0, "Failed": 0, "Suspended": 0}

    exported.update("TrainingJob", None, obj("TrainingJob", ns, rv=2, status={"phase": "Failed"}))
    assert value("kiln_resource_phase", kind="TrainingJob", namespace=ns, name="m", phase="Failed") == 1
    assert value("kiln_resource_phase", kind="TrainingJob", namespace=ns, name="m", phase="Running") == 0


def test_an_object_without_a_phase_yet_has_every_phase_at_zero_and_an_unknown_phase_is_added():
    ns = fresh_namespace()
    exported = metrics.ObjectMetrics()
    exported.update("ModelCompression", None, obj("ModelCompression", ns))
    assert {
        value("kiln_resource_phase", kind="ModelCompression", namespace=ns, name="m", phase=p)
        for p in metrics.PHASES["ModelCompression"]
    } == {0}
    exported.update("ModelCompression", None, obj("ModelCompression", ns, status={"phase": "Compacting"}))
    assert value("kiln_resource_phase", kind="ModelCompression", namespace=ns, name="m", phase="Compacting") == 1


def test_generation_and_observed_generation_say_whether_the_status_is_behind_the_spec():
    ns = fresh_namespace()
    exported = metrics.ObjectMetrics()
    labels = {"kind": "ModelDeployment", "namespace": ns, "name": "m"}
    exported.update("ModelDeployment", None, obj("ModelDeployment", ns, generation=1))
    assert value("kiln_resource_metadata_generation", **labels) == 1
    assert value("kiln_resource_status_observed_generation", **labels) == 0  # never reconciled yet
    behind = obj("ModelDeployment", ns, rv=2, generation=3, status={"observedGeneration": 2})
    exported.update("ModelDeployment", None, behind)
    assert value("kiln_resource_metadata_generation", **labels) == 3
    assert value("kiln_resource_status_observed_generation", **labels) == 2
    # Nothing reconciles an object being deleted (its generation rises when deletion starts): no lag to report.
    deleting = copy.deepcopy(behind)
    deleting["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    exported.update("ModelDeployment", behind, deleting)
    assert value("kiln_resource_metadata_generation", **labels) is None
    assert value("kiln_resource_status_observed_generation", **labels) is None
    assert value("kiln_resource_phase", **labels, phase="Pending") == 0


def test_trainingjob_progress_restarts_and_gpu_time_come_from_its_status():
    ns = fresh_namespace()
    exported = metrics.ObjectMetrics()
    status = {
        "phase": "Running",
        "attempt": 2,
        "restarts": {"user": 1, "infrastructure": 0},
        "gpuSeconds": 3600,
        "progress": {
            "step": 120,
            "totalSteps": 1000,
            "loss": 0.25,
            "samplesPerSecond": 512.5,
            "heartbeatTime": "2026-01-01T00:00:10Z",
        },
    }
    exported.update("TrainingJob", None, obj("TrainingJob", ns, status=status))
    named = {"namespace": ns, "name": "m"}
    assert value("kiln_trainingjob_progress_step", **named) == 120
    assert value("kiln_trainingjob_progress_total_steps", **named) == 1000
    assert value("kiln_trainingjob_progress_loss", **named) == 0.25
    assert value("kiln_trainingjob_progress_samples_per_second", **named) == 512.5
    assert value("kiln_trainingjob_progress_heartbeat_timestamp_seconds", **named) == 1767225610
    assert value("kiln_trainingjob_attempt", **named) == 2
    assert value("kiln_trainingjob_restarts", **named, budget="user") == 1
    assert value("kiln_trainingjob_restarts", **named, budget="infrastructure") == 0
    assert value("kiln_trainingjob_gpu_seconds", **named) == 3600
    # Progress that stops being reported goes, rather than staying at its last value.
    exported.update("TrainingJob", None, obj("TrainingJob", ns, rv=2, status={"phase": "Restarting", "attempt": 3}))
    assert value("kiln_trainingjob_progress_step", **named) is None
    assert value("kiln_trainingjob_attempt", **named) == 3


def test_a_status_of_unexpected_shapes_exports_what_it_can_and_never_raises():
    ns = fresh_namespace()
    exported = metrics.ObjectMetrics()
    odd = {"phase": "Running", "progress": {"step": "12", "loss": True, "heartbeatTime": "yesterday"}, "restarts": {}}
    exported.update("TrainingJob", None, obj("TrainingJob", ns, status=odd))
    assert value("kiln_trainingjob_progress_step", namespace=ns, name="m") is None
    assert value("kiln_trainingjob_progress_loss", namespace=ns, name="m") is None
    assert value("kiln_resource_phase", kind="TrainingJob", namespace=ns, name="m", phase="Running") == 1
    exported.update("TrainingJob", None, {"metadata": {"name": "broken"}})  # no namespace: logged, not raised


def test_modelcompression_report_gates_and_promoted_version():
    ns = fresh_namespace()
    exported = metrics.ObjectMetrics()
    status = {
        "phase": "Promoted",
        "report": {
            "sizeRatio": 0.26,
            "speedup": 2.5,
            "p95Ms": 4.0,
            "accuracyDrop": 0.004,
            "agreement": 0.995,
            "gates": [{"name": "maxSizeRatio", "passed": True}, {"name": "maxAccuracyDrop", "passed": False}],
        },
        "promoted": {"version": 3},
    }
    exported.update("ModelCompression", None, obj("ModelCompression", ns, status=status))
    named = {"namespace": ns, "name": "m"}
    assert value("kiln_modelcompression_size_ratio", **named) == 0.26
    assert value("kiln_modelcompression_speedup_ratio", **named) == 2.5
    assert value("kiln_modelcompression_p95_latency_seconds", **named) == 0.004
    assert value("kiln_modelcompression_accuracy_drop", **named) == 0.004
    assert value("kiln_modelcompression_agreement_ratio", **named) == 0.995
    assert value("kiln_modelcompression_gate_passed", **named, gate="maxSizeRatio") == 1
    assert value("kiln_modelcompression_gate_passed", **named, gate="maxAccuracyDrop") == 0
    assert value("kiln_modelcompression_promoted_version", **named) == 3
    assert value("kiln_modelcompression_gate_rejections_total", **named) == 0  # exists from the first sight


def test_modeldeployment_replicas_revisions_canary_and_the_owners_limits():
    ns = fresh_namespace()
    exported = metrics.ObjectMetrics()
    spec = {"rollout": {"strategy": "Canary", "analysis": {"maxErrorRate": 0.01, "maxP95LatencyMs": 250}}}
    status = {
        "phase": "Progressing",
        "replicas": 3,
        "readyReplicas": 2,
        "canaryWeight": 25,
        "current": {"revision": 4},
        "candidate": {"revision": 5},
    }
    exported.update("ModelDeployment", None, obj("ModelDeployment", ns, spec=spec, status=status))
    named = {"namespace": ns, "name": "m"}
    assert value("kiln_modeldeployment_replicas", **named) == 3
    assert value("kiln_modeldeployment_ready_replicas", **named) == 2
    assert value("kiln_modeldeployment_canary_weight_ratio", **named) == 0.25
    assert value("kiln_modeldeployment_revision", **named, role="current") == 4
    assert value("kiln_modeldeployment_revision", **named, role="candidate") == 5
    assert value("kiln_modeldeployment_analysis_max_error_ratio", **named) == 0.01
    assert value("kiln_modeldeployment_analysis_max_p95_latency_seconds", **named) == 0.25
    # The candidate promoted: no candidate series any more; no limits in the spec: none exported.
    done = {**status, "phase": "Ready", "canaryWeight": 0, "current": {"revision": 5}}
    del done["candidate"]
    exported.update("ModelDeployment", None, obj("ModelDeployment", ns, rv=2, status=done))
    assert value("kiln_modeldeployment_revision", **named, role="candidate") is None
    assert value("kiln_modeldeployment_revision", **named, role="current") == 5
    assert value("kiln_modeldeployment_analysis_max_p95_latency_seconds", **named) is None


def test_a_rollback_is_counted_once_however_often_the_pass_that_wrote_it_repeats():
    ns = fresh_namespace()
    c = Planned(MODEL_DEPLOYMENT)
    key = (ns, "m")
    named = {"namespace": ns, "name": "m"}
    c.seen(obj("ModelDeployment", ns, status={"phase": "Progressing"}))
    assert value("kiln_modeldeployment_rollbacks_total", **named) == 0  # at 0 before the first, for increase()

    first = {"phase": "Ready", "history": [rolled_back(2)]}
    run_passes(c, key, [first])
    assert value("kiln_modeldeployment_rollbacks_total", **named) == 1
    # The watch brings our own write back (the same version, then a later one with the same status).
    c.seen(copy.deepcopy(c.client.current))
    later = copy.deepcopy(c.client.current)
    later["metadata"]["resourceVersion"] = str(int(later["metadata"]["resourceVersion"]) + 1)
    c.seen(later)
    assert value("kiln_modeldeployment_rollbacks_total", **named) == 1

    # A second rollback, with the oldest entry of a full history dropped at the same time.
    run_passes(c, key, [{"phase": "Ready", "history": [rolled_back(3)]}])
    assert value("kiln_modeldeployment_rollbacks_total", **named) == 2
    # A promotion adds a history entry that is not a rollback.
    promoted = {**rolled_back(4), "outcome": "Promoted"}
    run_passes(c, key, [{"phase": "Ready", "history": [rolled_back(3), promoted]}])
    assert value("kiln_modeldeployment_rollbacks_total", **named) == 2


def test_rollbacks_before_the_operator_saw_the_object_are_not_counted():
    ns = fresh_namespace()
    c = Planned(MODEL_DEPLOYMENT)
    # The first version this process sees already records two rollbacks (an operator restart): a counter that
    # jumped to 2 would read as two new rollbacks to increase().
    c.seen(obj("ModelDeployment", ns, status={"phase": "Ready", "history": [rolled_back(1), rolled_back(2)]}))
    assert value("kiln_modeldeployment_rollbacks_total", namespace=ns, name="m") == 0


def test_a_gate_rejection_is_counted_once_per_entry_into_rejected():
    ns = fresh_namespace()
    c = Planned(MODEL_COMPRESSION)
    key = (ns, "m")
    named = {"namespace": ns, "name": "m"}
    c.seen(obj("ModelCompression", ns, status={"phase": "Running"}))
    run_passes(c, key, [{"phase": "Rejected"}], repeat=3)
    assert value("kiln_modelcompression_gate_rejections_total", **named) == 1
    # A new source artifact: compressed again, rejected again.
    run_passes(c, key, [{"phase": "Running"}, {"phase": "Rejected"}, {"phase": "Rejected"}])
    assert value("kiln_modelcompression_gate_rejections_total", **named) == 2
    run_passes(c, key, [{"phase": "Running"}, {"phase": "Promoted"}])
    assert value("kiln_modelcompression_gate_rejections_total", **named) == 2


def test_a_deleted_object_takes_its_series_with_it_and_a_new_one_of_the_same_name_starts_afresh():
    ns = fresh_namespace()
    c = Planned(TRAINING_JOB)
    named = {"namespace": ns, "name": "m"}
    body = obj("TrainingJob", ns, status={"phase": "Running", "progress": {"step": 5}, "restarts": {"user": 1}})
    c.seen(body)
    assert value("kiln_trainingjob_progress_step", **named) == 5
    c.observe(body, "DELETED")
    assert value("kiln_trainingjob_progress_step", **named) is None
    assert value("kiln_trainingjob_restarts", **named, budget="user") is None
    assert value("kiln_resource_metadata_generation", kind="TrainingJob", **named) is None
    for phase in metrics.PHASES["TrainingJob"]:
        assert value("kiln_resource_phase", kind="TrainingJob", **named, phase=phase) is None

    md = Planned(MODEL_DEPLOYMENT)
    md.seen(obj("ModelDeployment", ns, status={"phase": "Ready"}))
    run_passes(md, (ns, "m"), [{"phase": "Ready", "history": [rolled_back(1)]}])
    assert value("kiln_modeldeployment_rollbacks_total", **named) == 1
    md.observe(md.client.current, "DELETED")
    assert value("kiln_modeldeployment_rollbacks_total", **named) is None
    md.seen(obj("ModelDeployment", ns, rv=5000, status={"phase": "Pending"}))
    assert value("kiln_modeldeployment_rollbacks_total", **named) == 0


def test_an_older_version_than_the_cached_one_changes_nothing():
    ns = fresh_namespace()
    c = Planned(TRAINING_JOB)
    c.seen(obj("TrainingJob", ns, rv=10, status={"phase": "Succeeded"}))
    c.seen(obj("TrainingJob", ns, rv=9, status={"phase": "Running"}))
    assert value("kiln_resource_phase", kind="TrainingJob", namespace=ns, name="m", phase="Succeeded") == 1


def test_every_kind_has_both_reconcile_outcomes_from_the_start():
    metrics.instrumented("FreshKind")
    assert value("kiln_reconciles_total", kind="FreshKind", outcome="success") == 0
    assert value("kiln_reconciles_total", kind="FreshKind", outcome="error") == 0
