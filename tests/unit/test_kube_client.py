"""The operator's API client (kiln_operator.kube.Client) against a real HTTP server on loopback that answers as the
API server would: create-or-get on a conflict, a missing object on patch and delete, a rotated token (401) that
makes it log in again and retry once, server-side apply's content type and parameters, a namespace being
terminated, and the request counter by verb and resource."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import kopf
import pytest
from aiohttp import web
from prometheus_client import REGISTRY

from kiln_operator import kube
from kiln_operator.kube import ApiError, Client, NamespaceTerminating

T = TypeVar("T")

NS = "team-a"
SERVICES = f"/api/v1/namespaces/{NS}/services"
JOBS = f"/apis/batch/v1/namespaces/{NS}/jobs"
TRAININGJOBS = f"/apis/kiln.dev/v1alpha1/namespaces/{NS}/trainingjobs"
SERVICE = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": NS}, "spec": {}}
TERMINATING = {
    "kind": "Status",
    "status": "Failure",
    "reason": "Forbidden",
    "code": 403,
    "message": f'services "web" is forbidden: unable to create new content in namespace {NS} because it is being '
    "terminated",
}


def status(code: int, reason: str) -> dict[str, Any]:
    return {"kind": "Status", "status": "Failure", "reason": reason, "code": code, "message": reason}


@dataclass
class Seen:
    method: str
    path: str
    query: dict[str, str]
    authorization: str | None
    content_type: str | None
    body: str


class FakeApi:
    """An aiohttp server on 127.0.0.1, in a thread with its own event loop, that records every request and answers
    each (method, path) with the responses scripted for it, in order; anything unscripted gets a 418."""

    def __init__(self) -> None:
        self.seen: list[Seen] = []
        self.script: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def on(self, method: str, path: str, *responses: tuple[Any, ...]) -> None:
        """Answer each request to (method, path) with the next (status, payload[, latency seconds])."""
        self.script.setdefault((method, path), []).extend(responses)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.seen.append(
            Seen(
                request.method,
                request.path,
                dict(request.query),
                request.headers.get("Authorization"),
                request.headers.get("Content-Type"),
                await request.text(),
            )
        )
        queue = self.script.get((request.method, request.path))
        if not queue:
            return web.json_response(status(418, f"unscripted {request.method} {request.path}"), status=418)
        code, payload, *latency = queue.pop(0)
        if latency:  # a slow answer: the request stays in flight that long
            await asyncio.sleep(latency[0])
        if isinstance(payload, str):
            return web.Response(text=payload, status=code)
        return web.json_response(payload, status=code)

    async def _serve(self) -> web.AppRunner:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.SockSite(runner, self._sock).start()
        return runner

    def __enter__(self) -> FakeApi:
        self._thread.start()
        self._runner = asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(timeout=10)
        return self

    def __exit__(self, *_: object) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(timeout=10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


@pytest.fixture
def api() -> Iterator[FakeApi]:
    with FakeApi() as server:
        yield server


@pytest.fixture
def client(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> Client:
    def no_login(*_: object, **__: object) -> kopf.ConnectionInfo:
        raise AssertionError("the client logged in again without a 401")

    # the tests never read this machine's kubeconfig; the 401 test puts its own login in
    monkeypatch.setattr(kube, "login", no_login)
    return Client(kopf.ConnectionInfo(server=api.url, token="t1"))


@pytest.fixture
def call(client: Client) -> Callable[[Coroutine[Any, Any, T]], T]:
    """Run one client call on a fresh event loop and close the client's session in it."""

    def run(coro: Coroutine[Any, Any, T]) -> T:
        async def main() -> T:
            try:
                return await asyncio.wait_for(coro, timeout=30)
            finally:
                await client.close()

        return asyncio.run(main())

    return run


def count(verb: str, resource: str) -> float:
    return REGISTRY.get_sample_value("kiln_api_requests_total", {"verb": verb, "resource": resource}) or 0.0


def test_create_returns_the_created_object(api: FakeApi, client: Client, call):
    api.on("POST", SERVICES, (201, {**SERVICE, "metadata": {**SERVICE["metadata"], "uid": "new"}}))
    created = call(client.create_or_get(SERVICE))
    assert created["metadata"]["uid"] == "new"
    assert [(s.method, s.path) for s in api.seen] == [("POST", SERVICES)]
    assert json.loads(api.seen[0].body) == SERVICE
    assert api.seen[0].content_type == "application/json"
    assert api.seen[0].authorization == "Bearer t1"


