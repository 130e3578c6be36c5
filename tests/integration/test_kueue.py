"""Kueue, running: its controller manager built from the Go module proxy (hack/build-kueue.sh), with its own CRDs and
webhooks, admits Kiln's TrainingJobs against ClusterQueue quota. On the real node the trainer really trains, is
really preempted (SIGTERM, checkpoint) and really resumes; on the simulated GPU nodes GPU quota is counted.

What Kiln must do with Kueue: create queued Jobs suspended and never touch their suspend (Kueue unsuspends what it
admits), say why a job waits, count Kueue's evictions as preemptions (no retry budget, same attempt, resumed from
the checkpoint), and suspend a queued job by deactivating its Workload."""

from __future__ import annotations

import json
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cluster import IMAGES, REAL_NODE, REPO, RESTRICTED, Cluster, run_operator
from support.kueue import Kueue, cluster_queue, flavor, local_queue, running_kueue
from support.waiting import wait_for

import kiln_artifacts as ka
from kiln_artifacts import samples
from kiln_operator.status import parse_time

# A TrainingJob pod's requests (resources below, plus Kiln's default ephemeral storage): quota for one at a time.
ONE_AT_A_TIME = {"cpu": "1500m", "memory": "6Gi", "ephemeral-storage": "6Gi"}
# A job that holds the quota for a while (seconds on the real node): long enough to be caught mid-way after its first
# checkpoint, or to be running while the next job is looked at, short enough to finish soon after.
LONG_STEPS = 3000


@pytest.fixture(scope="module")
def kueue(cluster: Cluster, crds: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kueue]:
    with running_kueue(cluster, tmp_path_factory.mktemp("kueue")) as k:
        yield k


@pytest.fixture(autouse=True)
def fast_progress_poll(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KILN_PROGRESS_POLL_SECONDS", "1")


@dataclass
class Queue:
    namespace: str
    name: str  # the LocalQueue in the namespace, and the ClusterQueue behind it
    low: str  # PriorityClasses
    high: str
    store: str = ""  # the namespace's claim on the shared store (real node only)


@pytest.fixture
def queue(
    cluster: Cluster, kueue: Kueue, request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Queue]:
    """A namespace with a LocalQueue on a ClusterQueue of its own (quota ONE_AT_A_TIME, plus one GPU; a higher
    priority preempts a lower one), and two PriorityClasses. `real` (the test's parameter, default True): the
    namespace's pods run on the real node, with a claim on the shared store holding the digits dataset."""
    real = getattr(request, "param", True)
    suffix = uuid.uuid4().hex[:6]
    q = Queue(f"kq-{suffix}", f"kq-{suffix}", f"kiln-low-{suffix}", f"kiln-high-{suffix}")
    if real:
        cluster.real_node()
    cluster.create_namespace(q.namespace, simulated=not real, labels={**RESTRICTED, "kiln.dev/queue": q.name})
    quota = {**ONE_AT_A_TIME, "nvidia.com/gpu": "1"}
    preempt = {"preemption": {"withinClusterQueue": "LowerPriority"}}
    kueue.apply(
        flavor(q.name),
        cluster_queue(q.name, q.name, quota, **preempt),
        local_queue(q.name, q.namespace, q.name),
        priority_class(q.low, 100),
        priority_class(q.high, 1000),
    )
    if real:
        q.store = f"store-{suffix}"
        script = str(REPO / "hack/real-node.sh")
        subprocess.run([script, "share", q.store, q.namespace], env=cluster.env(), check=True, capture_output=True)
        claim = {
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            "metadata": {"name": q.store},
            "spec": {
                "storageClassName": "kiln-shared",
                "accessModes": ["ReadWriteMany"],
                "resources": {"requests": {"storage": "1Gi"}},
            },
        }
        apply(cluster, q.namespace, claim)
        # The operator, in this process, reads the trainers' progress on the same store as the pods.
        monkeypatch.setenv("KILN_PVC_ROOT", str(Path(cluster.kubeconfig).parent / "real-node/volumes/shared"))
        monkeypatch.setenv("KILN_ARTIFACT_ROOT", f"pvc://{q.store}/artifacts")
        samples.publish_dataset("digits", f"pvc://{q.store}/datasets/digits")
    try:
        yield q
    finally:
        cluster.kubectl("delete", "namespace", q.namespace, "--wait=false", check=False)
        for ref in (f"clusterqueue.kueue.x-k8s.io/{q.name}", f"resourceflavor.kueue.x-k8s.io/{q.name}"):
            cluster.kubectl("delete", ref, "--wait=false", check=False)
        cluster.kubectl("delete", "priorityclass", q.low, q.high, "--wait=false", check=False)
        if q.store:
            cluster.kubectl("delete", "pv", f"{q.store}-{q.namespace}", "--wait=false", check=False)


def priority_class(name: str, value: int) -> dict[str, Any]:
    return {
        "apiVersion": "scheduling.k8s.io/v1",
        "kind": "PriorityClass",
        "metadata": {"name": name},
        "value": value,
        "preemptionPolicy": "Never",  # Kueue decides who yields, not the scheduler
    }


def trainer(q: Queue, name: str, *, steps: int, every: int, priority: str | None = None) -> dict[str, Any]:
    """A TrainingJob of the real trainer on the digits, in q's queue."""
    scheduling: dict[str, Any] = {"queueName": q.name}
    if priority:
        scheduling["priorityClassName"] = priority
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": IMAGES["trainer"],
            "dataset": {"uri": f"pvc://{q.store}/datasets/digits"},
            "hyperparameters": {"learningRate": 0.003, "batchSize": 32, "maxSteps": steps, "precision": "fp32"},
            "checkpoint": {"everySteps": every, "keep": 2},
            "resources": {"cpu": "1", "memory": "2Gi"},
            "scheduling": scheduling,
        },
    }


