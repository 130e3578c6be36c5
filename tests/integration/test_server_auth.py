"""--auth kubernetes against the real local API server (docs/security.md "Authentication and authorisation"): the
inference server runs as a process on this machine, logged in as a ServiceAccount bound to exactly the two
ClusterRoles the install ships for servers (kiln-server-tokenreview, kiln-server-access-review), and reviews the
tokens of real ServiceAccounts, one allowed to predict with this ModelDeployment and one not, plus tokens the
cluster must refuse: garbage, a JWT signed by a key it does not know, and an expired JWT signed with its own
service-account key. Every case over REST and gRPC."""

from __future__ import annotations

import base64
import concurrent.futures
import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import yaml
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from support.cluster import REPO, Cluster
from support.net import free_port
from support.server import ServerProcess, counter, image_artifact, image_request
from support.waiting import wait_for
from tritonclient.utils import InferenceServerException

DEPLOYMENT = "digits"
PIXELS = np.linspace(-1, 1, 64, dtype=np.float32).reshape(1, 1, 8, 8)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, np.ndarray]:
    """The small digits model as an artifact, and its logits for PIXELS from ONNX Runtime directly."""
    uri, path = image_artifact(str(tmp_path_factory.mktemp("auth-artifacts")))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return uri, session.run(["logits"], {"pixel_values": PIXELS})[0]


@dataclass
class Api:
    url: str
    ca_file: Path


SERVER_ROLES = ("kiln-server-tokenreview", "kiln-server-access-review")


@pytest.fixture(scope="module")
def api_server(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Api:
    """The API server's URL and CA, from the admin kubeconfig; and the servers' two ClusterRoles as the install ships
    them (rendered from manifests/, wherever the file lives there), server-side applied."""
    view = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
    entry = view["clusters"][0]["cluster"]
    ca_file = tmp_path_factory.mktemp("api") / "ca.crt"
    ca_file.write_bytes(base64.b64decode(entry["certificate-authority-data"]))
    rendered = yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / "manifests")).stdout)
    roles = [d for d in rendered if d and d["kind"] == "ClusterRole" and d["metadata"]["name"] in SERVER_ROLES]
    assert sorted(r["metadata"]["name"] for r in roles) == sorted(SERVER_ROLES)
    cluster.kubectl(
        "apply", "--server-side", "--field-manager=kiln-test-server-auth", "-f", "-", stdin=yaml.safe_dump_all(roles)
    )
    return Api(entry["server"], ca_file)


def _apply(cluster: Cluster, *docs: dict[str, Any]) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))


def _token(cluster: Cluster, namespace: str, account: str) -> str:
    return cluster.kubectl("create", "token", account, "-n", namespace, "--duration=1h").stdout.strip()


@dataclass
class Accounts:
    namespace: str
    token_file: Path  # the server's own ServiceAccount token
    binding: str  # the server's ClusterRoleBinding (cluster-scoped: deleted by the fixture)
    reader: str  # a token allowed to create modeldeployments/predict DEPLOYMENT
    stranger: str  # a token of a ServiceAccount without that permission

    def user(self, account: str) -> str:
        return f"system:serviceaccount:{self.namespace}:{account}"


