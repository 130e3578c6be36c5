"""The operator's own API calls (kopf only watches and patches the objects it handles): create-or-get children,
merge-patch, delete, read a log tail. Plain dicts in and out over one aiohttp session (what kopf itself uses),
logged in with the same credentials as kopf; every request is counted by verb and resource."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Mapping
from typing import Any

import aiohttp
import kopf
from prometheus_client import Counter

Obj = dict[str, Any]

REQUESTS = Counter(
    "kiln_api_requests_total", "API requests the controllers made, by verb and resource.", ["verb", "resource"]
)

# apiVersion/kind -> (URL prefix, plural)
_PATHS: dict[tuple[str, str], tuple[str, str]] = {
    ("batch/v1", "Job"): ("/apis/batch/v1", "jobs"),
    ("v1", "Service"): ("/api/v1", "services"),
    ("v1", "Pod"): ("/api/v1", "pods"),
    ("v1", "ConfigMap"): ("/api/v1", "configmaps"),
    ("v1", "Event"): ("/api/v1", "events"),
    ("apps/v1", "Deployment"): ("/apis/apps/v1", "deployments"),
    ("policy/v1", "PodDisruptionBudget"): ("/apis/policy/v1", "poddisruptionbudgets"),
    ("autoscaling/v2", "HorizontalPodAutoscaler"): ("/apis/autoscaling/v2", "horizontalpodautoscalers"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"): ("/apis/gateway.networking.k8s.io/v1", "httproutes"),
    ("v1", "ServiceAccount"): ("/api/v1", "serviceaccounts"),
    ("networking.k8s.io/v1", "NetworkPolicy"): ("/apis/networking.k8s.io/v1", "networkpolicies"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("/apis/rbac.authorization.k8s.io/v1", "rolebindings"),
    # Cluster-scoped: called with namespace "".
    ("rbac.authorization.k8s.io/v1", "ClusterRoleBinding"): (
        "/apis/rbac.authorization.k8s.io/v1",
        "clusterrolebindings",
    ),
    ("kueue.x-k8s.io/v1beta2", "Workload"): ("/apis/kueue.x-k8s.io/v1beta2", "workloads"),
    ("kiln.dev/v1alpha1", "TrainingJob"): ("/apis/kiln.dev/v1alpha1", "trainingjobs"),
    ("kiln.dev/v1alpha1", "ModelCompression"): ("/apis/kiln.dev/v1alpha1", "modelcompressions"),
    ("kiln.dev/v1alpha1", "ModelDeployment"): ("/apis/kiln.dev/v1alpha1", "modeldeployments"),
}


class ApiError(Exception):
    def __init__(self, status: int, method: str, url: str, text: str) -> None:
        super().__init__(f"{method} {url}: {status}: {text[:2000]}")
        self.status, self.text = status, text


class NamespaceTerminating(Exception):
    """The namespace is being deleted: nothing can be created in it, and its objects go away with it."""


def login(settings: kopf.OperatorSettings | None = None) -> kopf.ConnectionInfo:
    """kopf's login (settings.login): an explicit KUBECONFIG or ~/.kube/config, else the pod's ServiceAccount."""
    settings = settings or kopf.OperatorSettings()
    if os.environ.get("KUBECONFIG") or os.path.exists(os.path.expanduser("~/.kube/config")):
        info = kopf.login_with_kubeconfig(settings=settings)
    else:
        info = kopf.login_with_service_account(settings=settings)
    if info is None:
        raise RuntimeError("no Kubernetes credentials: neither a kubeconfig nor a ServiceAccount token")
    return info


class Client:
    def __init__(self, info: kopf.ConnectionInfo, timeout: float = 30) -> None:
        self._info = info
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None

    @classmethod
    async def connect(cls) -> Client:
        return cls(login())

    def _open(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                base_url=self._info.server,
                connector=aiohttp.TCPConnector(limit=64, ssl=self._info.as_ssl_context()),
                headers={"User-Agent": "kiln-operator"},
                timeout=self._timeout,
            )
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def _call(
        self, method: str, url: str, plural: str, *, body: Any = None, content_type: str = "application/json", **kw: Any
    ) -> tuple[int, str]:
        data = json.dumps(body) if body is not None else None
        headers = {"Content-Type": content_type} if data is not None else {}
        for attempt in (1, 2):
            # The credentials go with each request, not with the session every controller shares: logging in
            # again never cuts off the requests in flight.
            info = self._info
            REQUESTS.labels(method.lower(), plural).inc()
            async with self._open().request(
                method, url, data=data, headers={**headers, **info.as_http_headers()}, **kw
            ) as response:
                text = await response.text()
                if response.status == 401 and attempt == 1:
                    # A rotated ServiceAccount token: log in again, as kopf does (once for all the requests
                    # that were refused together), and retry once.
                    if self._info is info:
                        self._info = await asyncio.to_thread(login)
                    continue
                if response.status >= 400:
                    raise ApiError(response.status, method, url, text)
                return response.status, text
        raise AssertionError("unreachable")

    @staticmethod
    def path(api_version: str, kind: str, namespace: str, name: str | None = None) -> tuple[str, str]:
        """The URL path of a collection (name None) or an object, and its plural (for the metrics)."""
        prefix, plural = _PATHS[(api_version, kind)]
        url = f"{prefix}/namespaces/{namespace}/{plural}" if namespace else f"{prefix}/{plural}"
        return (f"{url}/{name}" if name else url), plural

    async def get(self, path: str, resource: str) -> Any:
        """GET an API path (an object or a list) as JSON; ``resource`` labels the request in the metrics."""
        return json.loads((await self._call("GET", path, resource))[1])

    async def create_or_get(self, obj: Mapping[str, Any]) -> Obj:
        """Create; on 409 (it exists: a retried pass, or a restart after the create) return the existing one."""
        meta = obj["metadata"]
        url, plural = self.path(obj["apiVersion"], obj["kind"], meta["namespace"])
        try:
            return json.loads((await self._call("POST", url, plural, body=obj))[1])
        except ApiError as e:
            if e.status == 403 and "being terminated" in e.text:
                raise NamespaceTerminating(meta["namespace"]) from None
            if e.status != 409:
                raise
        url, plural = self.path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return json.loads((await self._call("GET", url, plural))[1])

    async def apply(self, obj: Mapping[str, Any]) -> Obj:
        """Server-side apply as the operator's field manager, forced: creates or updates in one idempotent call,
        and fields we applied before but no longer send are removed."""
        meta = obj["metadata"]
        url, plural = self.path(obj["apiVersion"], obj["kind"], meta.get("namespace", ""), meta["name"])
        try:
            _, text = await self._call(
                "PATCH",
                url,
                plural,
                body=obj,
                content_type="application/apply-patch+yaml",
                params={"fieldManager": "kiln-operator", "force": "true"},
            )
        except ApiError as e:
            if e.status == 403 and "being terminated" in e.text:
                raise NamespaceTerminating(meta["namespace"]) from None
            raise
        return json.loads(text)

    async def patch(
        self,
        api_version: str,
        kind: str,
        namespace: str,
        name: str,
        body: Mapping[str, Any],
        *,
        subresource: str | None = None,
    ) -> Obj | None:
        """JSON merge patch; None when the object is gone."""
        url, plural = self.path(api_version, kind, namespace, name)
        if subresource:
            url, plural = f"{url}/{subresource}", f"{plural}/{subresource}"
        try:
            _, text = await self._call("PATCH", url, plural, body=body, content_type="application/merge-patch+json")
        except ApiError as e:
            if e.status == 404:
                return None
            raise
        return json.loads(text)

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (the GC removes pods); False when it was already gone."""
        url, plural = self.path(api_version, kind, namespace, name)
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            await self._call("DELETE", url, plural, body=options)
        except ApiError as e:
            if e.status == 404:
                return False
            raise
        return True

    async def log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None:
        """The last lines of a container's log, or None when the kubelet cannot give them (node gone)."""
        url, _ = self.path("v1", "Pod", namespace, pod)
        try:
            _, text = await self._call(
                "GET", f"{url}/log", "pods/log", params={"container": container, "tailLines": str(lines)}
            )
        except (ApiError, aiohttp.ClientError):
            return None
        return text