def test_create_or_get_on_a_conflict_returns_the_existing_object(api: FakeApi, client: Client, call):
    existing = {**SERVICE, "metadata": {**SERVICE["metadata"], "uid": "old"}, "spec": {"clusterIP": "10.0.0.9"}}
    api.on("POST", SERVICES, (409, status(409, "AlreadyExists")))
    api.on("GET", f"{SERVICES}/web", (200, existing))
    posts, gets = count("post", "services"), count("get", "services")
    assert call(client.create_or_get(SERVICE)) == existing
    assert [(s.method, s.path) for s in api.seen] == [("POST", SERVICES), ("GET", f"{SERVICES}/web")]
    assert (count("post", "services") - posts, count("get", "services") - gets) == (1, 1)


def test_other_errors_on_create_are_raised(api: FakeApi, client: Client, call):
    api.on("POST", SERVICES, (422, status(422, "Invalid")))
    with pytest.raises(ApiError) as error:
        call(client.create_or_get(SERVICE))
    assert error.value.status == 422
    assert [s.method for s in api.seen] == ["POST"]  # no GET after anything but a conflict


def test_create_in_a_terminating_namespace_raises_namespace_terminating(api: FakeApi, client: Client, call):
    api.on("POST", SERVICES, (403, TERMINATING))
    with pytest.raises(NamespaceTerminating, match=NS):
        call(client.create_or_get(SERVICE))


def test_a_plain_forbidden_stays_an_api_error(api: FakeApi, client: Client, call):
    api.on("POST", SERVICES, (403, status(403, "Forbidden")))
    with pytest.raises(ApiError) as error:
        call(client.create_or_get(SERVICE))
    assert error.value.status == 403
    assert not isinstance(error.value, NamespaceTerminating)


def test_apply_is_a_forced_server_side_apply_as_the_operators_field_manager(api: FakeApi, client: Client, call):
    api.on("PATCH", f"{SERVICES}/web", (200, {**SERVICE, "status": {}}))
    patches = count("patch", "services")
    assert call(client.apply(SERVICE)) == {**SERVICE, "status": {}}
    [seen] = api.seen
    assert seen.content_type == "application/apply-patch+yaml"
    assert seen.query == {"fieldManager": "kiln-operator", "force": "true"}
    assert json.loads(seen.body) == SERVICE  # JSON is YAML: the apply body is the object as given
    assert count("patch", "services") - patches == 1


def test_apply_in_a_terminating_namespace_raises_namespace_terminating(api: FakeApi, client: Client, call):
    api.on("PATCH", f"{SERVICES}/web", (403, TERMINATING))
    with pytest.raises(NamespaceTerminating):
        call(client.apply(SERVICE))


def test_patch_is_a_merge_patch_and_a_missing_object_is_none(api: FakeApi, client: Client, call):
    body = {"status": {"phase": "Running"}}
    api.on("PATCH", f"{TRAININGJOBS}/tj/status", (200, body), (404, status(404, "NotFound")))
    patches = count("patch", "trainingjobs/status")
    patched = call(client.patch("kiln.dev/v1alpha1", "TrainingJob", NS, "tj", body, subresource="status"))
    assert patched == {"status": {"phase": "Running"}}
    assert call(client.patch("kiln.dev/v1alpha1", "TrainingJob", NS, "tj", body, subresource="status")) is None
    assert [s.content_type for s in api.seen] == ["application/merge-patch+json"] * 2
    assert json.loads(api.seen[0].body) == body
    assert count("patch", "trainingjobs/status") - patches == 2


def test_delete_propagates_in_the_background_and_a_missing_object_is_false(api: FakeApi, client: Client, call):
    api.on("DELETE", f"{JOBS}/j", (200, status(200, "Success")), (404, status(404, "NotFound")))
    deletes = count("delete", "jobs")
    assert call(client.delete("batch/v1", "Job", NS, "j")) is True
    assert call(client.delete("batch/v1", "Job", NS, "j")) is False
    assert json.loads(api.seen[0].body)["propagationPolicy"] == "Background"
    assert count("delete", "jobs") - deletes == 2


