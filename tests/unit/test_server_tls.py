"""TLS on the inference ports (docs/security.md "TLS"): a real server process on loopback with a CA and a leaf made
here, clients that verify the chain (REST through http.client and tritonclient.http, gRPC through
tritonclient.grpc), the certificate renewed the way the kubelet renews a Secret volume, a broken renewal that keeps
the old pair serving, and the usage errors of the flags. Every wait polls a condition with a deadline."""

from __future__ import annotations

import http.client
import socket
import ssl
import subprocess
import sys
from pathlib import Path

import gevent.ssl
import numpy as np
import onnxruntime as ort
import pytest
import tritonclient.grpc as tg
import tritonclient.http as th
from support.pki import Ca, Leaf, make_ca, make_leaf, write_secret_volume
from support.server import ServerProcess, counter, image_artifact, image_request, server_env
from support.waiting import wait_for
from tritonclient.utils import InferenceServerException

from kiln_server import app

PIXELS = np.linspace(-1, 1, 2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)


def client_context(ca_file: Path) -> ssl.SSLContext:
    """A client that trusts only this CA and checks the name (127.0.0.1 is in the leaf's SANs)."""
    return ssl.create_default_context(cafile=str(ca_file))


def rest_status(server: ServerProcess, ca_file: Path, path: str = "/v2/health/ready") -> int:
    conn = http.client.HTTPSConnection("127.0.0.1", server.port, timeout=10, context=client_context(ca_file))
    try:
        conn.request("GET", path)
        return conn.getresponse().status
    finally:
        conn.close()


def rest_trusts(server: ServerProcess, ca_file: Path) -> bool:
    """Whether a new REST connection verifying against `ca_file` gets through (a fresh handshake each time)."""
    try:
        return rest_status(server, ca_file) == 200
    except ssl.SSLCertVerificationError:
        return False


def grpc_trusts(server: ServerProcess, ca_file: Path) -> bool:
    """The same over gRPC: a new channel, so a new handshake."""
    client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}", ssl=True, root_certificates=str(ca_file))
    try:
        return bool(client.is_server_live(client_timeout=10))
    except InferenceServerException as e:
        refused = e
    finally:
        client.close()
    assert "UNAVAILABLE" in str(refused.status()), refused  # a handshake refused, nothing else
    return False


def grpc_logits(server: ServerProcess, ca_file: Path) -> np.ndarray:
    client = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}", ssl=True, root_certificates=str(ca_file))
    try:
        pixels = tg.InferInput("pixel_values", list(PIXELS.shape), "FP32")
        pixels.set_data_from_numpy(PIXELS)
        return client.infer(server.name, [pixels], client_timeout=30).as_numpy("logits")
    finally:
        client.close()


def install(folder: Path, leaf: Leaf, key: bytes | None = None) -> None:
    write_secret_volume(folder, {"tls.crt": leaf.cert_pem, "tls.key": key if key is not None else leaf.key_pem})


def tls_server(tmp_path: Path, root: str, secret: Path) -> ServerProcess:
    """The digits model served over TLS with the key pair in `secret` (laid out as a kubernetes.io/tls volume)."""
    return ServerProcess(
        tmp_path,
        image_artifact(root)[0],
        "--tls-cert-file",
        str(secret / "tls.crt"),
        "--tls-key-file",
        str(secret / "tls.key"),
        name="digits",
    )


@pytest.fixture
def onnx_logits(root: str) -> np.ndarray:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    session = ort.InferenceSession(str(image_artifact(root)[1]), so, providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"pixel_values": PIXELS})[0]


