"""ModelCompression controller: waits for its source (a TrainingJob's ready model, or a URI), runs the compressor
as a Job per source artifact, reflects the report, applies the gates and promotes into the registry
(automatically, or when spec.promotion.approvedDigest names the candidate). Same shape as the TrainingJob
controller: kopf indexes are the cache, events feed the work queue, a pure state machine plans each pass."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import kopf
from kiln_artifacts.k8s import s3_env
from kiln_artifacts.registry import Registry

from kiln_operator.builders import modelcompression as b
from kiln_operator.controller import Controller, trim
from kiln_operator.kube import Client
from kiln_operator.lifecycle import modelcompression as life
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.resources import MODEL_COMPRESSION as KIND
from kiln_operator.resources import TRAINING_JOB

Key = tuple[str, str]
CHILD = {"labels": {b.MC_LABEL: kopf.PRESENT}}


def config_from_env(env: dict[str, str] | None = None) -> life.Config:
    env = dict(os.environ if env is None else env)
    root = env.get("KILN_ARTIFACT_ROOT") or None
    secret = env.get("KILN_ARTIFACT_S3_SECRET")
    return life.Config(
        image_default=env.get("KILN_COMPRESSOR_IMAGE") or None,
        artifact_root=root,
        registry_root=env.get("KILN_REGISTRY_ROOT") or (f"{root.rstrip('/')}/registry" if root else None),
        artifact_env=tuple(s3_env(secret, endpoint_url=env.get("KILN_ARTIFACT_S3_ENDPOINT")) if secret else []),
    )


@kopf.index("batch", "v1", "jobs", **CHILD)
async def mc_jobs(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, labels[b.MC_LABEL]): trim(body)}


@kopf.index("", "v1", "pods", **CHILD)
async def mc_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, labels[b.MC_LABEL]): trim(body)}


class ModelCompressions(Controller):
    kind = KIND
    container = b.CONTAINER

    def __init__(self, client: Client, config: life.Config, memo: kopf.Memo) -> None:
        super().__init__(client, config)
        self.memo = memo  # memo.trainingjobs, the TrainingJob controller: its cache holds the sources

    def source_ref(self, body: kopf.Body | dict[str, Any]) -> tuple[str, str] | None:
        ref = (((body.get("spec") or {}).get("source") or {}).get("trainingJobRef") or {}).get("name")
        return (TRAINING_JOB.kind, ref) if ref else None

    async def plan(self, key: Key, body: dict[str, Any], jobs: list[dict[str, Any]], pods: list[Any]) -> Plan:
        ref = self.source_ref(body)
        tj = self.memo.trainingjobs.objects.get((key[0], ref[1])) if ref else None
        return life.decide(body, tj, jobs, pods, time.time(), self.config)

    async def promote(self, body: dict[str, Any], plan: Plan) -> None:
        """Record the candidate as the next version of the model (idempotent: a retried pass whose promotion
        already happened gets the same version back)."""
        assert plan.promote is not None
        uri, name = plan.promote
        meta = body["metadata"]
        registry = Registry(self.config.registry_root)
        version = await asyncio.to_thread(
            registry.promote,
            uri,
            name,
            expected_digest=(plan.status.get("candidate") or {}).get("digest"),
            promoted_by=f"ModelCompression {meta['namespace']}/{meta['name']}",
            unless_latest=True,
        )
        plan.status["promoted"] = {
            "uri": version.uri,
            "digest": version.digest,
            "shortDigest": version.digest[7:19],
            "modelName": version.name,
            "version": version.version,
        }


@kopf.on.startup()
async def start(memo: kopf.Memo, **_: Any) -> None:
    controller = ModelCompressions(await Client.connect(), config_from_env(), memo)
    controller.queue.start()
    memo.modelcompressions = controller


def _controller(memo: kopf.Memo, mc_jobs: kopf.Index, mc_pods: kopf.Index) -> ModelCompressions:
    controller: ModelCompressions = memo.modelcompressions
    controller.jobs, controller.pods = mc_jobs, mc_pods
    return controller


@kopf.on.event(*KIND.resource)
async def modelcompression_event(
    body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, mc_jobs: kopf.Index, mc_pods: kopf.Index, **_: Any
) -> None:
    controller = _controller(memo, mc_jobs, mc_pods)
    echo = controller.echo(body)
    key = controller.observe(body, event.get("type"))
    if event.get("type") != "DELETED" and not echo:
        controller.queue.request(key)


@kopf.on.event(*TRAINING_JOB.resource)
async def source_event(
    namespace: str, name: str, memo: kopf.Memo, mc_jobs: kopf.Index, mc_pods: kopf.Index, **_: Any
) -> None:
    # A TrainingJob changed (its model became ready, it re-ran): the compressions of its model take a look.
    controller = _controller(memo, mc_jobs, mc_pods)
    for key in controller.following(namespace, TRAINING_JOB.kind, name):
        controller.queue.request(key)


@kopf.on.event("batch", "v1", "jobs", **CHILD)
@kopf.on.event("", "v1", "pods", **CHILD)
async def child_event(
    namespace: str, labels: kopf.Labels, memo: kopf.Memo, mc_jobs: kopf.Index, mc_pods: kopf.Index, **_: Any
) -> None:
    _controller(memo, mc_jobs, mc_pods).queue.request((namespace, labels[b.MC_LABEL]), coalesce=0.2)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("modelcompressions") is not None:
        await memo.modelcompressions.stop()
