"""What every Kiln controller does around its pure state machine: cache its objects, run passes from a work
queue, and apply the Plan a pass returns (create-or-get children, delete, patch, status, Events, promotion).

A subclass names its kind and says how to plan (``async def plan``); kopf's indexes of its Jobs and pods are
handed in by the event handlers (kopf gives indexes only to handlers)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import kopf

from kiln_operator import metrics
from kiln_operator.kube import Client, NamespaceTerminating
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.resources import Kind
from kiln_operator.runtime import WorkQueue

Key = tuple[str, str]
log = logging.getLogger("kiln.controller")


def trim(body: kopf.Body | dict[str, Any], *, suspend: bool = False) -> dict[str, Any]:
    """What the state machines read of a child; a copy, so later events never mutate what a pass looks at."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "metadata": {
            k: meta[k]
            for k in (
                "name",
                "namespace",
                "uid",
                "labels",
                "annotations",
                "creationTimestamp",
                "deletionTimestamp",
                "ownerReferences",
            )
            if k in meta
        },
        "status": body.get("status") or {},
    }
    if suspend:
        out["spec"] = {"suspend": (body.get("spec") or {}).get("suspend")}
    return json.loads(json.dumps(out))


def _rv(body: dict[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


def owned(children: list[dict[str, Any]], uid: str | None) -> list[dict[str, Any]]:
    """The children of this incarnation of the object: one deleted and created again under the same name finds
    the old one's children (same names and labels) until the garbage collector removes them; they are not its."""
    return [
        c
        for c in children
        if not uid
        or not c["metadata"].get("ownerReferences")
        or any(o.get("uid") == uid for o in c["metadata"]["ownerReferences"])
    ]


CONTROLLER_UID = "batch.kubernetes.io/controller-uid"


def material(status: dict[str, Any]) -> str:
    """Status without what changes with the clock alone, so a pass that learnt nothing writes nothing."""
    return json.dumps({k: v for k, v in status.items() if k != "gpuSeconds"}, sort_keys=True, default=str)


class Controller:
    kind: Kind
    container: str = ""  # the workload container (log tails)

    def __init__(self, client: Client, config: Any) -> None:
        self.client, self.config = client, config
        self.jobs: Any = {}  # kopf.Index of this kind's Jobs, set by the first handler call
        self.pods: Any = {}
        self.objects: dict[Key, dict[str, Any]] = {}
        self.written: dict[Key, str] = {}  # resourceVersion of our own last status write, per object
        # Jobs we created or deleted that the watch has not shown yet: name -> (trimmed Job or None, when).
        self.recent: dict[Key, dict[str, tuple[dict[str, Any] | None, float]]] = {}
        self.queue = WorkQueue(self.reconcile, workers=int(os.environ.get("KILN_WORKERS") or 32))
        self._pass = metrics.instrumented(self.kind.kind)(self._reconcile)
        self._posting: set[asyncio.Task[None]] = set()
        # The objects this kind follows (a source TrainingJob or ModelCompression): who follows what, both ways.
        self.followers: dict[tuple[str, str, str], set[Key]] = {}  # (namespace, kind, name) -> our objects
        self.follows: dict[Key, tuple[str, str, str]] = {}

    def source_ref(self, body: kopf.Body | dict[str, Any]) -> tuple[str, str] | None:
        """(kind, name) of the object in the same namespace whose changes this one must look at, if any."""
        return None

    def following(self, namespace: str, kind: str, name: str) -> list[Key]:
        return list(self.followers.get((namespace, kind, name), ()))

    def _unfollow(self, key: Key) -> None:
        ref = self.follows.pop(key, None)
        if ref is not None:
            keys = self.followers.get(ref, set())
            keys.discard(key)
            if not keys:
                self.followers.pop(ref, None)

    async def plan(self, key: Key, body: dict[str, Any], jobs: list[dict[str, Any]], pods: list[Any]) -> Plan:
        raise NotImplementedError

    def service_name(self, name: str) -> str | None:
        return None

    def forget(self, key: Key) -> None:
        self.objects.pop(key, None)
        self.written.pop(key, None)
        self.recent.pop(key, None)
        self.queue.forget(key)
        self._unfollow(key)

    def observe(self, body: kopf.Body | dict[str, Any], event_type: str | None) -> Key:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.forget(key)
            return key
        snapshot = json.loads(json.dumps(dict(body)))
        old = self.objects.get(key)
        if old is None or _rv(snapshot) >= _rv(old):
            self.objects[key] = snapshot
        self._unfollow(key)
        ref = self.source_ref(body)
        if ref is not None:
            self.follows[key] = (key[0], *ref)
            self.followers.setdefault(self.follows[key], set()).add(key)
        return key

    def echo(self, body: kopf.Body | dict[str, Any]) -> bool:
        """Whether this event is only our own status write coming back (nothing new to look at)."""
        meta = body["metadata"]
        return self.written.get((meta["namespace"], meta["name"])) == meta.get("resourceVersion")

    def children(self, key: Key) -> list[dict[str, Any]]:
        """The indexed Jobs, plus what this process created or deleted that the watch has not reported yet."""
        # Index values are our own fresh snapshots (trim), replaced, never edited, on every event: share them,
        # and copy only the ones marked below.
        jobs = list(self.jobs.get(key, []))
        names = {j["metadata"]["name"] for j in jobs}
        recent = self.recent.get(key, {})
        now = time.monotonic()
        for name, (obj, when) in list(recent.items()):
            seen = (name in names) == (obj is not None)
            if seen or now - when > 60:
                del recent[name]
            elif obj is not None:
                jobs.append(obj)
        for i, job in enumerate(jobs):
            entry = recent.get(job["metadata"]["name"])
            if entry is not None and entry[0] is None and not job["metadata"].get("deletionTimestamp"):
                jobs[i] = {**job, "metadata": {**job["metadata"], "deletionTimestamp": "deleting"}}
        return jobs

    async def reconcile(self, key: Key) -> float | None:
        return await self._pass(key)

    async def _reconcile(self, key: Key) -> float | None:
        body = self.objects.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        uid = body["metadata"].get("uid")
        jobs = owned(self.children(key), uid)
        uids = {j["metadata"].get("uid") for j in jobs}
        # Snapshots, never edited (the state machines only read them); a Job's pods carry its uid.
        pods = [
            p
            for p in self.pods.get(key, [])
            if (p["metadata"].get("labels") or {}).get(CONTROLLER_UID) in (None, *uids)
        ]
        plan = await self.plan(key, body, jobs, pods)
        try:
            await self.apply(key, body, plan)
        except NamespaceTerminating:
            return None  # the namespace and everything in it are going away: nothing to converge
        return plan.requeue_after

    async def apply(self, key: Key, body: dict[str, Any], plan: Plan) -> None:
        """Creates first, then deletes, then the status: a crash in between leaves nothing to redo twice."""
        namespace, name = key
        for obj in plan.create:
            kopf.adopt(obj, owner=body, strict=True, nested="spec.template")
            created = await self.client.create_or_get(obj)
            if obj["kind"] == "Job":
                self.recent.setdefault(key, {})[obj["metadata"]["name"]] = (
                    trim(created, suspend=True),
                    time.monotonic(),
                )
        for job in plan.delete_jobs:
            await self.client.delete("batch/v1", "Job", namespace, job)
            self.recent.setdefault(key, {})[job] = (None, time.monotonic())
        service = self.service_name(name)
        if plan.delete_service and service:
            await self.client.delete("v1", "Service", namespace, service)
        if plan.patch_job:
            await self.client.patch("batch/v1", "Job", namespace, plan.patch_job[0], plan.patch_job[1])
        if plan.want_log_tail and self.container and plan.status.get("failure"):
            tail = await self.client.log_tail(namespace, plan.want_log_tail, self.container, 40)
            if tail:
                plan.status["failure"]["logTail"] = tail[-16384:]
        if plan.promote:
            await self.promote(body, plan)
        old = body.get("status") or {}
        if material(old) != material(plan.status):
            patch = dict(plan.status)
            patch.update({k: None for k in old if k not in plan.status})
            updated = await self.client.patch(
                self.kind.api_version, self.kind.kind, namespace, name, {"status": patch}, subresource="status"
            )
            if updated is not None:
                self.observe(updated, "MODIFIED")
                self.written[key] = updated["metadata"].get("resourceVersion", "")
        for type_, reason, message in plan.events:
            # Posted beside the pass, not in it: an Event is a record for people, not part of converging.
            task = asyncio.create_task(self.event(body, type_, reason, message))
            self._posting.add(task)
            task.add_done_callback(self._posting.discard)
        if plan.delete_self:
            await self.client.delete(self.kind.api_version, self.kind.kind, namespace, name)

    async def promote(self, body: dict[str, Any], plan: Plan) -> None:
        raise NotImplementedError

    async def event(self, body: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        stamp = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": self.kind.api_version,
                "kind": self.kind.kind,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
            "source": {"component": "kiln-operator"},
            "reportingComponent": "kiln-operator",
            "reportingInstance": os.environ.get("POD_NAME", "kiln-operator"),
        }
        try:
            await self.client.create_or_get(event)
        except Exception:  # an Event is a courtesy; never fail a pass for it
            log.warning("could not post event %s for %s/%s", reason, meta["namespace"], meta["name"], exc_info=True)

    async def stop(self) -> None:
        await self.queue.stop()
        await asyncio.gather(*self._posting, return_exceptions=True)
        await self.client.close()