def simulated(q: Queue, name: str, *, run_for: str) -> dict[str, Any]:
    """A one-GPU TrainingJob on the simulated GPU nodes (kwok runs its pod for `run_for`, then succeeds)."""
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {
            "image": "kiln/trainer:test",
            "dataset": {"uri": "file:///data/digits"},
            "resources": {"gpus": 1, "cpu": "1", "memory": "2Gi"},
            "scheduling": {"queueName": q.name},
            "podTemplate": {
                "metadata": {"annotations": {"kwok.kiln.dev/run-for": run_for}},
                "spec": {"terminationGracePeriodSeconds": 1},
            },
        },
    }


def apply(cluster: Cluster, ns: str, *bodies: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump_all(bodies))


def status(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    return cluster.get("trainingjob", name, "-n", ns).get("status") or {}


def ready(st: dict[str, Any]) -> dict[str, Any]:
    return next((c for c in st.get("conditions") or [] if c["type"] == "Ready"), {})


def suspend(cluster: Cluster, ns: str, name: str, value: bool) -> None:
    body = json.dumps({"spec": {"suspend": value}})
    cluster.kubectl("patch", "-n", ns, f"trainingjob/{name}", "--type=merge", "-p", body)


def the_job(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    (job,) = cluster.get("jobs", "-n", ns, "-l", f"kiln.dev/trainingjob={name}")["items"]
    return job


def workload_of(kueue: Kueue, ns: str, job: dict[str, Any]) -> dict[str, Any] | None:
    uid = job["metadata"]["uid"]
    return next((w for w in kueue.workloads(ns) if w["metadata"]["labels"].get("kueue.x-k8s.io/job-uid") == uid), None)


def workload_condition(wl: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((c for c in ((wl or {}).get("status") or {}).get("conditions") or [] if c["type"] == type_), {})


def workload_finished(kueue: Kueue, ns: str, job: dict[str, Any]) -> Callable[[], bool]:
    return lambda: workload_condition(workload_of(kueue, ns, job), "Finished").get("status") == "True"


def finished(cluster: Cluster, ns: str, name: str, timeout: float) -> dict[str, Any]:
    st = wait_for(
        lambda: (s := status(cluster, ns, name)).get("phase") in ("Succeeded", "Failed") and s,
        what=f"TrainingJob {name} finished",
        timeout=timeout,
    )
    assert st["phase"] == "Succeeded", st
    return st


def pod_nodes(cluster: Cluster, ns: str, name: str) -> set[str]:
    return {
        p["spec"].get("nodeName") for p in cluster.get("pods", "-n", ns, "-l", f"kiln.dev/trainingjob={name}")["items"]
    }


def test_trainingjobs_beyond_quota_wait_then_run_one_after_the_other_on_the_real_node(
    cluster: Cluster, kueue: Kueue, queue: Queue
):
    q = queue
    with run_operator(f"--namespace={q.namespace}"):
        apply(cluster, q.namespace, trainer(q, "first", steps=LONG_STEPS, every=500))
        wait_for(
            lambda: status(cluster, q.namespace, "first").get("phase") == "Running", what="first admitted", timeout=180
        )
        apply(cluster, q.namespace, trainer(q, "second", steps=30, every=10))
        # The queue is full: the second waits, suspended, with Kueue's own words on why.
        st = wait_for(
            lambda: (
                (s := status(cluster, q.namespace, "second"))
                and "insufficient unused quota for cpu" in ready(s).get("message", "")
                and s
            ),
            what="second waiting for quota, and why",
            timeout=60,
        )
        assert st["phase"] == "Pending"
        assert ready(st)["reason"] == "WaitingForQuota"
        second_job = the_job(cluster, q.namespace, "second")
        assert second_job["spec"]["suspend"] is True
        assert second_job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == q.name
        assert workload_condition(workload_of(kueue, q.namespace, second_job), "QuotaReserved").get("status") == "False"
        first = finished(cluster, q.namespace, "first", timeout=300)
        # Quota freed: Kueue admits the second, which runs only now, and succeeds.
        second = finished(cluster, q.namespace, "second", timeout=300)
    assert parse_time(second["startTime"]) >= parse_time(first["completionTime"]), (first, second)
    for name, st in (("first", first), ("second", second)):
        assert pod_nodes(cluster, q.namespace, name) == {REAL_NODE}
        assert st["attempt"] == 1
        assert st["preemptions"] == 0
        assert st["restarts"] == {"infrastructure": 0, "user": 0}
        assert ka.load(st["artifact"]["uri"]).digest == st["artifact"]["digest"]
        # Kueue marks the Workload finished, and so releases its quota, once it sees the Job complete.
        wait_for(workload_finished(kueue, q.namespace, the_job(cluster, q.namespace, name)), what=f"{name} finished")


def test_kueue_preempting_a_lower_priority_trainingjob_is_a_preemption_resumed_from_its_checkpoint(
    cluster: Cluster, kueue: Kueue, queue: Queue
):
    q = queue
    with run_operator(f"--namespace={q.namespace}"):
        apply(cluster, q.namespace, trainer(q, "low", steps=LONG_STEPS, every=20, priority=q.low))
        st = wait_for(
            lambda: (s := status(cluster, q.namespace, "low")).get("lastCheckpoint") and s,
            what="the low-priority job's first checkpoint",
            timeout=240,
        )
        apply(cluster, q.namespace, trainer(q, "high", steps=30, every=10, priority=q.high))
        # Kueue takes the quota back: the same Job is suspended, its pod stopped (the trainer checkpoints on
        # SIGTERM), and Kiln records a preemption: no budget, no new attempt.
        st = wait_for(
            lambda: (s := status(cluster, q.namespace, "low")).get("preemptions") == 1 and s,
            what="the low-priority job preempted",
            timeout=120,
        )
        assert st["failure"]["class"] == "Preemption", st["failure"]
        assert st["failure"]["reason"] == "Preempted"
        assert "Preempted to accommodate" in st["failure"]["message"], st["failure"]
        low_job = the_job(cluster, q.namespace, "low")
        evictions = workload_of(kueue, q.namespace, low_job)["status"]["schedulingStats"]["evictions"]
        assert [(e["reason"], e["count"]) for e in evictions] == [("Preempted", 1)]
        high = finished(cluster, q.namespace, "high", timeout=300)
        # Admitted again, the same attempt resumes from the checkpoint written when it was stopped, and finishes.
        low = finished(cluster, q.namespace, "low", timeout=600)
    assert parse_time(low["completionTime"]) > parse_time(high["completionTime"])
    assert low["attempt"] == 1
    assert the_job(cluster, q.namespace, "low")["metadata"]["uid"] == low_job["metadata"]["uid"]
    assert low["preemptions"] == 1
    assert low["restarts"] == {"infrastructure": 0, "user": 0}
    assert low["progress"].get("resumedFromStep", 0) >= 20, low["progress"]
    assert ka.load(low["artifact"]["uri"]).manifest.metrics  # a whole model, published
    assert pod_nodes(cluster, q.namespace, "low") == {REAL_NODE}


@pytest.mark.parametrize("queue", [False], indirect=True, ids=["simulated"])
def test_gpu_quota_holds_a_job_and_suspend_goes_through_the_workload(cluster: Cluster, kueue: Kueue, queue: Queue):
    q = queue
    with run_operator(f"--namespace={q.namespace}"):
        apply(cluster, q.namespace, simulated(q, "gpu-a", run_for="600s"))
        wait_for(lambda: status(cluster, q.namespace, "gpu-a").get("phase") == "Running", what="gpu-a admitted")
        apply(cluster, q.namespace, simulated(q, "gpu-b", run_for="1s"))
        running, waiting = "gpu-a", "gpu-b"
        wait_for(
            lambda: (
                "insufficient unused quota for nvidia.com/gpu"
                in ready(status(cluster, q.namespace, waiting))["message"]
            ),
            what="Kueue's reason in the waiting job's status",
            timeout=30,
        )
        # spec.suspend on a queued job: Kiln deactivates the Workload and Kueue suspends the Job; nobody flips it back.
        suspend(cluster, q.namespace, running, True)
        st = wait_for(
            lambda: (s := status(cluster, q.namespace, running)).get("phase") == "Suspended" and s,
            what="suspended through Kueue",
            timeout=60,
        )
        job = the_job(cluster, q.namespace, running)
        assert job["spec"]["suspend"] is True
        assert workload_of(kueue, q.namespace, job)["spec"]["active"] is False
        assert st["preemptions"] == 0  # asked for, not done to it
        # Its GPU is free: the other job is admitted and succeeds.
        finished(cluster, q.namespace, waiting, timeout=120)
        suspend(cluster, q.namespace, running, False)
        st = wait_for(
            lambda: (s := status(cluster, q.namespace, running)).get("phase") == "Running" and s,
            what="resumed through Kueue",
            timeout=60,
        )
        assert workload_of(kueue, q.namespace, the_job(cluster, q.namespace, running))["spec"]["active"] is True
        assert st["attempt"] == 1
        assert st["preemptions"] == 0
        assert st["restarts"] == {"infrastructure": 0, "user": 0}
        # Kueue started the Job exactly twice (admitted, then activated again), and the Job's suspend was last
        # written by Kueue, never by the operator: no tug of war. (Events repeated are folded into one with a count.)
        selector = f"involvedObject.name={job['metadata']['name']},involvedObject.kind=Job"
        events = cluster.get("events", "-n", q.namespace, "--field-selector", selector)["items"]
        assert sum(int(e.get("count") or 1) for e in events if e["reason"] == "Started") == 2, events
        fields = cluster.get("job", job["metadata"]["name"], "-n", q.namespace, "--show-managed-fields")["metadata"]
        owners = [f["manager"] for f in fields["managedFields"] if '"f:suspend"' in json.dumps(f.get("fieldsV1"))]
        assert owners, fields["managedFields"]
        assert "kiln-operator" not in owners, owners
        # A queued job created suspended gets no Job, so Kueue has nothing to admit before it is resumed; once
        # resumed, its Job queues (gpu-a holds the quota again).
        parked = {**simulated(q, "gpu-c", run_for="1s")}
        parked["spec"] = {**parked["spec"], "suspend": True}
        apply(cluster, q.namespace, parked)
        st = wait_for(
            lambda: (s := status(cluster, q.namespace, "gpu-c")).get("phase") == "Suspended" and s,
            what="gpu-c suspended",
        )
        assert st["attempt"] == 0
        assert cluster.get("jobs", "-n", q.namespace, "-l", "kiln.dev/trainingjob=gpu-c")["items"] == []
        assert "created, and queued, when it is resumed" in ready(st)["message"]
        suspend(cluster, q.namespace, "gpu-c", False)
        wait_for(
            lambda: (
                "insufficient unused quota for nvidia.com/gpu"
                in ready(status(cluster, q.namespace, "gpu-c")).get("message", "")
            ),
            what="gpu-c queued after its resume",
            timeout=30,
        )
        parked_job = the_job(cluster, q.namespace, "gpu-c")
        assert parked_job["spec"]["suspend"] is True
        assert workload_of(kueue, q.namespace, parked_job)["spec"]["active"] is True
