"""The controller base without a cluster: a fake API client records what a pass does with the plan, and what a
TrainingJob pass reads of Kueue."""

import asyncio
import copy
import itertools
from typing import Any

from kiln_operator.config import Config
from kiln_operator.controller import ApplyOwner, JobOwner, Unseen, material, merge_patch
from kiln_operator.controllers.trainingjob import TrainingJobs
from kiln_operator.kube import Client
from kiln_operator.labels import KUEUE_JOB_UID
from kiln_operator.lifecycle.plan import Plan, job
from kiln_operator.resources import MODEL_DEPLOYMENT, TRAINING_JOB

NS, NAME, UID = "team", "run", "uid-1"
KEY = (NS, NAME)


class FakeClient:
    """Answers like the API server would, and records every call."""

    def __init__(self, owner: dict[str, Any]) -> None:
        self.owner = owner  # the object whose status the controller writes
        self.calls: list[tuple[str, str, str]] = []
        self.rv = itertools.count(100)

    def _stamp(self, obj: dict[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(dict(obj))
        out["metadata"]["resourceVersion"] = str(next(self.rv))
        return out

    async def create_or_get(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("create", obj["kind"], obj["metadata"]["name"]))
        return self._stamp(obj)

    async def apply(self, obj: dict[str, Any]) -> dict[str, Any]:
        self.calls.append(("apply", obj["kind"], obj["metadata"]["name"]))
        return self._stamp(obj)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        self.calls.append(("delete", kind, name))
        return True

    async def patch(self, api_version: str, kind: str, namespace: str, name: str, body: Any, **kw: Any) -> Any:
        what = "status" if kw.get("subresource") == "status" else "patch"
        self.calls.append((what, kind, name))
        return self._stamp({**self.owner, **body})

    async def log_tail(self, *args: Any) -> str | None:
        return None

    def made(self, what: str) -> list[str]:
        return [name for w, _, name in self.calls if w == what]


def body(status: dict[str, Any] | None = None, kind: str = "TrainingJob") -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": NAME, "namespace": NS, "uid": UID, "resourceVersion": "1", "generation": 1},
        "spec": {},
        "status": status or {},
    }


def a_job(name: str, rv: str = "100", owner: str = UID, **meta: Any) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": name,
            "namespace": NS,
            "resourceVersion": rv,
            "uid": f"job-{name}",
            "ownerReferences": [{"uid": owner}],
            **meta,
        },
        "status": {},
    }


class Jobs(JobOwner):
    """Wants one Job while it has none; records what each pass saw."""

    kind = TRAINING_JOB
    owner_label = key_label = "test/owner"

    def __init__(self) -> None:
        super().__init__(FakeClient(body()), Config())  # type: ignore[arg-type]
        self.seen: list[list[str]] = []
        self.pods_seen: list[list[str]] = []
        self.status: dict[str, Any] = {"phase": "Running"}
        self.remove: list[str] = []

    async def plan(self, key, body, children, pods) -> Plan:
        self.seen.append(sorted(c["metadata"]["name"] for c in children if not c["metadata"].get("deletionTimestamp")))
        self.pods_seen.append(sorted(p["metadata"]["name"] for p in pods))
        plan = Plan(status=dict(self.status))
        if not children:
            plan.create = [a_job("run-1")]
        plan.delete = [job(n) for n in self.remove]
        return plan


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_child_created_by_a_pass_is_seen_by_the_next_before_the_watch_shows_it():
    async def scenario() -> Jobs:
        c = Jobs()
        c.observe(body(), "ADDED")
        await c.reconcile(KEY)
        await c.reconcile(KEY)  # the index is still empty: the watch has not shown the Job yet
        return c

    c = run(scenario())
    assert c.client.made("create") == ["run-1"]  # created once, not again
    assert c.seen == [[], ["run-1"]]


