"""ModelDeployment controller: serves the artifact its source promotes (a ModelCompression's, a TrainingJob's, or a
URI) as one Deployment per revision behind one Service, scales it (spec.replicas, the scale subresource, an HPA),
and rolls new artifacts out as a canary with analysis of the servers' metrics and automatic rollback.

The pure state machine (lifecycle.modeldeployment.decide) plans each pass; the controller's own I/O is reading the
servers' metrics, for a canary step's analysis and for the serving revision's drift: Prometheus' HTTP API when the
operator is configured with one, else a direct scrape of the pods' /metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Mapping
from typing import Any

from kiln_operator import analysis as am
from kiln_operator import labels
from kiln_operator.builders import modeldeployment as b
from kiln_operator.config import Config
from kiln_operator.controller import ApplyOwner, Key, Obj
from kiln_operator.kube import Client
from kiln_operator.lifecycle import modeldeployment as life
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.resources import MODEL_COMPRESSION, MODEL_DEPLOYMENT, TRAINING_JOB

log = logging.getLogger("kiln.modeldeployment")
# Prometheus target labels of a revision's pods (what a PodMonitor's podTargetLabels makes of the pod labels).
NAMESPACE_LABEL = "namespace"
MD_TARGET_LABEL = "kiln_dev_modeldeployment"
REVISION_TARGET_LABEL = "kiln_dev_revision"


class ModelDeployments(ApplyOwner):
    kind = MODEL_DEPLOYMENT
    container = b.CONTAINER
    owner_label = labels.MODELDEPLOYMENT
    key_label = labels.INSTANCE  # the owner label's value is the name's DNS-label form
    sources = (MODEL_COMPRESSION, TRAINING_JOB)

    def __init__(self, client: Client, config: Config) -> None:
        super().__init__(client, config)
        self.life = config.modeldeployment()
        self.prometheus = am.Prometheus(config.prometheus_url) if config.prometheus_url else None
        self.applied: dict[Key, Any] = {}  # the generation whose children were last applied, per object
        self.baselines: dict[tuple[Key, str, int, int], dict[str, am.Counters]] = {}  # direct-scrape windows
        # Baselines that could not be read: until when not to try again, and why (the analysis verdict says it).
        self.failed: dict[tuple[Key, str, int, int], tuple[float, str]] = {}

    def forget(self, key: Key) -> None:
        super().forget(key)
        self.applied.pop(key, None)
        for k in [k for k in self.baselines if k[0] == key]:
            del self.baselines[k]
        for k in [k for k in self.failed if k[0] == key]:
            del self.failed[k]

    def source_ref(self, body: Mapping[str, Any]) -> tuple[str, str] | None:
        src = (body.get("spec") or {}).get("source") or {}
        if src.get("modelCompressionRef"):
            return MODEL_COMPRESSION.kind, src["modelCompressionRef"]["name"]
        if src.get("trainingJobRef"):
            return TRAINING_JOB.kind, src["trainingJobRef"]["name"]
        return None

    async def plan(self, key: Key, body: Obj, deployments: list[Obj], pods: list[Obj]) -> Plan:
        now = time.time()
        due = life.analysis_due(body, deployments, now)
        await self.keep_baselines(key, deployments, pods)
        if due is not None:
            due = await self.measure(key, body, deployments, pods, due)
        watch = life.monitoring_due(body, deployments, now)
        drift = await self.drift(key, deployments, pods, watch) if watch is not None else None
        plan = life.decide(body, self.source(key, body), deployments, pods, now, self.life, due, drift)
        static = [b.service(body), b.pod_disruption_budget(body)]
        if (body.get("spec") or {}).get("autoscaling"):
            static.append(b.autoscaler(body))
        elif self.applied.get(key) != body["metadata"].get("generation"):
            plan.delete.append(("autoscaling/v2", "HorizontalPodAutoscaler", b.base(key[1])))
        plan.apply += static  # after the Deployments: their pods start first
        return plan

    async def carry_out(self, key: Key, body: Obj, plan: Plan) -> None:
        await super().carry_out(key, body, plan)
        self.applied[key] = body["metadata"].get("generation")

    def _targets(self, pods: list[Any], revision: str) -> list[str]:
        urls = []
        for pod in pods:
            st, pod_labels = pod.get("status") or {}, (pod["metadata"].get("labels") or {})
            if pod_labels.get(labels.REVISION) == revision and st.get("podIP") and st.get("phase") == "Running":
                urls.append(f"http://{st['podIP']}:{b.METRICS_PORT}/metrics")
        return urls

    def _revision_keys(self, deployments: list[dict[str, Any]], number: int) -> tuple[str | None, str | None]:
        revs = life.revisions(deployments)
        candidate = next((r.key for r in revs if r.number == number), None)
        stable = next((r.key for r in reversed(revs) if r.role == "stable"), None)
        return candidate, stable

    async def keep_baselines(self, key: Key, deployments: list[dict[str, Any]], pods: list[Any]) -> None:
        """Without Prometheus, a canary step's window starts with a scrape of its pods' counters."""
        if self.prometheus is not None:
            return
        live = {(r.number, r.step) for r in life.revisions(deployments) if r.role == "candidate"}
        for table in (self.baselines, self.failed):
            for k in [k for k in table if k[0] == key and (k[2], k[3]) not in live]:
                del table[k]  # windows of steps and revisions that are over
        for rev in life.revisions(deployments):
            if rev.role != "candidate" or rev.step_started is None:
                continue
            _, stable = self._revision_keys(deployments, rev.number)
            for which in (rev.key, stable):
                mark = (key, which or "", rev.number, rev.step)
                if not which or mark in self.baselines or time.monotonic() < self.failed.get(mark, (0, ""))[0]:
                    continue
                try:
                    self.baselines[mark] = await am.scrape(self._targets(pods, which))
                except am.AnalysisUnavailable as e:
                    self.failed[mark] = (time.monotonic() + 30, str(e))  # unreachable pods: not on every pass
                    log.info("no baseline for %s/%s revision %s: %s", *key, which, e)

    def _selector(self, key: Key, revision: str) -> dict[str, str]:
        return {NAMESPACE_LABEL: key[0], MD_TARGET_LABEL: b.base(key[1]), REVISION_TARGET_LABEL: revision}

    async def drift(self, key: Key, deployments: list[Obj], pods: list[Any], number: int) -> life.Monitoring:
        """The drift gauges of revision `number`'s servers."""
        which = next((r.key for r in life.revisions(deployments) if r.number == number), None)
        if which is None:
            return life.Monitoring(number, error="revision not found")
        try:
            if self.prometheus is not None:
                return life.Monitoring(number, tuple(await self.prometheus.drift(self._selector(key, which))))
            scraped = await am.scrape(self._targets(pods, which))
        except am.AnalysisUnavailable as e:
            return life.Monitoring(number, error=str(e)[:512])
        return life.Monitoring(number, tuple(c.drift for c in scraped.values() if c.drift is not None))

    async def measure(
        self, key: Key, body: dict[str, Any], deployments: list[dict[str, Any]], pods: list[Any], due: life.Analysis
    ) -> life.Analysis:
        candidate, stable = self._revision_keys(deployments, due.revision)
        if candidate is None:
            return due
        samples: list[am.Sample | None] = []
        by_class = "maxPredictionDrift" in (((body.get("spec") or {}).get("rollout") or {}).get("analysis") or {})
        try:
            for which in (candidate, stable):
                if which is None:
                    samples.append(None)
                elif self.prometheus is not None:
                    selector = self._selector(key, which)
                    sample = await self.prometheus.sample(selector, due.window)
                    if by_class:
                        predictions = await self.prometheus.predictions(selector, due.window)
                        sample = dataclasses.replace(sample, predictions=predictions or None)
                    samples.append(sample)
                else:
                    base = self.baselines.get((key, which, due.revision, due.step))
                    if base is None:
                        why = self.failed.get((key, which, due.revision, due.step), (0, "not taken yet"))[1]
                        raise am.AnalysisUnavailable(f"no baseline scrape of revision {which} for this step: {why}")
                    samples.append(am.since(await am.scrape(self._targets(pods, which)), base))
        except am.AnalysisUnavailable as e:
            return life.Analysis(due.revision, due.step, due.window, error=str(e)[:512])
        return life.Analysis(due.revision, due.step, due.window, candidate=samples[0], stable=samples[1])

    async def stop(self) -> None:
        if self.prometheus is not None:
            await self.prometheus.close()
        await super().stop()
