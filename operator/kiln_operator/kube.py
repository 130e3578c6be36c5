"""The operator's own API calls (kopf only watches and patches the objects it handles): create-or-get children,
merge-patch, delete, read a log tail. One kr8s async client; every request is counted by verb and resource."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import httpx
import kr8s.asyncio
from kr8s import ServerError
from prometheus_client import Counter

Obj = dict[str, Any]


def _code(e: Exception) -> int | None:
    response = getattr(e, "response", None)
    return response.status_code if response is not None else None


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
    ("kiln.dev/v1alpha1", "TrainingJob"): ("/apis/kiln.dev/v1alpha1", "trainingjobs"),
    ("kiln.dev/v1alpha1", "ModelCompression"): ("/apis/kiln.dev/v1alpha1", "modelcompressions"),
    ("kiln.dev/v1alpha1", "ModelDeployment"): ("/apis/kiln.dev/v1alpha1", "modeldeployments"),
}


class NamespaceTerminating(Exception):
    """The namespace is being deleted: nothing can be created in it, and its objects go away with it."""


class Client:
    """A thin layer over kr8s' low-level ``call_api``: plain dicts in and out, no object model."""

    def __init__(self, api: Any) -> None:
        self._api = api

    @classmethod
    async def connect(cls) -> Client:
        # The same credentials kopf logs in with: an explicit KUBECONFIG, else the pod's ServiceAccount.
        return cls(await kr8s.asyncio.api(kubeconfig=os.environ.get("KUBECONFIG") or None))

    async def _call(self, method: str, url: str, plural: str, **kwargs: Any) -> httpx.Response:
        REQUESTS.labels(method.lower(), plural).inc()
        # kr8s joins base, version and url with "/": split our absolute path into its first segment and the rest.
        base, _, rest = url.lstrip("/").partition("/")
        async with self._api.call_api(method, version="", base=f"/{base}", url=rest, **kwargs) as response:
            return response

    @staticmethod
    def _path(api_version: str, kind: str, namespace: str, name: str | None = None) -> tuple[str, str]:
        prefix, plural = _PATHS[(api_version, kind)]
        url = f"{prefix}/namespaces/{namespace}/{plural}"
        return (f"{url}/{name}" if name else url), plural

    async def create_or_get(self, obj: Mapping[str, Any]) -> Obj:
        """Create; on 409 (it exists: a retried pass, or a restart after the create) return the existing one."""
        meta = obj["metadata"]
        url, plural = self._path(obj["apiVersion"], obj["kind"], meta["namespace"])
        try:
            return (await self._call("POST", url, plural, content=json.dumps(obj))).json()
        except (httpx.HTTPStatusError, ServerError) as e:
            if _code(e) == 403 and "being terminated" in str(getattr(e, "response", None) and e.response.text):
                raise NamespaceTerminating(meta["namespace"]) from None
            if _code(e) != 409:
                raise
        url, plural = self._path(obj["apiVersion"], obj["kind"], meta["namespace"], meta["name"])
        return (await self._call("GET", url, plural)).json()

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
        url, plural = self._path(api_version, kind, namespace, name)
        if subresource:
            url, plural = f"{url}/{subresource}", f"{plural}/{subresource}"
        try:
            response = await self._call(
                "PATCH",
                url,
                plural,
                content=json.dumps(body),
                headers={"Content-Type": "application/merge-patch+json"},
            )
        except (httpx.HTTPStatusError, ServerError) as e:
            if _code(e) == 404:
                return None
            raise
        return response.json()

    async def delete(self, api_version: str, kind: str, namespace: str, name: str) -> bool:
        """Delete with background propagation (the GC removes pods); False when it was already gone."""
        url, plural = self._path(api_version, kind, namespace, name)
        options = {"kind": "DeleteOptions", "apiVersion": "v1", "propagationPolicy": "Background"}
        try:
            await self._call("DELETE", url, plural, content=json.dumps(options))
        except (httpx.HTTPStatusError, ServerError) as e:
            if _code(e) == 404:
                return False
            raise
        return True

    async def log_tail(self, namespace: str, pod: str, container: str, lines: int) -> str | None:
        """The last lines of a container's log, or None when the kubelet cannot give them (node gone)."""
        url, _ = self._path("v1", "Pod", namespace, pod)
        try:
            response = await self._call(
                "GET", f"{url}/log", "pods/log", params={"container": container, "tailLines": str(lines)}
            )
        except (httpx.HTTPStatusError, httpx.TransportError, ServerError):
            return None
        return response.text