def test_tls_serves_rest_and_grpc_and_picks_up_a_renewed_certificate(
    tmp_path: Path, root: str, onnx_logits: np.ndarray
):
    ca1, ca2, ca3 = make_ca("kiln-test-ca-1"), make_ca("kiln-test-ca-2"), make_ca("kiln-test-ca-3")
    ca1_file, ca2_file, ca3_file = (ca.write(tmp_path / f"{ca.name}.crt") for ca in (ca1, ca2, ca3))
    secret = tmp_path / "tls"
    first = make_leaf(ca1, days=7)
    install(secret, first)
    server = tls_server(tmp_path, root, secret)
    server.client_ssl = client_context(ca1_file)
    server.start()
    try:
        server.wait_ready()
        # REST over TLS, the chain verified: health, metadata and inference equal to ONNX Runtime.
        assert server.request("GET", "/v2/health/live")[0] == 200
        status, doc = server.infer(image_request(PIXELS))
        assert status == 200, doc
        np.testing.assert_allclose(np.array(doc["outputs"][0]["data"]).reshape(2, 10), onnx_logits, atol=1e-5)
        # tritonclient.http, verifying with the CA too.
        client = th.InferenceServerClient(
            f"127.0.0.1:{server.port}",
            ssl=True,
            ssl_options={"ca_certs": str(ca1_file)},
            ssl_context_factory=gevent.ssl.create_default_context,
        )
        try:
            assert client.is_server_ready()
            pixels = th.InferInput("pixel_values", list(PIXELS.shape), "FP32")
            pixels.set_data_from_numpy(PIXELS)
            np.testing.assert_allclose(client.infer("digits", [pixels]).as_numpy("logits"), onnx_logits, atol=1e-5)
        finally:
            client.close()
        # gRPC over TLS, with the CA as its root.
        np.testing.assert_allclose(grpc_logits(server, ca1_file), onnx_logits, atol=1e-5)

        # The inference ports speak TLS only: plain HTTP and plaintext gRPC get nowhere; a client that does not
        # trust the CA is refused.
        with pytest.raises((http.client.HTTPException, OSError)):
            _plain_http(server)
        plain = tg.InferenceServerClient(f"127.0.0.1:{server.grpc_port}")
        with pytest.raises(InferenceServerException, match="UNAVAILABLE"):
            plain.is_server_live(client_timeout=5)
        plain.close()
        assert not rest_trusts(server, ca2_file)
        assert not grpc_trusts(server, ca2_file)

        # Metrics stay plain HTTP; the expiry is the certificate's notAfter, no reload yet.
        m = server.metrics()
        assert counter(m, "kiln_server_tls_certificate_expiry_timestamp_seconds", model="digits") == first.not_after
        assert counter(m, "kiln_server_tls_reloads_total", model="digits", result="success") == 0
        assert 'kiln_server_tls_reloads_total{model="digits",result="failure"}' in m

        # Renewal from a NEW CA, swapped in as the kubelet does: new handshakes get it, without a restart.
        second = make_leaf(ca2, days=20)
        install(secret, second)
        wait_for(
            lambda: rest_trusts(server, ca2_file) and grpc_trusts(server, ca2_file),
            what="the renewed certificate served over REST and gRPC",
            timeout=20,
        )
        assert not rest_trusts(server, ca1_file)
        assert not grpc_trusts(server, ca1_file)
        np.testing.assert_allclose(grpc_logits(server, ca2_file), onnx_logits, atol=1e-5)
        m = server.metrics()
        assert counter(m, "kiln_server_tls_reloads_total", model="digits", result="success") == 1
        assert counter(m, "kiln_server_tls_certificate_expiry_timestamp_seconds", model="digits") == second.not_after

        # A broken renewal (a key that is not the certificate's) keeps the second pair serving, with a WARNING.
        third = make_leaf(ca3)
        install(secret, third, key=make_leaf(ca3).key_pem)
        wait_for(
            lambda: counter(server.metrics(), "kiln_server_tls_reloads_total", model="digits", result="failure") == 1,
            what="the broken pair refused",
            timeout=20,
        )
        assert "WARNING kiln_server.tls: TLS: keeping the current certificate" in server.log
        assert "--tls-key-file" in server.log
        assert rest_trusts(server, ca2_file)
        assert grpc_trusts(server, ca2_file)
        assert not rest_trusts(server, ca3_file)
        server.client_ssl = client_context(ca2_file)
        status, doc = server.infer(image_request(PIXELS))
        assert status == 200, doc
        # A truncated certificate is refused the same way; then a good pair is served again.
        write_secret_volume(secret, {"tls.crt": third.cert_pem[:200], "tls.key": third.key_pem})
        wait_for(
            lambda: counter(server.metrics(), "kiln_server_tls_reloads_total", model="digits", result="failure") == 2,
            what="the truncated certificate refused",
            timeout=20,
        )
        assert rest_trusts(server, ca2_file)
        install(secret, third)
        wait_for(
            lambda: rest_trusts(server, ca3_file) and grpc_trusts(server, ca3_file),
            what="the third certificate served",
            timeout=20,
        )
        m = server.metrics()
        assert counter(m, "kiln_server_tls_reloads_total", model="digits", result="success") == 2
        assert counter(m, "kiln_server_tls_reloads_total", model="digits", result="failure") == 2
        assert " ERROR " not in server.log
    finally:
        assert server.terminate() == 0, server.log