def server_identity(cluster: Cluster, namespace: str, tmp_path: Path, *, token_review: bool = True) -> Accounts:
    """The server's ServiceAccount, bound as the operator binds it, and two client ServiceAccounts."""
    binding = f"kiln-server-tokenreview-{namespace}"
    sa = [{"kind": "ServiceAccount", "name": "kiln-server", "namespace": namespace}]
    docs: list[dict[str, Any]] = [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": name, "namespace": namespace}}
        for name in ("kiln-server", "reader", "stranger")
    ]
    docs.append(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "kiln-server-access-review", "namespace": namespace},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "kiln-server-access-review",
            },
            "subjects": sa,
        }
    )
    if token_review:
        docs.append(token_review_binding(binding, namespace))
    # The client's grant, as docs/security.md shows it: create on the subresource, for this ModelDeployment only.
    docs += [
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": f"predict-{DEPLOYMENT}", "namespace": namespace},
            "rules": [
                {
                    "apiGroups": ["kiln.dev"],
                    "resources": ["modeldeployments/predict"],
                    "resourceNames": [DEPLOYMENT],
                    "verbs": ["create"],
                }
            ],
        },
        reader_binding(namespace),
    ]
    _apply(cluster, *docs)
    token_file = tmp_path / "server-token"
    token_file.write_text(_token(cluster, namespace, "kiln-server"))
    return Accounts(
        namespace, token_file, binding, _token(cluster, namespace, "reader"), _token(cluster, namespace, "stranger")
    )


def token_review_binding(name: str, namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": "kiln-server-tokenreview"},
        "subjects": [{"kind": "ServiceAccount", "name": "kiln-server", "namespace": namespace}],
    }


def reader_binding(namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": f"reader-predict-{DEPLOYMENT}", "namespace": namespace},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": f"predict-{DEPLOYMENT}"},
        "subjects": [{"kind": "ServiceAccount", "name": "reader", "namespace": namespace}],
    }


@pytest.fixture
def accounts(cluster: Cluster, namespace: str, tmp_path: Path, api_server: Api) -> Iterator[Accounts]:
    made = server_identity(cluster, namespace, tmp_path)
    yield made
    cluster.kubectl("delete", "clusterrolebinding", made.binding, "--ignore-not-found", check=False)


def auth_server(
    tmp_path: Path, uri: str, api: Api, accounts: Accounts, *args: str, kube_api: str | None = None
) -> ServerProcess:
    return ServerProcess(
        tmp_path,
        uri,
        "--auth",
        "kubernetes",
        "--namespace",
        accounts.namespace,
        "--deployment",
        DEPLOYMENT,
        *args,
        name="digits",
        env={
            "KILN_SERVER_KUBE_API": kube_api or api.url,
            "KILN_SERVER_KUBE_TOKEN_FILE": str(accounts.token_file),
            "KILN_SERVER_KUBE_CA_FILE": str(api.ca_file),
        },
    ).start()


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def rest_infer(server: ServerProcess, headers: dict[str, str]) -> tuple[int, dict[str, str], dict[str, Any]]:
    status, head, body = server.request(
        "POST",
        f"/v2/models/{server.name}/infer",
        json.dumps(image_request(PIXELS)).encode(),
        {"Content-Type": "application/json", **headers},
    )
    return status, head, json.loads(body)


def grpc_client(server: ServerProcess) -> tg.InferenceServerClient:
    return tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")


def grpc_infer(server: ServerProcess, token: str | None) -> np.ndarray:
    client = grpc_client(server)
    try:
        pixels = tg.InferInput("pixel_values", list(PIXELS.shape), "FP32")
        pixels.set_data_from_numpy(PIXELS)
        headers = {"authorization": f"Bearer {token}"} if token is not None else None
        return client.infer(server.name, [pixels], headers=headers, client_timeout=30).as_numpy("logits")
    finally:
        client.close()


def grpc_refusal(server: ServerProcess, token: str | None) -> tuple[str, str]:
    """(status code, message) of a gRPC ModelInfer that must fail."""
    with pytest.raises(InferenceServerException) as e:
        grpc_infer(server, token)
    return str(e.value.status()), str(e.value.message())


def grpc_denied(server: ServerProcess, token: str) -> bool:
    """Whether ModelInfer is refused with PERMISSION_DENIED (False when it is answered)."""
    try:
        grpc_infer(server, token)
    except InferenceServerException as e:
        refused = e
    else:
        return False
    assert str(refused.status()) == "StatusCode.PERMISSION_DENIED", refused
    return True


