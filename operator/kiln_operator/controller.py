"""What every Kiln controller does around its pure state machine: cache its objects, run passes from a work
queue, and carry out the Plan a pass returns (create-or-get or server-side apply children, delete, patch, status,
Events).

A subclass names its kind, its children and how to plan (``async def plan``). kopf's indexes of its children and
pods are the cache of those; they are handed in by the event handlers (kopf gives indexes only to handlers).
Two kinds of children:

- ``JobOwner``: batch Jobs, created once per attempt (create-or-get) and then only patched or deleted;
- ``ApplyOwner``: Deployments and their Services, PDB, HPA and route, server-side applied as desired each pass.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Mapping
from typing import Any, ClassVar

import kopf

from kiln_operator import labels, metrics
from kiln_operator.config import Config
from kiln_operator.kube import Client, NamespaceTerminating
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.resources import Kind
from kiln_operator.runtime import WorkQueue
from kiln_operator.status import rfc3339

Key = tuple[str, str]
Obj = dict[str, Any]
log = logging.getLogger("kiln.controller")
# A Job's pods change several times in a second when they start (created, scheduled, running): one pass for all.
CHILD_COALESCE_SECONDS = 0.2
LOG_TAIL_LINES = 40  # of a failed workload container, into status.failure.logTail


def trim(body: kopf.Body | Mapping[str, Any]) -> Obj:
    """What the state machines read of a child; a copy, so later events never mutate what a pass looks at."""
    meta = body.get("metadata") or {}
    out: Obj = {
        "metadata": {
            k: meta[k]
            for k in (
                "name",
                "namespace",
                "uid",
                "resourceVersion",
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
    return json.loads(json.dumps(out))


def _rv(body: Mapping[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


def owned(children: list[Obj], uid: str | None) -> list[Obj]:
    """The children of this incarnation of the object: one deleted and created again under the same name finds
    the old one's children (same names and labels) until the garbage collector removes them; they are not its."""
    return [
        c
        for c in children
        if not uid
        or not c["metadata"].get("ownerReferences")
        or any(o.get("uid") == uid for o in c["metadata"]["ownerReferences"])
    ]


def adopted(child: Obj, owner: Obj) -> Obj:
    """``child`` owned by ``owner`` (its controller: garbage-collected with it), in place."""
    kopf.adopt(child, owner=owner, strict=True, nested="spec.template")
    return child


def material(status: Mapping[str, Any]) -> str:
    """Status without what changes with the clock alone, so a pass that learnt nothing writes nothing."""
    return json.dumps({k: v for k, v in status.items() if k != "gpuSeconds"}, sort_keys=True, default=str)


def merge_patch(old: Mapping[str, Any], new: Mapping[str, Any]) -> Obj:
    """The JSON merge patch (RFC 7386) that turns `old` into `new`: a merge patch keeps what it does not name, at
    every depth, so a key that went away inside a nested object (a message no longer true) must be nulled."""
    patch: Obj = {k: None for k in old if k not in new}
    for k, v in new.items():
        was = old.get(k)
        patch[k] = merge_patch(was, v) if isinstance(v, Mapping) and isinstance(was, Mapping) else v
    return patch