def _plain_http(server: ServerProcess) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=5)
    try:
        conn.request("GET", "/v2/health/live")
        return conn.getresponse().status
    finally:
        conn.close()


def test_probes_without_verification_and_without_a_server_name(tmp_path: Path, root: str):
    """What the kubelet does: HTTPS to the pod IP, no verification, no SNI."""
    ca = make_ca("kiln-probe-ca")
    secret = tmp_path / "tls"
    install(secret, make_leaf(ca))
    server = tls_server(tmp_path, root, secret)
    probe = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    probe.check_hostname = False
    probe.verify_mode = ssl.CERT_NONE
    server.client_ssl = probe
    server.start()
    try:
        server.wait_ready()
        assert server.request("GET", "/v2/health/live")[0] == 200
        # The served certificate is the leaf even when the client names no server (the SNI callback still runs).
        with (
            socket.create_connection(("127.0.0.1", server.port), timeout=10) as raw,
            probe.wrap_socket(raw, server_hostname=None) as tls,
        ):
            der = tls.getpeercert(binary_form=True)
        assert der == make_der(secret / "tls.crt")
    finally:
        assert server.terminate() == 0, server.log


def make_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def _files(tmp_path: Path, ca: Ca) -> dict[str, Path]:
    leaf, other = make_leaf(ca), make_leaf(ca)
    out = {
        "crt": tmp_path / "tls.crt",
        "key": tmp_path / "tls.key",
        "other_key": tmp_path / "other.key",
        "garbage": tmp_path / "garbage.pem",
        "token": tmp_path / "token",
    }
    out["crt"].write_bytes(leaf.cert_pem)
    out["key"].write_bytes(leaf.key_pem)
    out["other_key"].write_bytes(other.key_pem)
    out["garbage"].write_text("not a certificate\n")
    out["token"].write_text("a-token\n")
    return out


