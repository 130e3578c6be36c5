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
from pathlib import Path
from typing import Any

import kopf
from kiln_artifacts.k8s import s3_env
from kiln_artifacts.uri import DEFAULT_PVC_ROOT, PVC_ROOT_ENV, parse_uri

from kiln_operator.builders import trainingjob as b
from kiln_operator.controller import CONTROLLER_UID, Controller, trim
from kiln_operator.kube import Client
from kiln_operator.lifecycle import trainingjob as life
from kiln_operator.resources import TRAINING_JOB as KIND

Key = tuple[str, str]
log = logging.getLogger("kiln.trainingjob")
CHILD = {"labels": {b.TJ_LABEL: kopf.PRESENT}}
PROGRESS_MARK = "kiln-progress "
# A Job's pods change several times in a second when they start (created, scheduled, running): one pass for all.
CHILD_COALESCE_SECONDS = 0.2


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


@kopf.index("batch", "v1", "jobs", **CHILD)
async def tj_jobs(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, labels[b.TJ_LABEL]): trim(body, suspend=True)}


@kopf.index("", "v1", "pods", **CHILD)
async def tj_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]]:
    pod = trim(body)
    pod["metadata"].pop("labels", None)
    pod["metadata"]["labels"] = {k: v for k, v in labels.items() if k in (b.TJ_LABEL, b.ATTEMPT_LABEL, CONTROLLER_UID)}
    return {(namespace, labels[b.TJ_LABEL]): pod}


class TrainingJobs(Controller):
    kind = KIND
    container = b.CONTAINER

    def __init__(self, client: Client, config: life.Config) -> None:
        super().__init__(client, config)
        self.progress: dict[Key, tuple[float, dict[str, Any] | None]] = {}

    def service_name(self, name: str) -> str:
        return b.service_name(name)

    def forget(self, key: Key) -> None:
        super().forget(key)
        self.progress.pop(key, None)

    async def plan(self, key: Key, body: dict[str, Any], jobs: list[dict[str, Any]], pods: list[Any]) -> life.Plan:
        progress = await self._progress(key, body, pods)
        return life.decide(body, jobs, pods, progress, time.time(), self.config)

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
        if uri and _readable_here(uri):
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
                # {}: a source exists, nothing reported yet (the deadline runs from the attempt's start).
                value = (parse_progress_log(tail) if tail is not None else None) or {}
        self.progress[key] = (time.monotonic(), value)
        return value


def _readable_here(uri: str) -> bool:
    """Whether the operator reads this store itself: file:// and s3:// always, pvc:// when the claim is mounted in
    its pod too (an install with an artifact store, manifests/overlays/local)."""
    parsed = parse_uri(uri)
    if parsed.scheme == "pvc":
        return (Path(os.environ.get(PVC_ROOT_ENV) or DEFAULT_PVC_ROOT) / parsed.authority).is_dir()
    return parsed.scheme in ("file", "s3")


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
    controller = TrainingJobs(await Client.connect(), config_from_env())
    controller.queue.start()
    memo.trainingjobs = controller


def _controller(memo: kopf.Memo, tj_jobs: kopf.Index, tj_pods: kopf.Index) -> TrainingJobs:
    controller: TrainingJobs = memo.trainingjobs
    controller.jobs, controller.pods = tj_jobs, tj_pods  # kopf's indexes are only handed to handlers
    return controller


@kopf.on.event(*KIND.resource)
async def trainingjob_event(
    body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, tj_jobs: kopf.Index, tj_pods: kopf.Index, **_: Any
) -> None:
    controller = _controller(memo, tj_jobs, tj_pods)
    echo = controller.echo(body)
    key = controller.observe(body, event.get("type"))
    if event.get("type") != "DELETED" and not echo:
        controller.queue.request(key)


@kopf.on.event("batch", "v1", "jobs", **CHILD)
@kopf.on.event("", "v1", "pods", **CHILD)
async def child_event(
    namespace: str, labels: kopf.Labels, memo: kopf.Memo, tj_jobs: kopf.Index, tj_pods: kopf.Index, **_: Any
) -> None:
    controller = _controller(memo, tj_jobs, tj_pods)
    controller.queue.request((namespace, labels[b.TJ_LABEL]), coalesce=CHILD_COALESCE_SECONDS)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("trainingjobs") is not None:
        await memo.trainingjobs.stop()
