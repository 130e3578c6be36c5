"""ModelDeployment controller: serves the artifact its source promotes (a ModelCompression's, a TrainingJob's, or a
URI) as one Deployment per revision behind one Service, scales it (spec.replicas, the scale subresource, an HPA),
and rolls new artifacts out as a canary with analysis of the servers' metrics and automatic rollback.

The pure state machine (lifecycle.modeldeployment.decide) plans each pass; the controller's own I/O is reading the
servers' metrics, for a canary step's analysis and for the serving revision's drift: Prometheus' HTTP API when the
operator is configured with one, else a direct scrape of the pods' /metrics.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Mapping
from typing import Any

from kiln_operator import analysis as am
from kiln_operator import labels
from kiln_operator.builders import modeldeployment as b
from kiln_operator.config import Config
from kiln_operator.controller import ApplyOwner, Key, Obj
from kiln_operator.kube import ApiError, Client
from kiln_operator.lifecycle import modeldeployment as life
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.resources import MODEL_COMPRESSION, MODEL_DEPLOYMENT, TRAINING_JOB

log = logging.getLogger("kiln.modeldeployment")
# Prometheus target labels of a revision's pods (what a PodMonitor's podTargetLabels makes of the pod labels).
NAMESPACE_LABEL = "namespace"
MD_TARGET_LABEL = "kiln_dev_modeldeployment"
REVISION_TARGET_LABEL = "kiln_dev_revision"
RBAC = "rbac.authorization.k8s.io/v1"
# How often the servers' ClusterRoleBindings are checked for a ModelDeployment that is gone: the first round
# after a restart also catches deletions the operator missed while it was down.
SWEEP_SECONDS = 300.0


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
        self._swept = asyncio.Event()  # set: sweep the servers' ClusterRoleBindings now
        self._sweeper: asyncio.Task[None] | None = None

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
        changed = self.applied.get(key) != body["metadata"].get("generation")
        static = [
            b.service(body),
            b.pod_disruption_budget(body),
            b.network_policy(body, self.config.namespace, self.config.monitoring_namespaces),
        ]
        if (body.get("spec") or {}).get("autoscaling"):
            static.append(b.autoscaler(body))
        elif changed:
            plan.delete.append(("autoscaling/v2", "HorizontalPodAutoscaler", b.base(key[1])))
        if b.auth(body):
            # Before the Deployments: a server that starts checks callers at once.
            plan.apply[:0] = [b.service_account(body), b.access_review_binding(body)]
        elif changed:
            sa = b.service_account_name(key[1])
            plan.delete += [
                (RBAC, "RoleBinding", f"{sa}-access-review"),
                ("v1", "ServiceAccount", sa),
            ]
        plan.apply += static  # after the Deployments: their pods start first
        return plan

    async def carry_out(self, key: Key, body: Obj, plan: Plan) -> None:
        await self.bind_token_review(key, body)
        await super().carry_out(key, body, plan)
        self.applied[key] = body["metadata"].get("generation")

    async def bind_token_review(self, key: Key, body: Obj) -> None:
        """The servers' ClusterRoleBinding to TokenReview: cluster-scoped, so applied without an owner reference
        (and removed by the sweep once its ModelDeployment is gone)."""
        crb = b.token_review_binding(body)
        name = crb["metadata"]["name"]
        mark = (key, "ClusterRoleBinding", name)
        if b.auth(body):
            text = json.dumps(crb, sort_keys=True)
            if self.sent.get(mark) != text:
                await self.client.apply(crb)
                self.sent[mark] = text
        elif self.applied.get(key) != body["metadata"].get("generation"):
            await self.client.delete(RBAC, "ClusterRoleBinding", "", name)
            self.sent.pop(mark, None)

    async def sweep(self) -> int:
        """Delete the servers' ClusterRoleBindings whose ModelDeployment is gone (or is another one by that name):
        the garbage collector cannot, as no namespaced owner can own them. Returns how many it deleted."""
        found = await self.client.get(
            f"/apis/rbac.authorization.k8s.io/v1/clusterrolebindings?labelSelector={labels.OWNER_NAMESPACE}",
            "clusterrolebindings",
        )
        gone = 0
        for crb in found.get("items") or []:
            meta = crb["metadata"]
            namespace = (meta.get("labels") or {}).get(labels.OWNER_NAMESPACE)
            name = (meta.get("labels") or {}).get(labels.INSTANCE)
            uid = (meta.get("annotations") or {}).get(labels.OWNER_UID)
            if not namespace or not name:
                continue
            # A list by name, not a GET: the operator lists and watches, and needs no other verb for this.
            try:
                mds = await self.client.get(
                    f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/modeldeployments"
                    f"?fieldSelector=metadata.name%3D{name}",
                    "modeldeployments",
                )
            except ApiError as e:
                if e.status != 403:
                    raise
                continue  # a namespace this operator does not watch (a namespaced install): not ours to judge
            md = next(iter(mds.get("items") or []), None)
            owner = md["metadata"].get("uid") if md else None
            auth = b.auth(md) if md else False
            stale = owner is None or (uid and owner != uid) or not auth
            if stale and await self.client.delete(RBAC, "ClusterRoleBinding", "", meta["name"]):
                log.info("deleted %s: ModelDeployment %s/%s is gone or no longer asks", meta["name"], namespace, name)
                gone += 1
        return gone

    def observe(self, body: Any, event_type: str | None) -> Key:
        key = super().observe(body, event_type)
        if event_type == "DELETED" and b.auth(body):
            self._swept.set()  # its binding goes now, not at the next round
        return key

    async def _sweeping(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._swept.wait(), SWEEP_SECONDS)
            self._swept.clear()
            try:
                await self.sweep()
            except Exception:  # the next round tries again; a sweep never stops the controller
                log.warning("could not sweep the servers' ClusterRoleBindings", exc_info=True)

    def start(self) -> None:
        super().start()
        self._sweeper = asyncio.get_running_loop().create_task(self._sweeping())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self.prometheus is not None:
            await self.prometheus.close()
        await super().stop()

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