# ---------------------------------------------------------------------------------------------- JWTs made here
def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _claims(token: str) -> dict[str, Any]:
    payload = token.split(".")[1]
    return json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))


def _header(token: str) -> dict[str, Any]:
    head = token.split(".")[0]
    return json.loads(base64.urlsafe_b64decode(head + "=" * (-len(head) % 4)))


def sign(header: dict[str, Any], claims: dict[str, Any], key: rsa.RSAPrivateKey) -> str:
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    signature = key.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{_b64(signature)}"


def like(real: str, *, issued: float, lifetime: float) -> dict[str, Any]:
    """The claims of a real ServiceAccount token (issuer, audience, subject, the kubernetes.io claims), with new
    times and a new id."""
    claims = _claims(real)
    claims.update(iat=int(issued), nbf=int(issued), exp=int(issued + lifetime), jti=str(uuid.uuid4()))
    return claims


def cluster_signing_key(cluster: Cluster) -> rsa.RSAPrivateKey:
    """The key the API server signs ServiceAccount tokens with: --service-account-signing-key-file in the kwok
    cluster's configuration, found beside its kubeconfig."""
    config = Path(cluster.kubeconfig).parent / "kwok.yaml"
    if not config.exists():
        pytest.skip(f"not a kwokctl cluster ({config} is absent): its signing key cannot be found")
    for doc in yaml.safe_load_all(config.read_text()):
        for component in (doc or {}).get("components") or []:
            if component.get("name") != "kube-apiserver":
                continue
            for arg in component.get("args") or []:
                if arg.startswith("--service-account-signing-key-file="):
                    path = Path(arg.split("=", 1)[1])
                    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
                    assert isinstance(key, rsa.RSAPrivateKey)
                    return key
    raise AssertionError(f"{config}: kube-apiserver has no --service-account-signing-key-file")