def test_the_watch_catching_up_replaces_our_copy_and_an_old_incarnations_children_are_ignored():
    async def scenario() -> Jobs:
        c = Jobs()
        c.observe(body(), "ADDED")
        await c.reconcile(KEY)
        # The watch shows the Job (with the resourceVersion the create returned, the fake's first) and a leftover
        # of a deleted TrainingJob of the same name (another owner uid).
        c.children_index = {KEY: [a_job("run-1", rv="100"), a_job("run-9", owner="old-uid")]}
        await c.reconcile(KEY)
        return c

    c = run(scenario())
    assert c.seen == [[], ["run-1"]]
    assert c.unseen.overlay(KEY, []) == []  # caught up: nothing of ours is laid over the index any more


def test_a_deleted_child_is_being_deleted_until_the_watch_drops_it():
    async def scenario() -> Jobs:
        c = Jobs()
        c.observe(body(), "ADDED")
        c.children_index = {KEY: [a_job("run-1"), a_job("run-2")]}
        c.remove = ["run-1"]
        await c.reconcile(KEY)
        c.remove = []
        await c.reconcile(KEY)  # the index still has run-1
        c.children_index = {KEY: [a_job("run-2")]}
        await c.reconcile(KEY)
        return c

    c = run(scenario())
    assert c.client.made("delete") == ["run-1"]
    assert c.seen == [["run-1", "run-2"], ["run-2"], ["run-2"]]


def test_the_status_is_written_only_when_it_changed():
    async def scenario() -> Jobs:
        c = Jobs()
        c.children_index = {KEY: [a_job("run-1")]}
        c.observe(body(), "ADDED")
        await c.reconcile(KEY)
        # Our write comes back as an event: the cached body now has the status; a pass writes nothing.
        echoed = body(status={"phase": "Running"})
        echoed["metadata"]["resourceVersion"] = "999"
        c.observe(echoed, "MODIFIED")
        await c.reconcile(KEY)
        c.status = {"phase": "Running", "gpuSeconds": 7}  # the clock alone: still nothing to write
        await c.reconcile(KEY)
        c.status = {"phase": "Succeeded"}
        await c.reconcile(KEY)
        return c

    c = run(scenario())
    assert c.client.made("status") == [NAME, NAME]
    assert material({"phase": "Running", "gpuSeconds": 1}) == material({"phase": "Running", "gpuSeconds": 2})


def test_our_own_status_write_coming_back_is_an_echo():
    async def scenario() -> tuple[Jobs, bool, bool]:
        c = Jobs()
        c.children_index = {KEY: [a_job("run-1")]}
        c.observe(body(), "ADDED")
        await c.reconcile(KEY)
        written = c.written[KEY]
        mine = body(status={"phase": "Running"})
        mine["metadata"]["resourceVersion"] = written
        theirs = copy.deepcopy(mine)
        theirs["metadata"]["resourceVersion"] = str(int(written) + 1)
        return c, c.echo(mine), c.echo(theirs)

    _, mine, theirs = run(scenario())
    assert mine
    assert not theirs


def test_a_job_owner_sees_only_the_pods_of_its_current_jobs():
    def pod(name: str, job_uid: str | None) -> dict[str, Any]:
        labels = {"batch.kubernetes.io/controller-uid": job_uid} if job_uid else {}
        return {"metadata": {"name": name, "labels": labels}, "status": {}}

    async def scenario() -> Jobs:
        c = Jobs()
        c.observe(body(), "ADDED")
        c.children_index = {KEY: [a_job("run-1")]}
        # A pod of a Job of the same name deleted before (another uid), one of run-1, one not yet labelled.
        c.pods_index = {KEY: [pod("old", "job-gone"), pod("new", "job-run-1"), pod("bare", None)]}
        await c.reconcile(KEY)
        return c

    assert run(scenario()).pods_seen == [["bare", "new"]]


class Serving(ApplyOwner):
    kind = MODEL_DEPLOYMENT
    owner_label = key_label = "test/owner"

    def __init__(self) -> None:
        super().__init__(FakeClient(body(kind="ModelDeployment")), Config())  # type: ignore[arg-type]
        self.replicas = 1

    async def plan(self, key, body, children, pods) -> Plan:
        deployment = {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {"name": "run-a", "namespace": NS},
            "spec": {"replicas": self.replicas},
        }
        service = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "run", "namespace": NS}, "spec": {}}
        return Plan(status={"phase": "Ready"}, apply=[deployment, service])