def test_other_errors_on_patch_and_delete_are_raised(api: FakeApi, client: Client, call):
    api.on("PATCH", f"{JOBS}/j", (500, status(500, "InternalError")))
    api.on("DELETE", f"{JOBS}/j", (409, status(409, "Conflict")))
    with pytest.raises(ApiError, match="500"):
        call(client.patch("batch/v1", "Job", NS, "j", {"metadata": {"labels": {"a": "b"}}}))
    with pytest.raises(ApiError, match="409"):
        call(client.delete("batch/v1", "Job", NS, "j"))


def test_a_401_logs_in_again_and_retries_once_with_the_new_token(
    api: FakeApi, client: Client, call, monkeypatch: pytest.MonkeyPatch
):
    logins: list[str] = []

    def login(*_: object, **__: object) -> kopf.ConnectionInfo:
        logins.append("t2")
        return kopf.ConnectionInfo(server=api.url, token="t2")

    monkeypatch.setattr(kube, "login", login)
    api.on("PATCH", f"{JOBS}/j", (401, status(401, "Unauthorized")), (200, {"metadata": {"name": "j"}}))
    assert call(client.patch("batch/v1", "Job", NS, "j", {"metadata": {}})) == {"metadata": {"name": "j"}}
    assert logins == ["t2"]
    assert [s.authorization for s in api.seen] == ["Bearer t1", "Bearer t2"]
    assert api.seen[0].body == api.seen[1].body  # the retry sends the same request

    # the new credentials stay: the next call goes out with them and logs in no more
    api.on("DELETE", f"{JOBS}/j", (200, status(200, "Success")))
    assert call(client.delete("batch/v1", "Job", NS, "j")) is True
    assert api.seen[-1].authorization == "Bearer t2"
    assert logins == ["t2"]


def test_logging_in_again_does_not_cut_off_the_requests_in_flight(
    api: FakeApi, client: Client, call, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setattr(kube, "login", lambda *_, **__: kopf.ConnectionInfo(server=api.url, token="t2"))
    api.on("GET", f"{JOBS}/slow", (200, {"metadata": {"name": "slow"}}, 0.5))
    api.on("PATCH", f"{JOBS}/j", (401, status(401, "Unauthorized")), (200, {"metadata": {"name": "j"}}))

    async def both() -> list[Any]:
        slow = asyncio.ensure_future(client.get(f"{JOBS}/slow", "jobs"))
        await asyncio.sleep(0.1)  # the GET is sent first and answered last
        return [await client.patch("batch/v1", "Job", NS, "j", {"metadata": {}}), await slow]

    assert call(both()) == [{"metadata": {"name": "j"}}, {"metadata": {"name": "slow"}}]
    assert [(s.method, s.authorization) for s in api.seen] == [
        ("GET", "Bearer t1"),
        ("PATCH", "Bearer t1"),
        ("PATCH", "Bearer t2"),
    ]


def test_a_second_401_is_raised_not_retried_again(api: FakeApi, client: Client, call, monkeypatch):
    monkeypatch.setattr(kube, "login", lambda *_, **__: kopf.ConnectionInfo(server=api.url, token="t2"))
    api.on("GET", f"{SERVICES}/web", (401, status(401, "Unauthorized")), (401, status(401, "Unauthorized")))
    api.on("POST", SERVICES, (409, status(409, "AlreadyExists")))
    with pytest.raises(ApiError) as error:
        call(client.create_or_get(SERVICE))
    assert error.value.status == 401
    assert [(s.method, s.authorization) for s in api.seen] == [
        ("POST", "Bearer t1"),
        ("GET", "Bearer t1"),
        ("GET", "Bearer t2"),
    ]


def test_log_tail_asks_for_the_container_and_lines_and_is_none_when_unavailable(api: FakeApi, client: Client, call):
    log = f"/api/v1/namespaces/{NS}/pods/p-0/log"
    api.on("GET", log, (200, "line 1\nline 2\n"), (500, status(500, "node gone")))
    assert call(client.log_tail(NS, "p-0", "trainer", 2)) == "line 1\nline 2\n"
    assert api.seen[0].query == {"container": "trainer", "tailLines": "2"}
    assert call(client.log_tail(NS, "p-0", "trainer", 2)) is None