# ----------------------------------------------------------------------------------------------------- tests
def test_only_callers_the_cluster_authorises_reach_the_model(
    cluster: Cluster, accounts: Accounts, api_server: Api, model: tuple[str, np.ndarray], tmp_path: Path
):
    uri, expected = model
    # A long TTL: every repeat below is a cache hit, so the review counts are exact.
    server = auth_server(tmp_path, uri, api_server, accounts, "--auth-cache-ttl", "300", "--access-log-rate", "1")
    try:
        server.wait_ready()  # the readiness probe carries no token
        assert server.request("GET", "/v2/health/live")[0] == 200
        client = grpc_client(server)
        assert client.is_server_live()
        assert client.is_server_ready()
        assert client.is_model_ready("digits")
        client.close()

        # No token, or not a bearer token: 401 without asking the API server.
        for headers in ({}, {"Authorization": "Basic cmVhZGVyOnNlY3JldA=="}, {"Authorization": "Bearer a b"}):
            status, head, doc = rest_infer(server, headers)
            assert status == 401, doc
            assert head["www-authenticate"].startswith('Bearer realm="kiln"')
            assert set(doc) == {"error"}
            assert doc["error"].startswith("authorization: ")
        status, head, doc = rest_infer(server, {})
        assert head["www-authenticate"] == 'Bearer realm="kiln"'
        assert doc["error"] == "authorization: a bearer token is required (Authorization: Bearer <token>)"
        for path in ("/v2", "/v2/models/digits", "/v2/models/digits/config", "/v2/nowhere"):
            assert server.request("GET", path)[0] == 401, path
        code, message = grpc_refusal(server, None)
        assert code == "StatusCode.UNAUTHENTICATED"
        assert message == doc["error"]
        client = grpc_client(server)
        with pytest.raises(InferenceServerException, match="UNAUTHENTICATED"):
            client.get_server_metadata()
        client.close()

        # Tokens the cluster refuses: garbage, and a JWT like a real one signed by a key it does not know.
        foreign = sign(
            _header(accounts.reader),
            like(accounts.reader, issued=time.time() - 60, lifetime=600),
            rsa.generate_private_key(public_exponent=65537, key_size=2048),
        )
        for token in ("not-a-token", foreign):
            status, head, doc = rest_infer(server, bearer(token))
            assert status == 401, doc
            assert head["www-authenticate"] == 'Bearer realm="kiln", error="invalid_token"'
            assert doc["error"].startswith("authorization: the bearer token is not valid in this cluster")
            assert set(doc) == {"error"}
            code, message = grpc_refusal(server, token)
            assert code == "StatusCode.UNAUTHENTICATED"
            assert message == doc["error"]

        # The reader: the model's answer, over both protocols.
        status, _, doc = rest_infer(server, bearer(accounts.reader))
        assert status == 200, doc
        np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(1, 10), expected, atol=1e-5)
        np.testing.assert_allclose(grpc_infer(server, accounts.reader), expected, atol=1e-5)
        assert server.request("GET", "/v2/models/digits", headers=bearer(accounts.reader))[0] == 200

        # Authenticated but not allowed: 403 naming the user and the permission, and no model output.
        status, head, doc = rest_infer(server, bearer(accounts.stranger))
        denied = (
            f'authorization: user "{accounts.user("stranger")}" may not create modeldeployments/predict '
            f'"{DEPLOYMENT}" in namespace "{accounts.namespace}"'
        )
        assert (status, doc) == (403, {"error": denied})
        assert "www-authenticate" not in head
        assert grpc_refusal(server, accounts.stranger) == ("StatusCode.PERMISSION_DENIED", denied)

        # Four tokens were reviewed (garbage, foreign, reader, stranger), two got as far as the access check; every
        # repeat was answered from the cache.
        m = server.metrics()
        assert counter(m, "kiln_server_auth_reviews_total", model="digits", kind="token") == 4
        assert counter(m, "kiln_server_auth_reviews_total", model="digits", kind="access") == 2
        assert counter(m, "kiln_server_auth_cache_entries", model="digits") == 4
        results = {r: counter(m, "kiln_server_auth_requests_total", model="digits", result=r) for r in RESULTS}
        assert results == {"allowed": 3, "unauthenticated": 14, "forbidden": 2, "error": 0}
        # Refused requests never reached the model: only the reader's two inferences are counted there.
        assert counter(m, "kiln_server_requests_total", model="digits", code="200") == 2

        # The access log names the caller; the log holds no token and nothing above INFO.
        lines = wait_for(
            lambda: [json.loads(x) for x in server.log.splitlines() if x.startswith("{")] or None,
            what="access log lines",
            timeout=10,
        )
        assert [(x["protocol"], x["user"]) for x in lines] == [
            ("rest", accounts.user("reader")),
            ("grpc", accounts.user("reader")),
        ]
        log = server.log
        for token in (accounts.reader, accounts.stranger, foreign):
            assert token not in log
        assert " WARNING " not in log
        assert " ERROR " not in log
    finally:
        assert server.terminate() == 0, server.log


RESULTS = ("allowed", "unauthenticated", "forbidden", "error")


def test_an_expired_token_signed_by_the_cluster_is_refused(
    cluster: Cluster, accounts: Accounts, api_server: Api, model: tuple[str, np.ndarray], tmp_path: Path
):
    key = cluster_signing_key(cluster)
    uri, expected = model
    now = time.time()
    header = _header(accounts.reader)
    expired = sign(header, like(accounts.reader, issued=now - 7200, lifetime=3600), key)
    # The same construction, still valid: proof that only the expiry makes the difference.
    current = sign(header, like(accounts.reader, issued=now - 60, lifetime=600), key)
    server = auth_server(tmp_path, uri, api_server, accounts)
    try:
        server.wait_ready()
        status, _, doc = rest_infer(server, bearer(current))
        assert status == 200, doc
        np.testing.assert_allclose(grpc_infer(server, current), expected, atol=1e-5)
        status, head, doc = rest_infer(server, bearer(expired))
        assert status == 401, doc
        assert "expired" in doc["error"]
        assert head["www-authenticate"] == 'Bearer realm="kiln", error="invalid_token"'
        assert grpc_refusal(server, expired) == ("StatusCode.UNAUTHENTICATED", doc["error"])
    finally:
        assert server.terminate() == 0, server.log


