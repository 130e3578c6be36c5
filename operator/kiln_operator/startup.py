"""The operator process: kopf's settings, one startup that reads the configuration once, logs in once and builds
one API client and the three controllers, and the kopf handlers every kind registers the same way.

``kopf run -m kiln_operator.startup`` (what ``kiln-operator`` runs) imports this module, which registers the
handlers; nothing else in the package registers any."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from typing import Any

import kopf

from kiln_operator import kube, labels, metrics
from kiln_operator.config import Config
from kiln_operator.controller import CHILD_COALESCE_SECONDS, Controller, Key
from kiln_operator.controllers.modelcompression import ModelCompressions
from kiln_operator.controllers.modeldeployment import ModelDeployments
from kiln_operator.controllers.trainingjob import TrainingJobs
from kiln_operator.status import rfc3339

# In dependency order: a kind's handlers run after those of the kinds it follows, whose caches it reads.
CONTROLLERS: tuple[type[Controller], ...] = (TrainingJobs, ModelCompressions, ModelDeployments)


class NoDiffBase(kopf.AnnotationsDiffBaseStorage):
    """kopf builds a diff base (a deep copy of the object) on every event, for on.create/update/field handlers.
    Kiln has none (event and index handlers only, checked in the unit tests), so the copy is never read: about
    16 % of the operator's CPU at 1,000 TrainingJobs (py-spy, bench/trainingjobs.py)."""

    def build(self, *, body: kopf.Body, extra_fields: Any = None) -> Any:
        return {}


@kopf.on.startup()
async def start(settings: kopf.OperatorSettings, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    config = Config.from_env()
    # Our own finalizer and annotation prefix from day one: changing storage later re-handles every object.
    settings.persistence.finalizer = labels.FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=labels.PREFIX, v1=False)
    settings.persistence.diffbase_storage = NoDiffBase(prefix=labels.PREFIX, key="last-handled-configuration", v1=False)
    # Silent watch stalls (kopf #585, #698, #1120) are caught by the inactivity timeout (kopf >= 1.44, with
    # bookmarks); the server-side timeout also recycles each watch every few minutes.
    settings.watching.inactivity_timeout = 70
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 10
    # Short request timeout: a stuck API call fails fast and kopf retries it, instead of hanging 5 minutes.
    settings.networking.request_timeout = 30
    settings.networking.connect_timeout = 10
    # Server-side filtering: the operator caches only the Jobs, Deployments and pods it made, not every pod.
    for group, version, plural in {c.child for c in CONTROLLERS} | {("", "v1", "pods")}:
        settings.watching.label_selectors[group, version, plural] = labels.MANAGED_SELECTOR
    # One INFO line per handler call is noise (and CPU) at thousands of objects; errors and
    # warnings still show, and --verbose/--debug turn the rest back on.
    if logger.getEffectiveLevel() >= logging.INFO:
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    # Events are the user-facing record of transitions; name them as ours.
    settings.posting.reporting_component = labels.OPERATOR
    settings.posting.reporting_instance = config.pod_name
    settings.posting.event_name_prefix = "kiln-"

    # One client (one aiohttp session) for every controller; kopf keeps its own for watching.
    client = kube.Client(kube.login())
    controllers = {cls.kind.kind: cls(client, config) for cls in CONTROLLERS}
    for controller in controllers.values():
        controller.peers = controllers
        controller.start()
    # Created here, in the operator-wide memo: each object's memo is a shallow copy of it, so all share one.
    memo.client, memo.controllers = client, controllers
    memo.metrics_server = metrics.serve(config.metrics_address)
    logger.info("metrics served on http://%s/metrics", config.metrics_address)


@kopf.on.cleanup()
async def stop(memo: kopf.Memo, **_: Any) -> None:
    for controller in (memo.get("controllers") or {}).values():
        await controller.stop()
    if memo.get("client") is not None:
        await memo.client.close()
    if memo.get("metrics_server"):
        metrics.stop(memo.metrics_server)


@kopf.on.login()
def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
    # Explicit, because kopf picks its fallback logins when it is imported: whether KUBECONFIG was set then.
    # An explicit KUBECONFIG wins (running outside the cluster); in a pod, the ServiceAccount token. The
    # controllers' own client (kube.Client) logs in the same way.
    return kube.login(settings)


@kopf.on.probe(id="now")
def probe_time(**_: Any) -> str:
    return rfc3339(time.time())


def register(cls: type[Controller]) -> None:
    """The kopf handlers every kind has: indexes of its children and pods (the cache), and a pass requested by
    every event of its objects, their children and pods, and the objects they follow."""
    plural = cls.kind.plural
    children_id, pods_id = f"{plural}-children", f"{plural}-pods"
    selector = {cls.owner_label: kopf.PRESENT}

    def controller(memo: kopf.Memo, indexes: Mapping[str, Any]) -> Controller:
        found: Controller = memo.controllers[cls.kind.kind]
        found.children_index, found.pods_index = indexes[children_id], indexes[pods_id]
        return found

    async def index_children(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, Any]:
        return {(namespace, labels[cls.key_label]): cls.trim_child(body)}

    async def index_pods(body: kopf.Body, namespace: str, labels: kopf.Labels, **_: Any) -> dict[Key, Any]:
        return {(namespace, labels[cls.key_label]): cls.trim_pod(body)}

    async def object_event(body: kopf.Body, event: kopf.RawEvent, memo: kopf.Memo, **kwargs: Any) -> None:
        found = controller(memo, kwargs)
        echo = found.echo(body)
        key = found.observe(body, event.get("type"))
        if event.get("type") != "DELETED" and not echo:
            found.queue.request(key)

    async def child_event(namespace: str, labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
        key = (namespace, labels[cls.key_label])
        controller(memo, kwargs).queue.request(key, coalesce=CHILD_COALESCE_SECONDS)

    async def source_event(body: kopf.Body, namespace: str, name: str, memo: kopf.Memo, **kwargs: Any) -> None:
        # The source changed (a model became ready, a promotion): its followers take a look, after a moment, as
        # the source's own controller updates its cache in its handler of this same event.
        found = controller(memo, kwargs)
        for key in found.following(namespace, body.get("kind", ""), name):
            found.queue.request(key, coalesce=CHILD_COALESCE_SECONDS)

    kopf.index(*cls.child, id=children_id, labels=selector)(index_children)
    kopf.index("", "v1", "pods", id=pods_id, labels=selector)(index_pods)
    kopf.on.event(*cls.kind.resource, id=f"{plural}-event")(object_event)
    kopf.on.event(*cls.child, id=f"{plural}-children-event", labels=selector)(child_event)
    kopf.on.event("", "v1", "pods", id=f"{plural}-pods-event", labels=selector)(child_event)
    for source in cls.sources:
        kopf.on.event(*source.resource, id=f"{plural}-follow-{source.plural}")(source_event)


for _cls in CONTROLLERS:
    register(_cls)