class Unseen:
    """Children this process created, applied or deleted that the watch has not shown yet, per object.

    A pass right after our own write must see it: otherwise it would create the same attempt again, or count a
    deleted revision as serving. An entry goes when the watch catches up (or after ``ttl`` seconds, in case an
    event was missed and the next list tells the truth)."""

    def __init__(self, ttl: float = 60.0) -> None:
        self.ttl = ttl
        self._by_key: dict[Key, dict[str, tuple[Obj | None, float]]] = {}

    def created(self, key: Key, child: Obj) -> None:
        self._by_key.setdefault(key, {})[child["metadata"]["name"]] = (child, time.monotonic())

    def deleted(self, key: Key, name: str) -> None:
        self._by_key.setdefault(key, {})[name] = (None, time.monotonic())

    def forget(self, key: Key) -> None:
        self._by_key.pop(key, None)

    def overlay(self, key: Key, watched: list[Obj]) -> list[Obj]:
        """``watched`` with our newer writes laid over it: created or applied children the watch has not shown
        (or shows older), and deleted ones marked as being deleted until the watch drops them."""
        mine = self._by_key.get(key)
        if not mine:
            return watched
        by_name = {c["metadata"]["name"]: c for c in watched}
        now = time.monotonic()
        for name, (child, when) in list(mine.items()):
            seen = by_name.get(name)
            caught_up = seen is None if child is None else seen is not None and _rv(seen) >= _rv(child)
            if caught_up or now - when > self.ttl:
                del mine[name]
            elif child is not None:
                by_name[name] = child
            elif seen is not None and not seen["metadata"].get("deletionTimestamp"):
                # Index values are shared snapshots (replaced, never edited): mark a copy.
                by_name[name] = {**seen, "metadata": {**seen["metadata"], "deletionTimestamp": "deleting"}}
        if not mine:
            del self._by_key[key]
        return list(by_name.values())