def test_one_review_per_burst_and_a_revoked_binding_within_the_ttl(
    cluster: Cluster, accounts: Accounts, api_server: Api, model: tuple[str, np.ndarray], tmp_path: Path
):
    uri, expected = model
    ttl = 2.0
    server = auth_server(tmp_path, uri, api_server, accounts, "--auth-cache-ttl", str(ttl))
    try:
        server.wait_ready()
        # 32 concurrent clients with one new token: one TokenReview and one access review between them.
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(lambda _: rest_infer(server, bearer(accounts.reader)), range(32)))
        assert [a[0] for a in answers] == [200] * 32
        for _, _, doc in answers:
            np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(1, 10), expected, atol=1e-5)
        m = server.metrics()
        assert counter(m, "kiln_server_auth_reviews_total", model="digits", kind="token") == 1
        assert counter(m, "kiln_server_auth_reviews_total", model="digits", kind="access") == 1
        # The same over gRPC, with another token of the same account (a token is what is cached, not a user).
        second = _token(cluster, accounts.namespace, "reader")
        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            logits = list(pool.map(lambda _: grpc_infer(server, second), range(32)))
        for out in logits:
            np.testing.assert_allclose(out, expected, atol=1e-5)
        m = server.metrics()
        assert counter(m, "kiln_server_auth_reviews_total", model="digits", kind="token") == 2
        assert counter(m, "kiln_server_auth_reviews_total", model="digits", kind="access") == 2
        assert counter(m, "kiln_server_auth_requests_total", model="digits", result="allowed") == 64

        # The reader's RoleBinding revoked: both tokens refused within the TTL (plus the API server's own RBAC
        # cache, which follows its watch in well under a second).
        cluster.kubectl("delete", "rolebinding", f"reader-predict-{DEPLOYMENT}", "-n", accounts.namespace)
        revoked = time.monotonic()
        wait_for(
            lambda: rest_infer(server, bearer(accounts.reader))[0] == 403,
            what="the revoked binding refused over REST",
            timeout=ttl + 3,
            interval=0.1,
        )
        wait_for(
            lambda: grpc_denied(server, second),
            what="the revoked binding refused over gRPC",
            timeout=max(ttl + 3 - (time.monotonic() - revoked), 0.1),
            interval=0.1,
        )
        assert time.monotonic() - revoked <= ttl + 3
        code, message = grpc_refusal(server, second)
        assert code == "StatusCode.PERMISSION_DENIED"
        assert accounts.user("reader") in message
        # Granted again: a denial is cached no longer than an approval.
        _apply(cluster, reader_binding(accounts.namespace))
        wait_for(
            lambda: rest_infer(server, bearer(accounts.reader))[0] == 200,
            what="the binding restored",
            timeout=ttl + 3,
            interval=0.1,
        )
    finally:
        assert server.terminate() == 0, server.log