def test_applied_children_other_than_the_watched_ones_are_sent_again_only_when_they_change():
    async def scenario() -> Serving:
        c = Serving()
        c.observe(body(kind="ModelDeployment"), "ADDED")
        await c.reconcile(KEY)
        await c.reconcile(KEY)
        return c

    c = run(scenario())
    assert c.client.made("apply") == ["run-a", "run", "run-a"]  # the Deployment each pass, the Service once
    assert [d["spec"]["replicas"] for d in c.children(KEY, UID)] == [1]  # our applied copy, before the watch


def test_unseen_entries_expire_so_a_missed_event_cannot_pin_a_stale_copy():
    unseen = Unseen(ttl=0.0)
    unseen.created(KEY, a_job("run-1", rv="5"))
    assert unseen.overlay(KEY, []) == []


def apply_merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386, as the API server applies a merge patch."""
    if not isinstance(patch, dict):
        return patch
    out = dict(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = apply_merge_patch(out.get(k), v)
    return out


def test_the_status_patch_removes_what_went_away_at_every_depth():
    old = {
        "phase": "Ready",
        "gone": {"a": 1},
        "monitoring": {"message": "not enough samples", "samples": 16, "deep": {"x": 1, "y": 2}},
        "list": [{"a": 1}, {"b": 2}],
    }
    new = {
        "phase": "Ready",
        "monitoring": {"samples": 320, "signals": [{"name": "prediction"}], "deep": {"y": 3}},
        "list": [{"b": 2}],
    }
    patch = merge_patch(old, new)
    assert patch["gone"] is None
    assert patch["monitoring"]["message"] is None
    assert patch["monitoring"]["deep"] == {"x": None, "y": 3}
    assert apply_merge_patch(old, patch) == new
    assert apply_merge_patch({}, merge_patch({}, new)) == new


class Kueue(FakeClient):
    """Answers the Workload list of a queued TrainingJob, counting the requests."""

    path = staticmethod(Client.path)

    def __init__(self) -> None:
        super().__init__(body())
        self.lists: list[str] = []
        self.active = True

    async def get(self, path: str, resource: str) -> dict[str, Any]:
        self.lists.append(path)
        wl = {
            "metadata": {"name": "job-run-1-x", "labels": {KUEUE_JOB_UID: "job-run-1"}},
            "spec": {"active": self.active},
        }
        return {"items": [wl]}


def test_a_queued_job_s_workload_is_read_while_it_waits_and_then_only_when_its_job_or_suspend_changes():
    kueue = Kueue()
    owner = TrainingJobs(kueue, Config())  # type: ignore[arg-type]
    tj = {**body(), "spec": {"scheduling": {"queueName": "q"}}}

    def read(job_rv: str, suspended: bool, tj: dict[str, Any] = tj) -> dict[str, Any] | None:
        job = {**a_job("run-1", rv=job_rv, labels={"kiln.dev/attempt": "1"}), "spec": {"suspend": suspended}}
        return run(owner._workload(KEY, tj, [job]))

    # Waiting: Kueue's verdict changes only the Workload, so every pass reads it.
    read("100", True)
    read("100", True)
    assert len(kueue.lists) == 2
    assert kueue.lists[0].endswith(f"/workloads?labelSelector={KUEUE_JOB_UID}%3Djob-run-1")
    # Admitted (Kueue unsuspended the Job): the first pass reads, later passes on the same Job do not.
    assert read("101", False)["spec"] == {"active": True}
    kueue.active = False
    assert read("101", False)["spec"] == {"active": True}
    assert read("101", False)["spec"] == {"active": True}
    assert len(kueue.lists) == 3
    # The Job changed (Kueue evicts by suspending it), or spec.suspend did: read again.
    assert read("102", False)["spec"] == {"active": False}
    suspend = {**tj, "spec": {**tj["spec"], "suspend": True}}
    read("102", False, suspend)
    assert len(kueue.lists) == 5
    # A deleted TrainingJob's read goes with it.
    owner.forget(KEY)
    read("102", False, suspend)
    assert len(kueue.lists) == 6
