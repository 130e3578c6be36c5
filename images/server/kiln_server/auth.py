"""Only callers the cluster authorises reach the model (--auth kubernetes; docs/security.md).

A request's bearer token is reviewed by the Kubernetes API server: a TokenReview says who it is, a
LocalSubjectAccessReview in the ModelDeployment's namespace whether that user may ``create`` the subresource
``modeldeployments/predict`` of this ModelDeployment (group kiln.dev), as kube-rbac-proxy authorises. Decisions,
allowed and denied alike, are cached for a short time under the SHA-256 of the token (never the token itself), so a
cached request costs a hash and a dictionary lookup on the event loop; the first requests of a new token share one
review. When the API server cannot be asked, nothing is cached and the request gets 503: the fault is ours."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import ssl
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import urlsplit

import aiohttp

from .config import UsageError
from .metrics import AuthMetrics

log = logging.getLogger("kiln_server.auth")
K = TypeVar("K")
V = TypeVar("V")

# The requests the kubelet's probes make: never behind a token.
OPEN_PATHS = frozenset({"/v2/health/live", "/v2/health/ready"})
CHALLENGE = 'Bearer realm="kiln"'
CHALLENGE_INVALID = 'Bearer realm="kiln", error="invalid_token"'  # RFC 6750: a token was given, and refused

GROUP, RESOURCE, SUBRESOURCE, VERB = "kiln.dev", "modeldeployments", "predict", "create"

SERVICE_ACCOUNT_DIR = Path("/var/run/secrets/kubernetes.io/serviceaccount")
API_ENV, TOKEN_FILE_ENV, CA_FILE_ENV = "KILN_SERVER_KUBE_API", "KILN_SERVER_KUBE_TOKEN_FILE", "KILN_SERVER_KUBE_CA_FILE"
# Projected ServiceAccount tokens are rotated by the kubelet (well before their hour is up): read the file again
# this often rather than keep the one read at start.
TOKEN_REREAD_S = 60.0
API_TIMEOUT_S = 5.0
# A ServiceAccount JWT is about 1 KiB; aiohttp refuses header lines over 8 KiB anyway.
MAX_TOKEN = 16384
# RFC 6750's b64token: what a bearer token may be made of. Anything else is refused without asking the API server.
_TOKEN = re.compile(r"[A-Za-z0-9._~+/-]+=*")
# A distinct API failure is logged again after this long, not on every request while it lasts.
ERROR_LOG_INTERVAL_S = 60.0


@dataclass(frozen=True, slots=True)
class Decision:
    """What a request with this token gets: 200 (allowed), 401 (no valid token) or 403 (not allowed)."""

    status: int
    user: str | None = None
    message: str = ""


MISSING = Decision(401, None, "authorization: a bearer token is required (Authorization: Bearer <token>)")
MALFORMED = Decision(
    401, None, f"authorization: must be 'Bearer <token>', the token 1-{MAX_TOKEN} base64url characters"
)
RESULTS = {200: "allowed", 401: "unauthenticated", 403: "forbidden"}


class ReviewError(Exception):
    """The API server could not be asked, or refused the server itself: the request gets 503, nothing is cached."""

    client_message = "authorization: the token cannot be checked now (the Kubernetes API server could not be asked)"


def bearer_token(header: str | None) -> str | Decision:
    """The token of an ``Authorization`` value (the scheme in any case, RFC 7235), or the 401 to answer."""
    if not header:
        return MISSING
    scheme, _, token = header.partition(" ")
    token = token.strip(" ")
    if scheme.lower() != "bearer" or len(token) > MAX_TOKEN or not _TOKEN.fullmatch(token):
        return MALFORMED
    return token


class DecisionCache:
    """Decisions by token hash, each for ``ttl`` seconds from when it was made, the least recently used dropped
    beyond ``size``. Event-loop only (no lock)."""

    def __init__(self, ttl: float, size: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.size = size
        self._clock = clock
        self._entries: OrderedDict[bytes, tuple[float, Decision]] = OrderedDict()

    def get(self, key: bytes) -> Decision | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._clock() >= entry[0]:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry[1]

    def put(self, key: bytes, decision: Decision) -> None:
        if self.ttl <= 0:
            return
        self._entries[key] = (self._clock() + self.ttl, decision)
        self._entries.move_to_end(key)
        while len(self._entries) > self.size:
            self._entries.popitem(last=False)

    def purge(self) -> int:
        """Drop what has expired (entries not asked for again linger until then); the number left."""
        now = self._clock()
        for key in [k for k, (expires, _) in self._entries.items() if now >= expires]:
            del self._entries[key]
        return len(self._entries)

    def __len__(self) -> int:
        return len(self._entries)


class SingleFlight(Generic[K, V]):
    """Concurrent calls for one key share one run of the work: the first starts it, the others wait for its
    result or its error. Nothing is remembered once it is done (caching is the caller's). Event-loop only."""

    def __init__(self) -> None:
        self._running: dict[K, asyncio.Future[V]] = {}

    async def do(self, key: K, work: Callable[[], Awaitable[V]]) -> V:
        future = self._running.get(key)
        if future is None:
            future = asyncio.ensure_future(work())
            self._running[key] = future
            future.add_done_callback(lambda f: self._done(key, f))
        # shield: a caller that goes away (client gone, deadline) does not cancel the work the others wait for
        return await asyncio.shield(future)

    def _done(self, key: K, future: asyncio.Future[V]) -> None:
        self._running.pop(key, None)
        if not future.cancelled():
            future.exception()  # retrieved, so an error no caller waits for any more is not reported as lost

    def __len__(self) -> int:
        return len(self._running)


@dataclass(frozen=True)
class ApiSettings:
    """How to reach the API server: in a pod, the standard in-cluster configuration; outside one (tests,
    benchmarks), $KILN_SERVER_KUBE_API, $KILN_SERVER_KUBE_TOKEN_FILE, $KILN_SERVER_KUBE_CA_FILE."""

    url: str
    token_file: str
    ca_file: str | None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ApiSettings:
        """Checked at start (UsageError naming the variable): a server that cannot ask would refuse every call."""
        env = os.environ if env is None else env
        url = env.get(API_ENV, "")
        if url:
            parts = urlsplit(url)
            if parts.scheme != "https" or not parts.hostname:
                raise UsageError(f"${API_ENV}: must be an https:// URL of the Kubernetes API server (got {url!r})")
            url = url.rstrip("/")
        else:
            host, port = env.get("KUBERNETES_SERVICE_HOST", ""), env.get("KUBERNETES_SERVICE_PORT", "443")
            if not host:
                raise UsageError(
                    f"--auth kubernetes: no Kubernetes API server to ask: $KUBERNETES_SERVICE_HOST is not set (not in "
                    f"a pod) and ${API_ENV} is not set"
                )
            url = f"https://[{host}]:{port}" if ":" in host else f"https://{host}:{port}"
        token_file = env.get(TOKEN_FILE_ENV) or str(SERVICE_ACCOUNT_DIR / "token")
        where = f"${TOKEN_FILE_ENV}" if env.get(TOKEN_FILE_ENV) else "--auth kubernetes: the ServiceAccount token"
        try:
            if not Path(token_file).read_text().strip():
                raise UsageError(f"{where}: {token_file} is empty")
        except OSError as e:
            raise UsageError(
                f"{where}: cannot read {token_file}: {e.strerror or e} (automountServiceAccountToken off?)"
            ) from None
        ca_file = env.get(CA_FILE_ENV) or None
        if ca_file is None and (SERVICE_ACCOUNT_DIR / "ca.crt").exists():
            ca_file = str(SERVICE_ACCOUNT_DIR / "ca.crt")
        if ca_file is not None:
            try:
                ssl.create_default_context(cafile=ca_file)
            except (OSError, ssl.SSLError) as e:
                name = f"${CA_FILE_ENV}" if env.get(CA_FILE_ENV) else "--auth kubernetes: the cluster CA"
                raise UsageError(f"{name}: {ca_file} is not a readable PEM CA bundle: {e}") from None
        return cls(url, token_file, ca_file)


class KubeApi:
    """POSTs reviews to the API server as the server's ServiceAccount (aiohttp, on the event loop)."""

    def __init__(self, settings: ApiSettings) -> None:
        self.settings = settings
        self._ssl = ssl.create_default_context(cafile=settings.ca_file)
        self._session: aiohttp.ClientSession | None = None
        self._token = ""
        self._token_read = -float("inf")

    def _credentials(self) -> str:
        now = time.monotonic()
        if now - self._token_read >= TOKEN_REREAD_S:
            try:
                token = Path(self.settings.token_file).read_text().strip()
            except OSError as e:
                if not self._token:
                    raise ReviewError(f"cannot read the token {self.settings.token_file}: {e.strerror or e}") from None
                token = self._token  # a rotation under way: the one we have is still good for a while
            self._token, self._token_read = token, now
        return self._token

    async def post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=self._ssl, limit=16),
                timeout=aiohttp.ClientTimeout(total=API_TIMEOUT_S),
            )
        url = self.settings.url + path
        headers = {"Authorization": f"Bearer {self._credentials()}"}
        try:
            async with self._session.post(url, json=body, headers=headers) as resp:
                text = await resp.text()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            raise ReviewError(f"POST {url}: {type(e).__name__}: {e}"[:400]) from None
        if status == 401:
            self._token_read = -float("inf")  # perhaps rotated since we read it: read it again next time
            raise ReviewError(f"POST {url}: 401: the API server does not accept the server's own token")
        if not 200 <= status < 300:
            raise ReviewError(f"POST {url}: {status}: {_api_message(text)}"[:800])
        try:
            doc = _json(text)
        except ValueError:
            raise ReviewError(f"POST {url}: {status}: not a JSON object: {text[:100]!r}") from None
        return doc

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