class Controller:
    kind: ClassVar[Kind]
    container: ClassVar[str] = ""  # the workload container (log tails)
    child: ClassVar[tuple[str, str, str]]  # (group, version, plural) of the watched children
    child_kind: ClassVar[str]  # their kind
    owner_label: ClassVar[str]  # the label every child and pod carries: the watches select on it
    key_label: ClassVar[str]  # the label whose value is the owner's name (the cache key)
    sources: ClassVar[tuple[Kind, ...]] = ()  # kinds whose objects this kind follows

    def __init__(self, client: Client, config: Config) -> None:
        self.client, self.config = client, config
        self.children_index: Any = {}  # kopf.Index of the children, set by the first handler call
        self.pods_index: Any = {}
        self.peers: dict[str, Controller] = {}  # the other kinds' controllers, by kind: their caches hold sources
        self.objects: dict[Key, Obj] = {}
        self.written: dict[Key, str] = {}  # resourceVersion of our own last status write, per object
        self.unseen = Unseen()
        self.queue = WorkQueue(self.reconcile, workers=config.workers)
        self._pass = metrics.instrumented(self.kind.kind)(self._reconcile)
        self._posting: set[asyncio.Task[None]] = set()
        # The objects this kind follows (a source TrainingJob or ModelCompression): who follows what, both ways.
        self.followers: dict[tuple[str, str, str], set[Key]] = {}  # (namespace, kind, name) -> our objects
        self.follows: dict[Key, tuple[str, str, str]] = {}

    # ----------------------------------------------------------------------------------- what a subclass says

    async def plan(self, key: Key, body: Obj, children: list[Obj], pods: list[Obj]) -> Plan:
        raise NotImplementedError

    @classmethod
    def trim_child(cls, body: kopf.Body) -> Obj:
        """What the index keeps of a child."""
        return trim(body)

    @classmethod
    def trim_pod(cls, body: kopf.Body) -> Obj:
        """What the index keeps of a pod."""
        return trim(body)

    def source_ref(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        """(kind, name) of the object in the same namespace whose changes this one must look at, if any."""
        return None

    async def promote(self, body: Obj, plan: Plan) -> None:
        raise NotImplementedError

    # ------------------------------------------------------------------------------------------------ the cache

    def source(self, key: Key, body: Mapping[str, Any]) -> Obj | None:
        """The cached object this one follows, if any (another controller's cache)."""
        ref = self.source_ref(body)
        peer = self.peers.get(ref[0]) if ref else None
        return peer.objects.get((key[0], ref[1])) if peer and ref else None

    def following(self, namespace: str, kind: str, name: str) -> list[Key]:
        return list(self.followers.get((namespace, kind, name), ()))

    def _unfollow(self, key: Key) -> None:
        ref = self.follows.pop(key, None)
        if ref is not None:
            keys = self.followers.get(ref, set())
            keys.discard(key)
            if not keys:
                self.followers.pop(ref, None)

    def forget(self, key: Key) -> None:
        self.objects.pop(key, None)
        self.written.pop(key, None)
        self.unseen.forget(key)
        self.queue.forget(key)
        self._unfollow(key)
        metrics.objects.forget(self.kind.kind, *key)  # a deleted object's series go with it

    def observe(self, body: kopf.Body | Mapping[str, Any], event_type: str | None) -> Key:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.forget(key)
            return key
        snapshot = json.loads(json.dumps(dict(body)))
        old = self.objects.get(key)
        if old is None or _rv(snapshot) >= _rv(old):
            self.objects[key] = snapshot
            # Every version the cache takes, the watch's and our own status writes (write_status observes what
            # the API answered): the object's series, and the transitions its counters count, once each.
            metrics.objects.update(self.kind.kind, old, snapshot)
        self._unfollow(key)
        ref = self.source_ref(body)
        if ref is not None:
            self.follows[key] = (key[0], *ref)
            self.followers.setdefault(self.follows[key], set()).add(key)
        return key

    def echo(self, body: kopf.Body | Mapping[str, Any]) -> bool:
        """Whether this event is only our own status write coming back (nothing new to look at)."""
        meta = body["metadata"]
        return self.written.get((meta["namespace"], meta["name"])) == meta.get("resourceVersion")

    def children(self, key: Key, uid: str | None) -> list[Obj]:
        """This incarnation's children: the indexed ones, with what this process wrote since laid over them."""
        return owned(self.unseen.overlay(key, list(self.children_index.get(key, []))), uid)

    def pods(self, key: Key, children: list[Obj]) -> list[Obj]:
        # Snapshots, never edited: the state machines only read them.
        return list(self.pods_index.get(key, []))

    # ------------------------------------------------------------------------------------------------ a pass

    async def reconcile(self, key: Key) -> float | None:
        return await self._pass(key)

    async def _reconcile(self, key: Key) -> float | None:
        body = self.objects.get(key)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        children = self.children(key, body["metadata"].get("uid"))
        plan = await self.plan(key, body, children, self.pods(key, children))
        try:
            await self.carry_out(key, body, plan)
        except NamespaceTerminating:
            return None  # the namespace and everything in it are going away: nothing to converge
        return plan.requeue_after

    async def carry_out(self, key: Key, body: Obj, plan: Plan) -> None:
        """Children first, then the status: a crash in between leaves nothing to redo twice."""
        namespace, name = key
        await self.create_children(key, body, plan.create)
        await self.apply_children(key, body, plan.apply)
        for api_version, kind, child in plan.delete:
            await self.client.delete(api_version, kind, namespace, child)
            self.deleted(key, kind, child)
        for (api_version, kind, child), patch in plan.patch:
            await self.client.patch(api_version, kind, namespace, child, patch)
        if plan.want_log_tail and self.container and plan.status.get("failure"):
            tail = await self.client.log_tail(namespace, plan.want_log_tail, self.container, LOG_TAIL_LINES)
            if tail:
                plan.status["failure"]["logTail"] = tail[-16384:]
        if plan.promote:
            await self.promote(body, plan)
        await self.write_status(key, body, plan.status)
        for type_, reason, message in plan.events:
            # Posted beside the pass, not in it: an Event is a record for people, not part of converging.
            task = asyncio.create_task(self.event(body, type_, reason, message))
            self._posting.add(task)
            task.add_done_callback(self._posting.discard)
        if plan.delete_self:
            await self.client.delete(self.kind.api_version, self.kind.kind, namespace, name)

    async def create_children(self, key: Key, body: Obj, objs: list[Obj]) -> None:
        for obj in objs:
            self.wrote(key, await self.client.create_or_get(adopted(obj, body)))

    async def apply_children(self, key: Key, body: Obj, objs: list[Obj]) -> None:
        for obj in objs:
            self.wrote(key, await self.client.apply(adopted(obj, body)))

    def wrote(self, key: Key, child: Obj) -> None:
        """What the API server answered to our create or apply: a watched child is seen before the watch shows it."""
        if child.get("kind") == self.child_kind:
            self.unseen.created(key, type(self).trim_child(child))

    def deleted(self, key: Key, kind: str, name: str) -> None:
        if kind == self.child_kind:
            self.unseen.deleted(key, name)

    async def write_status(self, key: Key, body: Obj, status: Obj) -> None:
        """A merge patch of the status subresource, only when something other than the clock changed."""
        old = body.get("status") or {}
        if material(old) == material(status):
            return
        updated = await self.client.patch(
            self.kind.api_version, self.kind.kind, *key, {"status": merge_patch(old, status)}, subresource="status"
        )
        if updated is not None:
            self.observe(updated, "MODIFIED")
            self.written[key] = updated["metadata"].get("resourceVersion", "")

    async def event(self, body: Obj, type_: str, reason: str, message: str) -> None:
        meta = body["metadata"]
        stamp = rfc3339(time.time())
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
            "source": {"component": labels.OPERATOR},
            "reportingComponent": labels.OPERATOR,
            "reportingInstance": self.config.pod_name,
        }
        try:
            await self.client.create_or_get(event)
        except Exception:  # an Event is a courtesy; never fail a pass for it
            log.warning("could not post event %s for %s/%s", reason, meta["namespace"], meta["name"], exc_info=True)

    def start(self) -> None:
        self.queue.start()

    async def stop(self) -> None:
        await self.queue.stop()
        await asyncio.gather(*self._posting, return_exceptions=True)