def test_the_api_server_unable_to_answer_is_a_503_never_cached(
    cluster: Cluster, namespace: str, api_server: Api, model: tuple[str, np.ndarray], tmp_path: Path
):
    uri, expected = model
    # The server's account without its TokenReview grant: the API server refuses the server itself.
    accounts = server_identity(cluster, namespace, tmp_path, token_review=False)
    server = auth_server(tmp_path, uri, api_server, accounts, "--auth-cache-ttl", "300")
    try:
        server.wait_ready()
        for _ in range(3):
            status, head, doc = rest_infer(server, bearer(accounts.reader))
            assert status == 503, doc
            assert head["retry-after"] == "1"
            assert set(doc) == {"error"}
            assert doc["error"].startswith("authorization: the token cannot be checked now")
        code, _ = grpc_refusal(server, accounts.reader)
        assert code == "StatusCode.UNAVAILABLE"
        m = server.metrics()
        assert counter(m, "kiln_server_auth_requests_total", model="digits", result="error") == 4
        assert counter(m, "kiln_server_auth_cache_entries", model="digits") == 0
        warnings = [line for line in server.log.splitlines() if " WARNING " in line]
        assert len(warnings) == 1, warnings  # once per distinct failure, not per request
        assert "tokenreviews" in warnings[0]
        assert "403" in warnings[0]
        assert " ERROR " not in server.log

        # Granted now: the next request is reviewed again at once (a failure was not cached, unlike a decision).
        _apply(cluster, token_review_binding(accounts.binding, namespace))
        try:
            wait_for(
                lambda: rest_infer(server, bearer(accounts.reader))[0] == 200,
                what="the review allowed once the server may make it",
                timeout=10,
                interval=0.1,
            )
            np.testing.assert_allclose(grpc_infer(server, accounts.reader), expected, atol=1e-5)
        finally:
            cluster.kubectl("delete", "clusterrolebinding", accounts.binding, "--ignore-not-found", check=False)
    finally:
        assert server.terminate() == 0, server.log

    # An API server that does not answer at all: 503 too, and the server keeps serving its probes.
    down = auth_server(tmp_path, uri, api_server, accounts, kube_api=f"https://127.0.0.1:{free_port()}")
    try:
        down.wait_ready()
        status, _, doc = rest_infer(down, bearer(accounts.reader))
        assert status == 503, doc
        assert grpc_refusal(down, accounts.reader)[0] == "StatusCode.UNAVAILABLE"
        assert "Connect" in down.log
    finally:
        assert down.terminate() == 0, down.log


def test_the_servers_own_token_is_read_again_when_the_api_server_refuses_it(
    cluster: Cluster, accounts: Accounts, api_server: Api, model: tuple[str, np.ndarray], tmp_path: Path
):
    """The kubelet rotates a projected token by writing a new one over the file; the server must not keep using the
    one it read at start. Here the old one is made invalid (its ServiceAccount made anew, same name and bindings,
    new uid) and a new token written over the file."""
    uri, _ = model
    server = auth_server(tmp_path, uri, api_server, accounts, "--auth-cache-ttl", "0")  # every request reviewed
    try:
        server.wait_ready()
        assert rest_infer(server, bearer(accounts.reader))[0] == 200
        cluster.kubectl("delete", "serviceaccount", "kiln-server", "-n", accounts.namespace)
        cluster.kubectl("create", "serviceaccount", "kiln-server", "-n", accounts.namespace)
        fresh = accounts.token_file.with_name("server-token.new")
        fresh.write_text(_token(cluster, accounts.namespace, "kiln-server"))
        fresh.replace(accounts.token_file)
        refused = "401: the API server does not accept the server's own token"

        # The API server honours a token it authenticated for 10 s more (its own success cache): until then the old
        # one still works. Then one review fails (503), and the next is made with the new token.
        def old_token_refused() -> bool:
            status = rest_infer(server, bearer(accounts.reader))[0]
            assert status in (200, 503), status
            return refused in server.log

        wait_for(old_token_refused, what="the API server refusing the old token", timeout=25, interval=0.2)
        wait_for(
            lambda: rest_infer(server, bearer(accounts.reader))[0] == 200,
            what="reviews made with the new token",
            timeout=5,
            interval=0.1,
        )
        # One request paid for the old token; the file was read again at once, not a minute later.
        assert counter(server.metrics(), "kiln_server_auth_requests_total", model="digits", result="error") == 1
        assert " ERROR " not in server.log
    finally:
        assert server.terminate() == 0, server.log
