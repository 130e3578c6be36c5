"""TrainingJob controller: kopf watches feed a work queue; each pass runs the pure state machine
(lifecycle.trainingjob.decide) on the cached TrainingJob, Jobs and pods and applies its plan.

Level-based: every event of a TrainingJob, of its Jobs or of its pods asks for a pass of that TrainingJob; the
pass looks only at the current state. kopf's indexes are the cache (kopf holds all handlers until they are
filled, so a restarted operator never acts on a half-listed world), and only event handlers are used, so kopf
writes no annotations or finalizers on TrainingJobs. Deletion is owner-reference garbage collection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from typing import Any

import kopf
from kiln_artifacts.k8s import s3_env
from kiln_artifacts.uri import parse_uri

from kiln_operator import metrics
from kiln_operator.builders import trainingjob as b
from kiln_operator.kube import Client
from kiln_operator.lifecycle import trainingjob as life
from kiln_operator.resources import TRAINING_JOB as KIND
from kiln_operator.runtime import WorkQueue

Key = tuple[str, str]
log = logging.getLogger("kiln.trainingjob")
CHILD = {"labels": {b.TJ_LABEL: kopf.PRESENT}}
PROGRESS_MARK = "kiln-progress "


def config_from_env(env: dict[str, str] | None = None) -> life.Config:
    """Operator configuration (the Deployment's env): default trainer image, artifact store and its Secret."""
    env = dict(os.environ if env is None else env)
    secret = env.get("KILN_ARTIFACT_S3_SECRET")
    artifact_env = s3_env(secret, endpoint_url=env.get("KILN_ARTIFACT_S3_ENDPOINT")) if secret else []
    return life.Config(
        image_default=env.get("KILN_TRAINER_IMAGE") or None,
        artifact_root=env.get("KILN_ARTIFACT_ROOT") or None,
        artifact_env=tuple(artifact_env),
        progress_poll_seconds=float(env.get("KILN_PROGRESS_POLL_SECONDS") or 15),
    )


def _trim(body: kopf.Body | dict[str, Any], *, spec: bool) -> dict[str, Any]:
    """What the state machine reads; a copy, so later events never mutate what a pass is looking at."""
    meta = body.get("metadata") or {}
    out: dict[str, Any] = {
        "metadata": {
            k: meta[k]
            for k in ("name", "namespace", "uid", "labels", "annotations", "creationTimestamp", "deletionTimestamp")
            if k in meta
        },
        "status": body.get("status") or {},
    }
    if spec:
        out["spec"] = {"suspend": (body.get("spec") or {}).get("suspend")}
    return json.loads(json.dumps(out))


@kopf.index("batch", "v1", "jobs", **CHILD)
def tj_jobs(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, labels[b.TJ_LABEL]): _trim(body, spec=True)}


@kopf.index("", "v1", "pods", **CHILD)
def tj_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]]:
    pod = _trim(body, spec=False)
    pod["metadata"].pop("labels", None)
    pod["metadata"]["labels"] = {k: v for k, v in labels.items() if k in (b.TJ_LABEL, b.ATTEMPT_LABEL)}
    return {(namespace, labels[b.TJ_LABEL]): pod}