def _json(text: str) -> dict[str, Any]:
    doc = json.loads(text)
    if not isinstance(doc, dict):
        raise ValueError("not an object")
    return doc


def _api_message(text: str) -> str:
    """The ``message`` of a Kubernetes Status (what RBAC says when the server's own permission is missing)."""
    try:
        return str(_json(text).get("message") or text)
    except ValueError:
        return text


class Authenticator:
    """Decides whether a request's ``Authorization`` lets it in; one per server."""

    def __init__(
        self,
        api: KubeApi,
        *,
        namespace: str,
        deployment: str,
        ttl: float,
        size: int,
        metrics: AuthMetrics | None = None,
    ) -> None:
        self.api = api
        self.namespace = namespace
        self.deployment = deployment
        self.cache = DecisionCache(ttl, size)
        self.metrics = metrics
        self._flights: SingleFlight[bytes, Decision] = SingleFlight()
        self._logged: dict[str, float] = {}
        self.permission = f"{VERB} {RESOURCE}/{SUBRESOURCE} {_quoted(deployment)} in namespace {_quoted(namespace)}"

    def cached(self, header: str | None) -> Decision | None:
        """The decision for a token decided within the TTL, counted; None when it must be reviewed. The hot path:
        a hash and a dictionary lookup on the event loop. The header is not parsed here: only tokens that passed
        parsing were ever cached, so a hit on the hash of what follows ``Bearer `` is one of them."""
        if header is None or not header.startswith("Bearer "):
            return None
        decision = self.cache.get(hashlib.sha256(header[7:].encode()).digest())
        if decision is not None and self.metrics is not None:
            self.metrics.requests[RESULTS[decision.status]].inc()
        return decision

    async def authorize(self, header: str | None) -> Decision:
        """The decision for this ``Authorization`` value, reviewed by the API server unless cached; raises
        ReviewError when the API server cannot be asked. Try ``cached`` first: it needs no coroutine."""
        token = bearer_token(header)
        if isinstance(token, Decision):
            decision = token
        else:
            key = hashlib.sha256(token.encode()).digest()
            decision = self.cache.get(key)
            if decision is None:
                # Concurrent requests with one uncached token wait for a single review.
                try:
                    decision = await self._flights.do(key, lambda: self._review(key, token))
                except ReviewError:
                    if self.metrics is not None:
                        self.metrics.requests["error"].inc()
                    raise
        if self.metrics is not None:
            self.metrics.requests[RESULTS[decision.status]].inc()
        return decision

    async def _review(self, key: bytes, token: str) -> Decision:
        try:
            decision = await self._ask(token)
        except ReviewError as e:
            self._log_error(str(e))
            raise
        self.cache.put(key, decision)
        if self.metrics is not None:
            self.metrics.cache_entries.set(len(self.cache))
        log.debug("review: %s -> %d %s", decision.user or "(no user)", decision.status, decision.message)
        return decision

    async def _ask(self, token: str) -> Decision:
        if self.metrics is not None:
            self.metrics.reviews["token"].inc()
        doc = await self.api.post(
            "/apis/authentication.k8s.io/v1/tokenreviews",
            {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": {"token": token}},
        )
        status = doc.get("status") or {}
        user = status.get("user") or {}
        if not status.get("authenticated") or not user.get("username"):
            # The API server's reason ("token has expired", ...) helps the client; it names nothing of ours.
            reason = str(status.get("error") or "not authenticated")[:200]
            return Decision(401, None, f"authorization: the bearer token is not valid in this cluster ({reason})")
        username = str(user["username"])
        spec: dict[str, Any] = {
            "user": username,
            "groups": user.get("groups") or [],
            "resourceAttributes": {
                "namespace": self.namespace,
                "verb": VERB,
                "group": GROUP,
                "resource": RESOURCE,
                "subresource": SUBRESOURCE,
                "name": self.deployment,
            },
        }
        if user.get("uid"):
            spec["uid"] = user["uid"]
        if user.get("extra"):
            spec["extra"] = user["extra"]
        if self.metrics is not None:
            self.metrics.reviews["access"].inc()
        doc = await self.api.post(
            f"/apis/authorization.k8s.io/v1/namespaces/{self.namespace}/localsubjectaccessreviews",
            {
                "apiVersion": "authorization.k8s.io/v1",
                "kind": "LocalSubjectAccessReview",
                "metadata": {"namespace": self.namespace},
                "spec": spec,
            },
        )
        status = doc.get("status") or {}
        if status.get("allowed") is True:
            return Decision(200, username)
        if status.get("evaluationError"):
            log.debug("access review of %s: %s", username, status["evaluationError"])
        return Decision(403, username, f"authorization: user {_quoted(username)} may not {self.permission}")

    def _log_error(self, message: str) -> None:
        """WARNING once per distinct failure and minute: every request fails the same way while it lasts."""
        now = time.monotonic()
        if now - self._logged.get(message, -float("inf")) < ERROR_LOG_INTERVAL_S:
            return
        if len(self._logged) > 100:
            self._logged.clear()
        self._logged[message] = now
        log.warning("authorization: cannot review a token; answering 503: %s", message)

    def update_metrics(self) -> None:
        """At scrape time: expired entries no longer count."""
        if self.metrics is not None:
            self.metrics.cache_entries.set(self.cache.purge())

    async def close(self) -> None:
        await self.api.close()


def _quoted(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'
