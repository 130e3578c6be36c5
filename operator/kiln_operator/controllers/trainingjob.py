"""TrainingJob controller: each pass runs the pure state machine (lifecycle.trainingjob.decide) on the cached
TrainingJob, its Jobs and pods, the trainer's latest progress and, for a queued job, its Kueue Workload: the two
things it reads itself.

Level-based: every event of a TrainingJob, of its Jobs or of its pods asks for a pass of that TrainingJob; the
pass looks only at the current state. Deletion is owner-reference garbage collection.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from pathlib import Path
from typing import Any

import kopf

from kiln_artifacts.contract import parse_progress_log
from kiln_artifacts.uri import parse_uri
from kiln_operator import labels
from kiln_operator.builders import trainingjob as b
from kiln_operator.config import Config
from kiln_operator.controller import JobOwner, Key, trim
from kiln_operator.kube import ApiError, Client
from kiln_operator.lifecycle import trainingjob as life
from kiln_operator.lifecycle.plan import KUEUE_API
from kiln_operator.lifecycle.pods import attempt_of
from kiln_operator.resources import TRAINING_JOB

log = logging.getLogger("kiln.trainingjob")


class TrainingJobs(JobOwner):
    kind = TRAINING_JOB
    container = b.CONTAINER
    owner_label = key_label = labels.TRAININGJOB

    def __init__(self, client: Client, config: Config) -> None:
        super().__init__(client, config)
        self.life = config.trainingjob()
        self.progress: dict[Key, tuple[float, dict[str, Any] | None]] = {}
        # The last Workload read, with what it was read for: (Job uid, Job resourceVersion, spec.suspend).
        self.workloads: dict[Key, tuple[tuple[str, str, bool], dict[str, Any] | None]] = {}

    @classmethod
    def trim_pod(cls, body: kopf.Body) -> dict[str, Any]:
        pod = trim(body)
        kept = (labels.TRAININGJOB, labels.ATTEMPT, labels.CONTROLLER_UID)
        pod["metadata"]["labels"] = {k: v for k, v in (pod["metadata"].get("labels") or {}).items() if k in kept}
        return pod

    def forget(self, key: Key) -> None:
        super().forget(key)
        self.progress.pop(key, None)
        self.workloads.pop(key, None)

    async def plan(self, key: Key, body: dict[str, Any], jobs: list[dict[str, Any]], pods: list[Any]) -> life.Plan:
        progress = await self._progress(key, body, pods)
        workload = await self._workload(key, body, jobs)
        return life.decide(body, jobs, pods, progress, time.time(), self.life, workload)

    async def _workload(self, key: Key, tj: dict[str, Any], jobs: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The Kueue Workload of the newest attempt's Job, for a TrainingJob that names a queue: read, not
        watched. None without Kueue: the Job then waits, suspended, as it says.

        While the Job waits (suspended) every pass reads it: Kueue's verdict changes the Workload only. Once
        admitted, what matters of it changes with the Job (Kueue suspends what it evicts), so the last read
        serves until the Job or spec.suspend changes: a running job's progress passes cost no request."""
        spec = tj.get("spec") or {}
        if not (spec.get("scheduling") or {}).get("queueName") or not jobs:
            return None
        newest = max(jobs, key=attempt_of)
        uid = newest["metadata"].get("uid")
        if not uid:
            return None
        stamp = (uid, str(newest["metadata"].get("resourceVersion")), bool(spec.get("suspend")))
        cached = self.workloads.get(key)
        if cached and cached[0] == stamp and not (newest.get("spec") or {}).get("suspend"):
            return cached[1]
        url, plural = self.client.path(KUEUE_API, "Workload", key[0])
        value: dict[str, Any] | None = None
        try:
            found = await self.client.get(f"{url}?labelSelector={labels.KUEUE_JOB_UID}%3D{uid}", plural)
        except ApiError as e:
            if e.status not in (403, 404):
                raise
            log.debug("workloads of %s/%s unreadable: %s", *key, e)  # no Kueue, or not allowed: as if none yet
        else:
            items = found.get("items") or []
            value = trim_workload(items[0]) if items else None
        self.workloads[key] = (stamp, value)
        return value

    async def _progress(self, key: Key, tj: dict[str, Any], pods: list[dict[str, Any]]) -> dict[str, Any] | None:
        """The trainer's latest progress, read at most every progress_poll_seconds: from progress.json next to
        the checkpoints when the operator can read that store (file://, s3://), else from rank 0's log lines.
        None when there is no source (then no progress deadline either)."""
        status = tj.get("status") or {}
        if status.get("phase") not in ("Running", "Restarting", "Pending"):
            return None
        cached = self.progress.get(key)
        if cached and time.monotonic() - cached[0] < self.life.progress_poll_seconds:
            return cached[1]
        value: dict[str, Any] | None = None
        uri = (b.resolve_locations(tj, self.life.artifact_root).get("checkpoint") or {}).get("uri")
        if uri and self._readable_here(uri):
            value = await asyncio.to_thread(_read_progress_file, uri)
        else:
            attempt = str(status.get("attempt") or "")
            rank0 = next(
                (
                    p
                    for p in pods
                    if p["metadata"].get("labels", {}).get(labels.ATTEMPT) == attempt
                    and (p["metadata"].get("annotations") or {}).get(labels.COMPLETION_INDEX) == "0"
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

    def _readable_here(self, uri: str) -> bool:
        """Whether the operator reads this store itself: file:// and s3:// always, pvc:// when the claim is mounted
        in its pod too (an install with an artifact store, manifests/overlays/local)."""
        parsed = parse_uri(uri)
        if parsed.scheme == "pvc":
            return (Path(self.config.pvc_root) / parsed.authority).is_dir()
        return parsed.scheme in ("file", "s3")


def trim_workload(wl: dict[str, Any]) -> dict[str, Any]:
    """What the state machine reads of a Workload: whose it is, whether it is active, its conditions and Kueue's
    eviction counts."""
    out = trim(wl)
    out["spec"] = {"active": (wl.get("spec") or {}).get("active", True)}
    st = wl.get("status") or {}
    out["status"] = {"conditions": st.get("conditions") or [], "schedulingStats": st.get("schedulingStats") or {}}
    return out


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