class Controller:
    def __init__(self, client: Client, config: life.Config) -> None:
        self.client, self.config = client, config
        self.jobs: Any = {}  # kopf.Index, set by the first handler call
        self.pods: Any = {}
        self.trainingjobs: dict[Key, dict[str, Any]] = {}
        # Objects we created or deleted that the watch has not shown us yet (name -> (object or None, when)).
        self.recent: dict[Key, dict[str, tuple[dict[str, Any] | None, float]]] = {}
        self.progress: dict[Key, tuple[float, dict[str, Any] | None]] = {}
        self.queue = WorkQueue(self.reconcile, workers=int(os.environ.get("KILN_WORKERS") or 32))

    def observe(self, body: kopf.Body, event_type: str | None) -> Key:
        key = (body["metadata"]["namespace"], body["metadata"]["name"])
        if event_type == "DELETED":
            self.trainingjobs.pop(key, None)
            self.recent.pop(key, None)
            self.progress.pop(key, None)
            self.queue.forget(key)
            return key
        snapshot = json.loads(json.dumps(dict(body)))
        old = self.trainingjobs.get(key)
        if old is None or _rv(snapshot) >= _rv(old):
            self.trainingjobs[key] = snapshot
        return key

    def _children(self, key: Key) -> list[dict[str, Any]]:
        """The indexed Jobs, plus what this process created or deleted that the watch has not reported yet."""
        jobs = [json.loads(json.dumps(j)) for j in self.jobs.get(key, [])]
        names = {j["metadata"]["name"] for j in jobs}
        recent = self.recent.get(key, {})
        now = time.monotonic()
        for name, (obj, when) in list(recent.items()):
            seen = (name in names) == (obj is not None)
            if seen or now - when > 60:
                del recent[name]
            elif obj is not None:
                jobs.append(json.loads(json.dumps(obj)))
        for job in jobs:
            entry = recent.get(job["metadata"]["name"])
            if entry is not None and entry[0] is None:
                job["metadata"]["deletionTimestamp"] = job["metadata"].get("deletionTimestamp") or "deleting"
        return jobs

    @metrics.instrumented(KIND.kind)
    async def reconcile(self, key: Key) -> float | None:
        tj = self.trainingjobs.get(key)
        if tj is None or tj["metadata"].get("deletionTimestamp"):
            return None
        jobs = self._children(key)
        pods = [json.loads(json.dumps(p)) for p in self.pods.get(key, [])]
        progress = await self._progress(key, tj, pods)
        plan = life.decide(tj, jobs, pods, progress, time.time(), self.config)
        await self._apply(key, tj, plan)
        return plan.requeue_after

    async def _apply(self, key: Key, tj: dict[str, Any], plan: life.Plan) -> None:
        namespace, name = key
        for obj in plan.create:
            kopf.adopt(obj, owner=tj, strict=True, nested="spec.template")
            created = await self.client.create_or_get(obj)
            if obj["kind"] == "Job":
                self.recent.setdefault(key, {})[obj["metadata"]["name"]] = (_trim(created, spec=True), time.monotonic())
        for job in plan.delete_jobs:
            await self.client.delete("batch/v1", "Job", namespace, job)
            self.recent.setdefault(key, {})[job] = (None, time.monotonic())
        if plan.delete_service:
            await self.client.delete("v1", "Service", namespace, b.service_name(name))
        if plan.patch_job:
            await self.client.patch("batch/v1", "Job", namespace, plan.patch_job[0], plan.patch_job[1])
        if plan.want_log_tail:
            tail = await self.client.log_tail(namespace, plan.want_log_tail, b.CONTAINER, life.LOG_TAIL_LINES)
            if tail and plan.status.get("failure"):
                plan.status["failure"]["logTail"] = tail[-16384:]
        old = tj.get("status") or {}
        if _material(old) != _material(plan.status):
            patch = {k: v for k, v in plan.status.items()}
            patch.update({k: None for k in old if k not in plan.status})
            updated = await self.client.patch(
                KIND.api_version, KIND.kind, namespace, name, {"status": patch}, subresource="status"
            )
            if updated is not None:
                self.observe(kopf.Body(updated), "MODIFIED")
        for type_, reason, message in plan.events:
            await self._event(tj, type_, reason, message)
        if plan.delete_self:
            await self.client.delete(KIND.api_version, KIND.kind, namespace, name)

    async def _event(self, tj: dict[str, Any], type_: str, reason: str, message: str) -> None:
        meta = tj["metadata"]
        stamp = life.fmt_time(time.time())
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{time.time_ns():x}", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": KIND.api_version,
                "kind": KIND.kind,
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
        except Exception:  # an event is a courtesy; never fail a pass for it
            log.warning("could not post event %s for %s/%s", reason, meta["namespace"], meta["name"], exc_info=True)

    async def _progress(self, key: Key, tj: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The trainer's latest progress, read at most every progress_poll_seconds: from progress.json next to
        the checkpoints when the operator can read that store (file://, s3://), else from rank 0's log lines.
        None when there is no source (then no progress deadline either)."""
        status = tj.get("status") or {}
        if status.get("phase") not in ("Running", "Restarting", "Pending"):
            return None
        cached = self.progress.get(key)
        if cached and time.monotonic() - cached[0] < self.config.progress_poll_seconds:
            return cached[1]
        value: dict[str, Any] | None = None
        uri = (b.resolve_locations(tj, self.config.artifact_root).get("checkpoint") or {}).get("uri")
        scheme = parse_uri(uri).scheme if uri else None
        if uri and scheme in ("file", "s3"):
            value = await asyncio.to_thread(_read_progress_file, uri)
        else:
            attempt = str(status.get("attempt") or "")
            rank0 = next(
                (
                    p
                    for p in pods
                    if p["metadata"].get("labels", {}).get(b.ATTEMPT_LABEL) == attempt
                    and (p["metadata"].get("annotations") or {}).get("batch.kubernetes.io/job-completion-index") == "0"
                    and (p.get("status") or {}).get("phase") == "Running"
                ),
                None,
            )
            if rank0 is not None:
                tail = await self.client.log_tail(key[0], rank0["metadata"]["name"], b.CONTAINER, 20)
                value = parse_progress_log(tail) if tail is not None else None
        self.progress[key] = (time.monotonic(), value)
        return value


def _rv(body: dict[str, Any]) -> int:
    try:
        return int(body["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


def _material(status: dict[str, Any]) -> str:
    """Status without what changes with the clock alone, so a pass that learnt nothing writes nothing."""
    return json.dumps({k: v for k, v in status.items() if k != "gpuSeconds"}, sort_keys=True, default=str)


def _read_progress_file(uri: str) -> dict[str, Any] | None:
    from kiln_artifacts.storage import resolve

    try:
        location = resolve(uri.rstrip("/"), field="spec.checkpoint.uri")
        with location.fs.open(f"{location.path}/progress.json", "rb") as f:
            value = json.loads(f.read(65536))
    except FileNotFoundError:
        return {}  # a source exists, nothing reported yet
    except Exception as e:  # unreachable store, partial JSON: no news this time
        log.debug("progress of %s unreadable: %s", uri, e)
        return {}
    return value if isinstance(value, dict) else {}


def parse_progress_log(text: str) -> dict[str, Any] | None:
    """The last ``kiln-progress {...}`` line of a log tail (the trainer logs every progress report)."""
    for line in reversed(text.splitlines()):
        at = line.find(PROGRESS_MARK)
        if at >= 0:
            try:
                value = json.loads(line[at + len(PROGRESS_MARK) :])
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


# ------------------------------------------------------------------------------------------------ kopf wiring


@kopf.on.startup()
async def start(memo: kopf.Memo, **_: Any) -> None:
    # Created here, in the operator-wide memo: each object's memo is a shallow copy of it, so all share one.
    controller = Controller(await Client.connect(), config_from_env())
    controller.queue.start()
    memo.trainingjobs = controller


def _controller(memo: kopf.Memo, tj_jobs: kopf.Index, tj_pods: kopf.Index) -> Controller:
    controller: Controller = memo.trainingjobs
    controller.jobs, controller.pods = tj_jobs, tj_pods  # kopf's indexes are only handed to handlers
    return controller


@kopf.on.event(*KIND.resource)
async def trainingjob_event(
    body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, tj_jobs: kopf.Index, tj_pods: kopf.Index, **_: Any
) -> None:
    controller = _controller(memo, tj_jobs, tj_pods)
    key = controller.observe(body, event.get("type"))
    if event.get("type") != "DELETED":
        controller.queue.request(key)


@kopf.on.event("batch", "v1", "jobs", **CHILD)
@kopf.on.event("", "v1", "pods", **CHILD)
async def child_event(
    namespace: str, labels: kopf.Labels, memo: kopf.Memo, tj_jobs: kopf.Index, tj_pods: kopf.Index, **_: Any
) -> None:
    controller = _controller(memo, tj_jobs, tj_pods)
    controller.queue.request((namespace, labels[b.TJ_LABEL]))


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("trainingjobs") is not None:
        await memo.trainingjobs.queue.stop()
