"""ModelCompression controller: waits for its source (a TrainingJob's ready model, or a URI), runs the compressor
as a Job per source artifact, reflects the report, applies the gates and promotes into the registry
(automatically, or when spec.promotion.approvedDigest names the candidate). The promotion is the one thing it does
itself; the pure state machine (lifecycle.modelcompression.decide) plans the rest of each pass."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any

from kiln_artifacts.registry import Registry
from kiln_operator import labels
from kiln_operator.builders import modelcompression as b
from kiln_operator.config import Config
from kiln_operator.controller import JobOwner, Key
from kiln_operator.kube import Client
from kiln_operator.lifecycle import modelcompression as life
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.resources import MODEL_COMPRESSION, TRAINING_JOB


class ModelCompressions(JobOwner):
    kind = MODEL_COMPRESSION
    container = b.CONTAINER
    owner_label = key_label = labels.MODELCOMPRESSION
    sources = (TRAINING_JOB,)

    def __init__(self, client: Client, config: Config) -> None:
        super().__init__(client, config)
        self.life = config.modelcompression()

    def source_ref(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        ref = (((body.get("spec") or {}).get("source") or {}).get("trainingJobRef") or {}).get("name")
        return (TRAINING_JOB.kind, ref) if ref else None

    async def plan(self, key: Key, body: dict[str, Any], jobs: list[dict[str, Any]], pods: list[Any]) -> Plan:
        return life.decide(body, self.source(key, body), jobs, pods, time.time(), self.life)

    async def promote(self, body: dict[str, Any], plan: Plan) -> None:
        """Record the candidate as the next version of the model (idempotent: a retried pass whose promotion
        already happened gets the same version back)."""
        assert plan.promote is not None
        uri, name = plan.promote
        meta = body["metadata"]
        registry = Registry(self.life.registry_root)
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
        if version.signed_by:
            plan.status["promoted"]["signedBy"] = list(version.signed_by)