def test_usage_errors_name_the_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
):
    """The flags of TLS and --auth: every bad combination or file exits 2 before anything starts, naming the flag
    or variable and the rule."""
    f = _files(tmp_path, make_ca("kiln-usage-ca"))
    for name in ("KUBERNETES_SERVICE_HOST", "KILN_SERVER_KUBE_API", "KILN_SERVER_KUBE_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    base = ["--model-uri", "file:///nowhere"]
    auth = ["--auth", "kubernetes", "--namespace", "ns", "--deployment", "sentiment"]
    cases: list[tuple[list[str], dict[str, str], str]] = [
        (["--tls-cert-file", str(f["crt"])], {}, "--tls-key-file: required with --tls-cert-file (both or neither)"),
        (["--tls-key-file", str(f["key"])], {}, "--tls-cert-file: required with --tls-key-file (both or neither)"),
        (
            ["--tls-cert-file", str(tmp_path / "absent.crt"), "--tls-key-file", str(f["key"])],
            {},
            "--tls-cert-file: cannot be read: No such file or directory",
        ),
        (
            ["--tls-cert-file", str(f["crt"])],
            {"KILN_SERVER_TLS_KEY_FILE": str(tmp_path)},
            "KILN_SERVER_TLS_KEY_FILE: cannot be read: Is a directory",
        ),
        (
            ["--tls-cert-file", str(f["garbage"]), "--tls-key-file", str(f["key"])],
            {},
            f"--tls-cert-file: {f['garbage']}: no PEM certificate in it",
        ),
        (
            ["--tls-cert-file", str(f["crt"]), "--tls-key-file", str(f["garbage"])],
            {},
            f"--tls-key-file: {f['garbage']}: no PEM private key in it",
        ),
        (
            ["--tls-cert-file", str(f["crt"]), "--tls-key-file", str(f["other_key"])],
            {},
            f"--tls-key-file: {f['other_key']} is not the key of the certificate in {f['crt']}",
        ),
        (["--auth", "oidc"], {}, "--auth: must be one of none, kubernetes (got 'oidc')"),
        (
            ["--auth", "kubernetes", "--deployment", "sentiment"],
            {},
            "--namespace (or $KILN_SERVER_NAMESPACE) is required with --auth kubernetes outside a pod",
        ),
        (["--auth", "kubernetes", "--namespace", "ns"], {}, "--deployment (or $KILN_SERVER_DEPLOYMENT) is required"),
        ([*auth[:4], "--deployment", "Sentiment"], {}, "--deployment: must be a ModelDeployment name"),
        (["--namespace", "Team_A"], {}, "--namespace: must be a namespace name"),
        (["--auth-cache-ttl", "-1"], {}, "--auth-cache-ttl: must be a number of seconds from 0 to 3600 (got '-1')"),
        ([], {"KILN_SERVER_AUTH_CACHE_SIZE": "0"}, "KILN_SERVER_AUTH_CACHE_SIZE: must be 1-1000000 (got '0')"),
        (auth, {}, "--auth kubernetes: no Kubernetes API server to ask: $KUBERNETES_SERVICE_HOST is not set"),
        (
            auth,
            {"KILN_SERVER_KUBE_API": "http://127.0.0.1:6443"},
            "$KILN_SERVER_KUBE_API: must be an https:// URL of the Kubernetes API server",
        ),
        (
            auth,
            {"KILN_SERVER_KUBE_API": "https://127.0.0.1:6443", "KILN_SERVER_KUBE_TOKEN_FILE": str(tmp_path / "no")},
            f"$KILN_SERVER_KUBE_TOKEN_FILE: cannot read {tmp_path / 'no'}: No such file or directory",
        ),
        (
            auth,
            {
                "KILN_SERVER_KUBE_API": "https://127.0.0.1:6443",
                "KILN_SERVER_KUBE_TOKEN_FILE": str(f["token"]),
                "KILN_SERVER_KUBE_CA_FILE": str(f["garbage"]),
            },
            f"$KILN_SERVER_KUBE_CA_FILE: {f['garbage']} is not a readable PEM CA bundle",
        ),
    ]
    for argv, env, message in cases:
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            assert app.main([*base, *argv]) == 2, (argv, env)
        err = capsys.readouterr().err
        assert message in err, (argv, env, err)
        assert err.startswith("kiln-server: ")


def test_usage_error_exits_2_from_the_process(tmp_path: Path):
    f = _files(tmp_path, make_ca("kiln-process-ca"))
    p = subprocess.run(
        [sys.executable, "-m", "kiln_server", "--model-uri", "file:///x", "--tls-cert-file", str(f["crt"])],
        env={**server_env(), "KILN_SERVER_TLS_KEY_FILE": str(f["other_key"])},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert p.returncode == 2, p.stderr
    assert f"--tls-key-file: {f['other_key']} is not the key of the certificate in {f['crt']}" in p.stderr
