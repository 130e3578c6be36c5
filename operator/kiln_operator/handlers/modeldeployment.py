"""ModelDeployment controller: serves the artifact its source promotes (a ModelCompression's, a TrainingJob's, or a
URI) as one Deployment per revision behind one Service, scales it (spec.replicas, the scale subresource, an HPA),
and rolls new artifacts out as a canary with analysis of the servers' metrics and automatic rollback.

Same shape as the other controllers: kopf indexes of its Deployments and pods are the cache, events feed the work
queue, and a pure state machine (lifecycle.modeldeployment.decide) plans each pass. The handler's own I/O is the
analysis: Prometheus' HTTP API when KILN_PROMETHEUS_URL is set, else a direct scrape of the pods' /metrics.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import kopf
from kiln_artifacts.k8s import s3_env

from kiln_operator import analysis as am
from kiln_operator.builders import modeldeployment as b
from kiln_operator.controller import Controller, owned, trim
from kiln_operator.kube import Client
from kiln_operator.lifecycle import modeldeployment as life
from kiln_operator.lifecycle.plan import Plan
from kiln_operator.resources import MODEL_COMPRESSION, TRAINING_JOB
from kiln_operator.resources import MODEL_DEPLOYMENT as KIND

Key = tuple[str, str]
log = logging.getLogger("kiln.modeldeployment")
INSTANCE = "app.kubernetes.io/instance"
CHILD = {"labels": {b.MD_LABEL: kopf.PRESENT}}
# Prometheus target labels of a revision's pods (what a PodMonitor's podTargetLabels makes of the pod labels).
NAMESPACE_LABEL = "namespace"
MD_TARGET_LABEL = "kiln_dev_modeldeployment"
REVISION_TARGET_LABEL = "kiln_dev_revision"


def config_from_env(env: dict[str, str] | None = None) -> life.Config:
    env = dict(os.environ if env is None else env)
    secret = env.get("KILN_ARTIFACT_S3_SECRET")
    return life.Config(
        image_default=env.get("KILN_SERVER_IMAGE") or None,
        artifact_env=tuple(s3_env(secret, endpoint_url=env.get("KILN_ARTIFACT_S3_ENDPOINT")) if secret else []),
    )


def trim_deployment(body: kopf.Body | dict[str, Any]) -> dict[str, Any]:
    """What the state machine reads of a revision: its annotations (the rollout state), replicas, status."""
    out = trim(body)
    out["metadata"]["resourceVersion"] = body["metadata"].get("resourceVersion")
    out["spec"] = {"replicas": (body.get("spec") or {}).get("replicas")}
    return out


@kopf.index("apps", "v1", "deployments", **CHILD)
async def md_deployments(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, labels[INSTANCE]): trim_deployment(body)}


@kopf.index("", "v1", "pods", **CHILD)
async def md_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, dict[str, Any]]:
    return {(namespace, labels[INSTANCE]): trim(body)}


def _rv(obj: dict[str, Any]) -> int:
    try:
        return int(obj["metadata"].get("resourceVersion") or 0)
    except ValueError:
        return 0


class ModelDeployments(Controller):
    kind = KIND
    container = b.CONTAINER

    def __init__(self, client: Client, config: life.Config, memo: kopf.Memo, prometheus_url: str | None) -> None:
        super().__init__(client, config)
        self.memo = memo  # memo.modelcompressions / memo.trainingjobs: their caches hold the sources
        self.prometheus = am.Prometheus(prometheus_url) if prometheus_url else None
        self.applied: dict[Key, Any] = {}  # the generation whose children were last applied, per object
        self.sent: dict[tuple[Key, str, str], str] = {}  # (object, kind, name) -> what we last applied
        self.fresh: dict[Key, dict[str, dict[str, Any]]] = {}  # Deployments we applied, newer than the watch
        self.baselines: dict[tuple[Key, str, int, int], dict[str, am.Counters]] = {}  # direct-scrape windows
        # Baselines that could not be read: until when not to try again, and why (the analysis verdict says it).
        self.failed: dict[tuple[Key, str, int, int], tuple[float, str]] = {}

    def forget(self, key: Key) -> None:
        super().forget(key)
        self.applied.pop(key, None)
        self.fresh.pop(key, None)
        for k in [k for k in self.sent if k[0] == key]:
            del self.sent[k]
        for k in [k for k in self.baselines if k[0] == key]:
            del self.baselines[k]
        for k in [k for k in self.failed if k[0] == key]:
            del self.failed[k]

    def source_ref(self, body: kopf.Body | dict[str, Any]) -> tuple[str, str] | None:
        src = (body.get("spec") or {}).get("source") or {}
        if src.get("modelCompressionRef"):
            return MODEL_COMPRESSION.kind, src["modelCompressionRef"]["name"]
        if src.get("trainingJobRef"):
            return TRAINING_JOB.kind, src["trainingJobRef"]["name"]
        return None

    def deployments(self, key: Key) -> list[dict[str, Any]]:
        """The indexed Deployments, with the ones this process applied or deleted since, whichever is newer."""
        by_name = {d["metadata"]["name"]: d for d in self.jobs.get(key, [])}
        fresh = self.fresh.get(key, {})
        now = time.monotonic()
        for name, mine in list(fresh.items()):
            seen = by_name.get(name)
            if now - mine["when"] > 60 or (seen is not None and _rv(seen) >= _rv(mine["obj"])):
                del fresh[name]
            elif mine["obj"].get("deleted"):
                if seen is not None:
                    meta = {**seen["metadata"], "deletionTimestamp": "deleting"}
                    by_name[name] = {**seen, "metadata": meta}
            else:
                by_name[name] = mine["obj"]
        return list(by_name.values())

    def source(self, key: Key, body: dict[str, Any]) -> dict[str, Any] | None:
        ref = self.source_ref(body)
        if ref is None:
            return None
        cache = self.memo.modelcompressions if ref[0] == MODEL_COMPRESSION.kind else self.memo.trainingjobs
        return cache.objects.get((key[0], ref[1]))

    async def plan(self, key: Key, body: dict[str, Any], jobs: list[dict[str, Any]], pods: list[Any]) -> Plan:
        deployments = owned(self.deployments(key), body["metadata"].get("uid"))
        now = time.time()
        due = life.analysis_due(body, deployments, now)
        await self.keep_baselines(key, deployments, pods)
        if due is not None:
            due = await self.measure(key, body, deployments, pods, due)
        plan = life.decide(body, self.source(key, body), deployments, pods, now, self.config, due)
        static = [b.service(body), b.pod_disruption_budget(body)]
        if (body.get("spec") or {}).get("autoscaling"):
            static.append(b.autoscaler(body))
        elif self.applied.get(key) != body["metadata"].get("generation"):
            plan.delete.append(("autoscaling/v2", "HorizontalPodAutoscaler", b.base(key[1])))
        plan.apply += static  # after the Deployments: their pods start first
        return plan

    async def apply(self, key: Key, body: dict[str, Any], plan: Plan) -> None:
        namespace = key[0]
        for obj in plan.apply:
            kopf.adopt(obj, owner=body, strict=True, nested="spec.template")
            mark, text = (key, obj["kind"], obj["metadata"]["name"]), json.dumps(obj, sort_keys=True)
            if obj["kind"] != "Deployment" and self.sent.get(mark) == text:
                continue  # applied as is already (children other than Deployments are not watched)
            applied = await self.client.apply(obj)
            self.sent[mark] = text
            if obj["kind"] == "Deployment":
                entry = {"obj": trim_deployment(applied), "when": time.monotonic()}
                self.fresh.setdefault(key, {})[obj["metadata"]["name"]] = entry
        for api_version, kind, name in plan.delete:
            await self.client.delete(api_version, kind, namespace, name)
            self.sent.pop((key, kind, name), None)
            if kind == "Deployment":
                gone = {"obj": {"metadata": {"name": name, "resourceVersion": "0"}, "deleted": True}}
                self.fresh.setdefault(key, {})[name] = {**gone, "when": time.monotonic()}
        plan.apply, plan.delete = [], []
        await super().apply(key, body, plan)
        self.applied[key] = body["metadata"].get("generation")

    def _targets(self, pods: list[Any], revision: str) -> list[str]:
        urls = []
        for pod in pods:
            st, labels = pod.get("status") or {}, (pod["metadata"].get("labels") or {})
            if labels.get(b.REVISION_LABEL) == revision and st.get("podIP") and st.get("phase") == "Running":
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

    async def measure(
        self, key: Key, body: dict[str, Any], deployments: list[dict[str, Any]], pods: list[Any], due: life.Analysis
    ) -> life.Analysis:
        candidate, stable = self._revision_keys(deployments, due.revision)
        if candidate is None:
            return due
        samples: list[am.Sample | None] = []
        try:
            for which in (candidate, stable):
                if which is None:
                    samples.append(None)
                elif self.prometheus is not None:
                    selector = {
                        NAMESPACE_LABEL: key[0],
                        MD_TARGET_LABEL: b.base(key[1]),
                        REVISION_TARGET_LABEL: which,
                    }
                    samples.append(await self.prometheus.sample(selector, due.window))
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


@kopf.on.startup()
async def start(memo: kopf.Memo, **_: Any) -> None:
    controller = ModelDeployments(
        await Client.connect(), config_from_env(), memo, os.environ.get("KILN_PROMETHEUS_URL") or None
    )
    controller.queue.start()
    memo.modeldeployments = controller


def _controller(memo: kopf.Memo, md_deployments: kopf.Index, md_pods: kopf.Index) -> ModelDeployments:
    controller: ModelDeployments = memo.modeldeployments
    controller.jobs, controller.pods = md_deployments, md_pods
    return controller


@kopf.on.event(*KIND.resource)
async def modeldeployment_event(
    body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, md_deployments: kopf.Index, md_pods: kopf.Index, **_: Any
) -> None:
    controller = _controller(memo, md_deployments, md_pods)
    echo = controller.echo(body)
    key = controller.observe(body, event.get("type"))
    if event.get("type") != "DELETED" and not echo:
        controller.queue.request(key)


@kopf.on.event(*MODEL_COMPRESSION.resource)
@kopf.on.event(*TRAINING_JOB.resource)
async def source_event(
    body: kopf.Body,
    namespace: str,
    name: str,
    memo: kopf.Memo,
    md_deployments: kopf.Index,
    md_pods: kopf.Index,
    **_: Any,
) -> None:
    # The source promoted (or lost) an artifact: the deployments that follow it take a look.
    controller = _controller(memo, md_deployments, md_pods)
    for key in controller.following(namespace, body.get("kind", ""), name):
        # After a moment: the source's own controller updates its cache in its handler of this same event.
        controller.queue.request(key, coalesce=0.2)


@kopf.on.event("apps", "v1", "deployments", **CHILD)
@kopf.on.event("", "v1", "pods", **CHILD)
async def child_event(
    namespace: str, labels: kopf.Labels, memo: kopf.Memo, md_deployments: kopf.Index, md_pods: kopf.Index, **_: Any
) -> None:
    _controller(memo, md_deployments, md_pods).queue.request((namespace, labels[INSTANCE]), coalesce=0.2)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    if memo.get("modeldeployments") is not None:
        await memo.modeldeployments.stop()