class JobOwner(Controller):
    """Children are batch Jobs: one per attempt, created once (create-or-get), then only patched or deleted."""

    child = ("batch", "v1", "jobs")
    child_kind = "Job"

    @classmethod
    def trim_child(cls, body: kopf.Body) -> Obj:
        out = trim(body)
        out["spec"] = {"suspend": (body.get("spec") or {}).get("suspend")}
        return out

    def pods(self, key: Key, children: list[Obj]) -> list[Obj]:
        # A Job's pods carry its uid: pods of a Job deleted and created again under the same name are not its.
        uids = {j["metadata"].get("uid") for j in children}
        return [
            p
            for p in self.pods_index.get(key, [])
            if (p["metadata"].get("labels") or {}).get(labels.CONTROLLER_UID) in (None, *uids)
        ]


class ApplyOwner(Controller):
    """Children are Deployments and what serves in front of them, server-side applied as desired on every pass.

    Only the Deployments are watched (their replicas and readiness feed the state machine); the others are
    applied again only when what is sent changes."""

    child = ("apps", "v1", "deployments")
    child_kind = "Deployment"

    def __init__(self, client: Client, config: Config) -> None:
        super().__init__(client, config)
        self.sent: dict[tuple[Key, str, str], str] = {}  # (object, kind, name) -> what we last applied

    @classmethod
    def trim_child(cls, body: kopf.Body) -> Obj:
        out = trim(body)
        out["spec"] = {"replicas": (body.get("spec") or {}).get("replicas")}
        return out

    def forget(self, key: Key) -> None:
        super().forget(key)
        for k in [k for k in self.sent if k[0] == key]:
            del self.sent[k]

    async def apply_children(self, key: Key, body: Obj, objs: list[Obj]) -> None:
        for obj in objs:
            mark, text = (key, obj["kind"], obj["metadata"]["name"]), json.dumps(adopted(obj, body), sort_keys=True)
            if obj["kind"] != self.child_kind and self.sent.get(mark) == text:
                continue  # applied as is already (children other than the watched ones are not seen again)
            self.wrote(key, await self.client.apply(obj))
            self.sent[mark] = text

    def deleted(self, key: Key, kind: str, name: str) -> None:
        super().deleted(key, kind, name)
        self.sent.pop((key, kind, name), None)
