"""Who may call the inference server, and what it costs: the server's own checks against kube-rbac-proxy, and TLS.

    .venv/bin/python -m bench.auth                         # every configuration, about 6 minutes
    .venv/bin/python -m bench.auth --seconds 40 --turns 8  # longer, steadier figures
    .venv/bin/python -m bench.auth --configs plain,auth --no-grpc

Run from the repository root, with the local cluster up (KILN_TEST_KUBECONFIG, else KUBECONFIG, else the one
hack/cluster.sh writes; this script never starts or stops a cluster) and kube-rbac-proxy built
(hack/build-kube-rbac-proxy.sh). Everything stays on this machine: servers on loopback, the cluster's API server.

In a namespace of its own (``kiln-bench-auth-<random>``, deleted at the end with every cluster-scoped object it
made, also on failure or SIGTERM) it creates ServiceAccounts: ``client``, allowed by a Role to ``create``
``modeldeployments/predict`` of the ModelDeployment ``bench`` (group kiln.dev); ``stranger``, allowed nothing;
``kiln-server``, bound to copies of the ClusterRoles of manifests/server-roles/clusterroles.yaml as the operator binds
them (TokenReview by a ClusterRoleBinding, LocalSubjectAccessReview by a RoleBinding in the namespace);
``kube-rbac-proxy``, bound to ``system:auth-delegator`` (TokenReview and the cluster-scoped SubjectAccessReview,
which is what kube-rbac-proxy asks: it cannot use the namespaced review).

Then real server processes on loopback (bench/server.py's Kiln server command: the same MiniLM artifact, ``--instances
2 --intra-op-threads 1``, greedy batching) in these configurations:

- ``plain``: no auth, no TLS (the baseline);
- ``auth``: ``--auth kubernetes`` (default cache TTL), the client's token as ``Authorization: Bearer``;
- ``proxy``: kube-rbac-proxy in front of the plain server (``--insecure-listen-address``, so that it compares with
  ``auth`` without TLS; ``--upstream http://127.0.0.1:PORT/``; ``--config-file`` with the same resourceAttributes);
- ``tls``: the server with ``--tls-cert-file``/``--tls-key-file`` (ECDSA P-256, made here with ``cryptography``;
  the client verifies against the CA);
- ``auth-tls``: both;
- ``proxy-tls``: kube-rbac-proxy with ``--secure-listen-address`` and the same certificate (how it is deployed);
- ``grpc-plain``, ``grpc-auth``: the plain and the auth server's gRPC port (the token as ``authorization`` metadata).

Each configuration is first checked (the client's token answers 200 with the plain server's logits; with auth, no
token 401 and the stranger's 403), then measured at ``--clients`` closed-loop clients (one keep-alive connection
each, bench/server.py's load generator) and at ``--latency-clients``, in short turns that alternate their order
from round to round, so that the drift of this shared machine weighs on every configuration alike. Each turn also
records the CPU time the server processes (and the proxy) spent per request answered: at saturation throughput is
the cores over that cost, a figure the other work on the machine hardly moves.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import os
import secrets
import signal
import ssl
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from bench import server as srv
from tests.support import net, pki
from tests.support.cluster import Cluster, bin_dir, service_account_kubeconfig

REPO = Path(__file__).resolve().parents[1]
PY = sys.executable
DEFAULT_KUBECONFIG = REPO / ".kwok/clusters/kiln/kubeconfig.yaml"
DEPLOYMENT = "bench"
RUN_LABEL = "kiln.dev/bench-auth"
ALL_CONFIGS = ("plain", "auth", "proxy", "tls", "auth-tls", "proxy-tls")
GRPC_CONFIGS = ("grpc-plain", "grpc-auth")

# bench/server.py picks ports the kernel may also hand to an outgoing connection (the load's, the proxy's to its
# upstream, the servers' to the API server) before the server binds them; tests/support/net.py picks outside that
# range. bench.server.kiln_server looks the function up at call time.
srv.free_port = net.free_port

log = srv.log


# ------------------------------------------------------------------------------------------------ load generator
# bench/server.py's load generator, unchanged, with two things added in its own process: TLS (its closed loop opens
# connections with asyncio.open_connection, given the client's SSL context here) and the bearer token (a header line
# in each pre-built request); and a gRPC closed loop that sends the token as metadata.
assert srv.LOADGEN.rstrip().endswith("main()"), "bench/server.py's LOADGEN no longer ends with its main() call"
LOADGEN = srv.LOADGEN.rstrip().removesuffix("main()") + textwrap.dedent(
    """
        import functools, ssl

        def auth_main():
            cfg = json.loads(sys.argv[1])
            token = cfg.get("token")
            if cfg.get("ca"):
                ctx = ssl.create_default_context(cafile=cfg["ca"])
                asyncio.open_connection = functools.partial(asyncio.open_connection, ssl=ctx)
            if token:
                plain_requests = requests

                def with_token(*a):
                    out = []
                    for r in plain_requests(*a):
                        line, rest = r.split(b"\\r\\n", 1)
                        out.append(line + f"\\r\\nAuthorization: Bearer {token}\\r\\n".encode() + rest)
                    return out

                globals()["requests"] = with_token
            if cfg.get("grpc"):
                bodies = [bytes.fromhex(b) for b in cfg["grpc"]]
                lat, errors, secs = asyncio.run(grpc_loop(cfg["host"], cfg["port"], bodies, token, cfg["clients"],
                                                          cfg["warmup"], cfg["seconds"]))
            else:
                lat, errors, secs = asyncio.run(closed_loop(cfg["host"], cfg["port"], cfg["path"], cfg["sentences"],
                                                            cfg["clients"], cfg["warmup"], cfg["seconds"]))
            lat.sort()
            def q(p):
                return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
            print(json.dumps({"rps": len(lat) / secs, "p50": q(0.5), "p95": q(0.95), "p99": q(0.99),
                              "n": len(lat), "errors": errors, "seconds": secs,
                              "latencies_ms": [round(x * 1000, 2) for x in lat]}))

        async def grpc_loop(host, port, bodies, token, clients, warmup, seconds):
            # grpc_closed_loop of bench/server.py, with the token as call metadata (None for the plain server).
            import grpc
            lat, errors = [], 0
            metadata = (("authorization", f"Bearer {token}"),) if token else None
            t_start = time.perf_counter() + warmup
            t_end = t_start + seconds

            async def client(i):
                nonlocal errors
                rng = random.Random(i)
                async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
                    infer = channel.unary_unary("/inference.GRPCInferenceService/ModelInfer")
                    while True:
                        t0 = time.perf_counter()
                        if t0 >= t_end:
                            break
                        try:
                            await infer(bodies[rng.randrange(len(bodies))], metadata=metadata)
                            ok = True
                        except grpc.aio.AioRpcError:
                            ok = False
                        t1 = time.perf_counter()
                        if t_start <= t1 <= t_end:
                            if ok:
                                lat.append(t1 - t0)
                            else:
                                errors += 1

            await asyncio.gather(*(client(i) for i in range(clients)))
            return lat, errors, seconds

        auth_main()
        """
)


# ---------------------------------------------------------------------------------------------------- TLS
def make_tls(d: Path) -> tuple[Path, Path, Path]:
    """A CA and a serving certificate for 127.0.0.1 and localhost signed by it (the tests' own, ECDSA P-256):
    (ca.crt, tls.crt, tls.key). The handshake is paid once per keep-alive connection, so the key type hardly matters
    here; what every request pays is the record layer (AES-GCM)."""
    ca = pki.make_ca("kiln bench-auth CA")
    leaf = pki.make_leaf(ca, days=1)
    paths = (ca.write(d / "ca.crt"), d / "tls.crt", d / "tls.key")
    paths[1].write_bytes(leaf.cert_pem)
    paths[2].write_bytes(leaf.key_pem)
    paths[2].chmod(0o600)
    return paths


# -------------------------------------------------------------------------------------------------- cluster
@dataclass
class Identities:
    namespace: str
    api_url: str
    api_ca: Path
    server_token: Path  # the kiln-server ServiceAccount's token, as the server's KILN_SERVER_KUBE_TOKEN_FILE
    proxy_kubeconfig: Path
    client: str  # bearer tokens
    stranger: str


def kubeconfig_path() -> str:
    for var in ("KILN_TEST_KUBECONFIG", "KUBECONFIG"):
        if os.environ.get(var):
            return os.environ[var].split(os.pathsep)[0]
    return str(DEFAULT_KUBECONFIG)


def apply(cluster: Cluster, docs: list[dict[str, Any]]) -> None:
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))


@contextlib.contextmanager
def identities(cluster: Cluster, work: Path, run_id: str) -> Iterator[Identities]:
    """The namespace, ServiceAccounts, Roles and bindings described in the module's docstring; all removed on
    exit: the namespace, and every cluster-scoped object labelled with this run."""
    ns = f"kiln-bench-auth-{run_id}"
    labels = {RUN_LABEL: run_id}

    def meta(name: str, **more: str) -> dict[str, Any]:
        return {"name": name, "labels": labels, **more}

    def sa(name: str) -> dict[str, str]:
        return {"kind": "ServiceAccount", "name": name, "namespace": ns}

    try:
        log(f"cluster: namespace {ns}, ServiceAccounts, Role, bindings")
        apply(cluster, [{"apiVersion": "v1", "kind": "Namespace", "metadata": meta(ns)}])
        docs: list[dict[str, Any]] = [
            {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(n, namespace=ns)}
            for n in ("client", "stranger", "kiln-server", "kube-rbac-proxy")
        ]
        # Who may call: create on the predict subresource of this one ModelDeployment, as docs/security.md grants.
        docs.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
            "metadata": meta("predict-bench", namespace=ns),
            "rules": [{"apiGroups": ["kiln.dev"], "resources": ["modeldeployments/predict"], "verbs": ["create"],
                       "resourceNames": [DEPLOYMENT]}],
        })  # fmt: skip
        docs.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta("predict-bench-client", namespace=ns),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "predict-bench"},
            "subjects": [sa("client")],
        })  # fmt: skip
        # The server's own permissions: copies of the install's ClusterRoles under this run's names, so that the
        # bench neither depends on the install nor deletes anything it did not make.
        roles = {}
        for doc in yaml.safe_load_all((REPO / "manifests/server-roles/clusterroles.yaml").read_text()):
            name = f"{doc['metadata']['name']}-{run_id}"
            roles[doc["metadata"]["name"]] = name
            docs.append({**doc, "metadata": meta(name)})
        docs.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": meta(f"kiln-bench-auth-{run_id}-tokenreview"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": roles["kiln-server-tokenreview"]},
            "subjects": [sa("kiln-server")],
        })  # fmt: skip
        docs.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
            "metadata": meta("kiln-server-access-review", namespace=ns),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": roles["kiln-server-access-review"]},
            "subjects": [sa("kiln-server")],
        })  # fmt: skip
        # kube-rbac-proxy asks SubjectAccessReview, cluster-scoped: system:auth-delegator (TokenReview and
        # SubjectAccessReview create) lets it ask about any user in any namespace.
        docs.append({
            "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
            "metadata": meta(f"kiln-bench-auth-{run_id}-proxy"),
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                        "name": "system:auth-delegator"},
            "subjects": [sa("kube-rbac-proxy")],
        })  # fmt: skip
        apply(cluster, docs)

        admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
        api = admin["clusters"][0]["cluster"]
        api_ca = work / "api-ca.crt"
        api_ca.write_bytes(base64.b64decode(api["certificate-authority-data"]))

        def token(name: str) -> str:
            return cluster.kubectl("create", "token", name, "-n", ns, "--duration=2h").stdout.strip()

        server_token = work / "kiln-server.token"
        server_token.write_text(token("kiln-server"))
        server_token.chmod(0o600)
        proxy_kc = service_account_kubeconfig(cluster, work / "kube-rbac-proxy.kubeconfig", name="kube-rbac-proxy",
                                              namespace=ns)  # fmt: skip
        yield Identities(ns, api["server"], api_ca, server_token, proxy_kc, token("client"), token("stranger"))
    finally:
        log(f"cluster: deleting namespace {ns} and this run's ClusterRoles and ClusterRoleBindings")
        cluster.kubectl("delete", "namespace", ns, "--ignore-not-found", "--wait=false", check=False)
        cluster.kubectl("delete", "clusterrolebinding,clusterrole", "-l", f"{RUN_LABEL}={run_id}",
                        "--ignore-not-found", check=False)  # fmt: skip


# -------------------------------------------------------------------------------------------------- servers
@dataclass
class Target:
    """One configuration under load: where the load goes, with what, and whose CPU it costs."""

    name: str
    port: int
    path: str
    token: str | None = None
    ca: Path | None = None
    grpc: bool = False
    counted: srv.Server | None = None  # the Kiln server whose /metrics counts the requests answered
    processes: list[srv.Server] = field(default_factory=list)  # whose CPU time a request costs

    @property
    def url(self) -> str:
        return f"{'https' if self.ca else 'http'}://127.0.0.1:{self.port}{self.path}"


def wait_for(what: str, proc: srv.Server, check: Callable[[], bool], timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert proc.proc is not None
        if proc.proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.proc.returncode}: {proc.logfile.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} not ready after {timeout} s: {proc.logfile.read_text()[-3000:]}")
        time.sleep(0.2)  # poll interval while it starts


def post(url: str, token: str | None, ca: Path | None, texts: list[str]) -> tuple[int, Any]:
    """One inference request: (status, JSON answer or error text)."""
    body = json.dumps({"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]})
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    req = urllib.request.Request(url, body.encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=30, context=ctx) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")[:200]


def answers(url: str, ca: Path | None) -> bool:
    """True once anything answers HTTP there (a 401 or 403 from a proxy counts: it is up)."""
    ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
    try:
        with urllib.request.urlopen(url, timeout=2, context=ctx):
            return True
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False


def ready(url: str, ca: Path | None) -> Callable[[], bool]:
    def check() -> bool:
        ctx = ssl.create_default_context(cafile=str(ca)) if ca else None
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as r:
                return r.status == 200
        except OSError:
            return False

    return check


def kiln(
    stack: contextlib.ExitStack,
    work: Path,
    uri: str,
    args: argparse.Namespace,
    name: str,
    extra: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    ca: Path | None = None,
    profile: Path | None = None,
) -> srv.Server:
    """bench/server.py's Kiln server (its command and layout), with `extra` flags; ready over HTTPS with `ca`; under
    cProfile (its main thread: the event loop, where the checks run) with `profile`, written there when it exits."""
    server = srv.kiln_server(work, uri, args, name, extra)
    server.env.update(env or {})
    if profile is not None:
        assert server.cmd[1:3] == ["-m", "kiln_server"], server.cmd
        server.cmd = [server.cmd[0], "-m", "cProfile", "-o", str(profile), *server.cmd[1:]]
    if ca is not None:
        # The inference port speaks TLS only: the process is watched on its (plain) metrics port first, then the
        # readiness asked over HTTPS.
        server.ready_url = f"http://127.0.0.1:{server.metrics_port}/metrics"
    t0 = time.monotonic()
    stack.enter_context(server)
    if ca is not None:
        wait_for(name, server, ready(f"https://127.0.0.1:{server.port}/v2/health/ready", ca))
    log(f"{name}: ready in {time.monotonic() - t0:.1f} s (port {server.port}, gRPC {server.grpc_port})")
    return server


def kube_rbac_proxy(
    stack: contextlib.ExitStack,
    work: Path,
    name: str,
    upstream: srv.Server,
    ids: Identities,
    tls: tuple[Path, Path, Path] | None,
) -> srv.Server:
    """kube-rbac-proxy in front of `upstream`, authorising what the server's own checks authorise."""
    binary = bin_dir() / "kube-rbac-proxy"
    if not binary.exists():
        raise SystemExit(f"{binary} is missing: run hack/build-kube-rbac-proxy.sh first")
    config = work / f"{name}.yaml"
    config.write_text(yaml.safe_dump({"authorization": {"resourceAttributes": {
        "namespace": ids.namespace, "apiGroup": "kiln.dev", "resource": "modeldeployments",
        "subresource": "predict", "name": DEPLOYMENT,
    }}}))  # fmt: skip
    port = net.free_port()
    cmd = [str(binary), f"--upstream=http://127.0.0.1:{upstream.port}/", f"--config-file={config}",
           f"--kubeconfig={ids.proxy_kubeconfig}"]  # fmt: skip
    if tls is None:
        cmd.append(f"--insecure-listen-address=127.0.0.1:{port}")
    else:
        cmd += [f"--secure-listen-address=127.0.0.1:{port}", f"--tls-cert-file={tls[1]}",
                f"--tls-private-key-file={tls[2]}"]  # fmt: skip
    # Started as bench/server.py starts a server (its own session, its log, killed as a group); "ready" there is
    # the upstream's, then the proxy's own port is waited for.
    proxy = srv.Server(name, cmd, port, upstream.path, upstream.ready_url, dict(os.environ), work)
    t0 = time.monotonic()
    stack.enter_context(proxy)
    ca = tls[0] if tls else None
    wait_for(name, proxy, lambda: answers(f"{'https' if tls else 'http'}://127.0.0.1:{port}/v2/health/ready", ca))
    log(f"{name}: ready in {time.monotonic() - t0:.1f} s (port {port} -> {upstream.port})")
    return proxy


def closed_upstream_connections(port: int) -> int:
    """Connections to 127.0.0.1:`port` in TIME_WAIT: closed by their client (the proxy) in the last minute."""
    n = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        cols = line.split()
        if cols[3] == "06" and int(cols[2].split(":")[1], 16) == port:
            n += 1
    return n


# -------------------------------------------------------------------------------------------------------- runs
def cpu(target: Target) -> list[float]:
    """CPU seconds so far of each of the target's processes (the server's, then the proxy's)."""
    return [srv.cpu_seconds(p) for p in target.processes]


def turn(work: Path, target: Target, clients: int, seconds: float, warmup: float) -> dict[str, Any]:
    """One closed-loop turn, with the CPU the target's processes spent (in all, and each), the requests its server
    answered, and for a proxy the connections it closed to the server meanwhile (TIME_WAIT on its side: a new one
    was opened for a later request)."""
    assert target.counted is not None
    cpu0, done0, closed0 = cpu(target), srv.answered(target.counted), closed_upstream_connections(target.counted.port)
    spec: dict[str, Any] = {"host": "127.0.0.1", "port": target.port, "path": target.path, "sentences": srv.SENTENCES,
                            "mode": "closed", "clients": clients, "warmup": warmup, "seconds": seconds,
                            "token": target.token, "ca": str(target.ca) if target.ca else None}  # fmt: skip
    if target.grpc:
        spec["grpc"] = srv.grpc_bodies("minilm")
    p = subprocess.run([PY, str(work / "loadgen_auth.py"), json.dumps(spec)], capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    if p.returncode != 0:
        raise RuntimeError(f"load generator failed ({target.name}): {p.stderr[-2000:]}")
    run = json.loads(p.stdout)
    each = [b - a for a, b in zip(cpu0, cpu(target), strict=True)]
    closed = closed_upstream_connections(target.counted.port) - closed0
    return {**run, "cpu": sum(each), "cpu_each": each, "answered": srv.answered(target.counted) - done0,
            "closed": closed}  # fmt: skip


def reviews(server: srv.Server) -> dict[str, float]:
    """The server's auth counters: reviews sent by kind, requests checked by result."""
    out = {}
    for key, value in srv.scrape(server).items():
        if key.startswith(("kiln_server_auth_reviews_total", "kiln_server_auth_requests_total")):
            out[key.removeprefix("kiln_server_auth_")] = value
    return out


def check(target: Target, expect_auth: bool, ids: Identities, reference: list[float]) -> tuple[str, list[float]]:
    """The configuration answers the client right (and refuses the others, with auth): a one-line report and the
    logits."""
    status, doc = post(target.url, ids.client if target.token else None, target.ca, [srv.SENTENCES[0]])
    if status != 200:
        raise RuntimeError(f"{target.name}: the client's request answered {status}: {doc}")
    logits = [round(float(x), 4) for x in doc["outputs"][0]["data"]]
    if reference and logits != reference:
        raise RuntimeError(f"{target.name}: logits {logits}, the plain server's {reference}")
    line = f"client 200 {logits}"
    if expect_auth:
        anonymous, _ = post(target.url, None, target.ca, [srv.SENTENCES[0]])
        stranger, _ = post(target.url, ids.stranger, target.ca, [srv.SENTENCES[0]])
        if (anonymous, stranger) != (401, 403):
            raise RuntimeError(
                f"{target.name}: no token answered {anonymous}, the stranger's {stranger}: want 401, 403"
            )
        line += f"; no token {anonymous}; stranger {stranger}"
    return line, logits


def run(args: argparse.Namespace, cluster: Cluster, work: Path, ids: Identities) -> int:
    started = time.monotonic()
    load_start = srv.loadavg()
    configs = [c for c in args.configs.split(",") if c]
    unknown = set(configs) - set(ALL_CONFIGS)
    if unknown or "plain" not in configs:
        raise SystemExit(f"--configs: from {', '.join(ALL_CONFIGS)}, with plain (got {args.configs})")
    grpc = args.grpc and "auth" in configs
    tls = make_tls(work) if any("tls" in c for c in configs) else None
    (work / "loadgen_auth.py").write_text(LOADGEN)

    log("building the MiniLM ONNX artifact (tests/support/server.py)")
    from tests.support.server import text_artifact

    uri, _ = text_artifact(str(work / "artifacts"))
    auth_flags = ("--auth", "kubernetes", "--namespace", ids.namespace, "--deployment", DEPLOYMENT)
    if args.auth_cache_ttl is not None:
        auth_flags += ("--auth-cache-ttl", str(args.auth_cache_ttl))
    auth_env = {"KILN_SERVER_KUBE_API": ids.api_url, "KILN_SERVER_KUBE_TOKEN_FILE": str(ids.server_token),
                "KILN_SERVER_KUBE_CA_FILE": str(ids.api_ca)}  # fmt: skip
    tls_flags = ("--tls-cert-file", str(tls[1]), "--tls-key-file", str(tls[2])) if tls else ()
    path = "/v2/models/minilm/infer"

    targets: dict[str, Target] = {}
    servers: dict[str, srv.Server] = {}
    with contextlib.ExitStack() as stack:
        servers["plain"] = kiln(stack, work, uri, args, "kiln-plain")
        targets["plain"] = Target("plain", servers["plain"].port, path, counted=servers["plain"],
                                  processes=[servers["plain"]])  # fmt: skip
        if "auth" in configs:
            s = servers["auth"] = kiln(stack, work, uri, args, "kiln-auth", auth_flags, auth_env, profile=args.profile)
            targets["auth"] = Target("auth", s.port, path, ids.client, counted=s, processes=[s])
        if "tls" in configs:
            s = servers["tls"] = kiln(stack, work, uri, args, "kiln-tls", tls_flags, ca=tls[0] if tls else None)
            targets["tls"] = Target("tls", s.port, path, None, tls[0] if tls else None, counted=s, processes=[s])
        if "auth-tls" in configs:
            s = servers["auth-tls"] = kiln(stack, work, uri, args, "kiln-auth-tls", auth_flags + tls_flags, auth_env,
                                           ca=tls[0] if tls else None)  # fmt: skip
            targets["auth-tls"] = Target("auth-tls", s.port, path, ids.client, tls[0] if tls else None, counted=s,
                                         processes=[s])  # fmt: skip
        for name, proxy_tls in (("proxy", None), ("proxy-tls", tls)):
            if name in configs:
                p = kube_rbac_proxy(stack, work, f"kube-rbac-{name}", servers["plain"], ids, proxy_tls)
                # The proxy's upstream is the plain server: a request costs both processes' CPU.
                targets[name] = Target(name, p.port, path, ids.client, proxy_tls[0] if proxy_tls else None,
                                       counted=servers["plain"], processes=[servers["plain"], p])  # fmt: skip
        targets = {name: targets[name] for name in ALL_CONFIGS if name in targets}  # the order of the table
        if grpc:
            for name, key, token in (("grpc-plain", "plain", None), ("grpc-auth", "auth", ids.client)):
                s = servers[key]
                assert s.grpc_port is not None
                targets[name] = Target(name, s.grpc_port, "", token, grpc=True, counted=s, processes=[s])

        reference: list[float] = []
        for name, target in targets.items():
            if target.grpc:
                continue
            line, logits = check(target, target.token is not None, ids, reference)
            reference = reference or logits
            log(f"check {name:9s}: {line}")
        reviews_before = {name: reviews(servers[name]) for name in ("auth", "auth-tls") if name in servers}

        levels = [(args.clients, args.seconds)]
        if args.latency_clients:
            levels.append((args.latency_clients, args.latency_seconds))
        names = list(targets)
        runs: dict[tuple[str, int], list[dict[str, Any]]] = {}
        log(f"{args.turns} rounds; per configuration {args.seconds:g} s at {args.clients} clients"
            + (f", {args.latency_seconds:g} s at {args.latency_clients}" if args.latency_clients else "")
            + f"; {', '.join(names)}; load average {srv.loadavg()}")  # fmt: skip
        for r in range(args.turns):
            # The order alternates from round to round, so that a machine that drifts weighs on all alike.
            order = names if r % 2 == 0 else names[::-1]
            for clients, seconds in levels:
                for name in order:
                    t = targets[name]
                    if t.grpc and clients != args.clients:
                        continue  # the gRPC pair at the throughput level only
                    res = turn(work, t, clients, seconds / args.turns, args.warmup)
                    runs.setdefault((name, clients), []).append(res)
                    cost = 1000 * res["cpu"] / max(res["answered"], 1)
                    log(f"round {r + 1}/{args.turns} {name:10s} clients {clients:3d}: {res['rps']:7.1f} req/s  "
                        f"p50 {res['p50']:6.1f} ms  CPU {cost:5.2f} ms/req  errors {res['errors']}  "
                        f"({srv.loadavg()})")  # fmt: skip
        reviews_after = {name: reviews(servers[name]) for name in reviews_before}
        cpu_split = {name: [(pid, c) for pid, _, c in s.processes()] for name, s in servers.items()}
        answered_by = {name: srv.answered(s) for name, s in servers.items()}

    # ------------------------------------------------------------------------------------------------ summary
    def cost(rs: list[dict[str, Any]]) -> float:
        return 1000 * sum(x["cpu"] for x in rs) / max(sum(x["answered"] for x in rs), 1)

    total = time.monotonic() - started
    if args.profile:
        print()
        print_profile(Path(args.profile), answered_by["auth"])
    print()
    print(f"## Authentication and TLS: in-server checks vs kube-rbac-proxy {kube_rbac_proxy_version()}, MiniLM, CPU")
    print(f"host: {os.cpu_count()} CPUs; load average at the start {load_start}, at the end {srv.loadavg()}; "
          f"total run {total:.0f} s")  # fmt: skip
    print(f"kiln: --instances {args.kiln_instances} --intra-op-threads {srv.kiln_threads(args)} --max-batch-size "
          f"{args.max_batch}; auth: --auth kubernetes, cache TTL "
          f"{'default' if args.auth_cache_ttl is None else args.auth_cache_ttl}; {args.turns} rounds of alternating "
          f"turns, {args.warmup:g} s warm-up each")  # fmt: skip
    print()
    print("| config | clients | req/s | p50 ms | p95 ms | p99 ms | vs plain | paired median | added p50 ms | "
          "CPU ms/req | plain/config CPU | errors |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    summary: dict[tuple[str, int], dict[str, float]] = {}
    for clients, _ in levels:
        for name in names:
            rs = runs.get((name, clients))
            if not rs:
                continue
            base_name = "grpc-plain" if targets[name].grpc else "plain"
            base_rs = runs[(base_name, clients)]
            m, base = srv.merge(rs), srv.merge(base_rs)
            paired = statistics.median(a["rps"] / b["rps"] for a, b in zip(rs, base_rs, strict=True))
            summary[(name, clients)] = {**m, "ratio": m["rps"] / base["rps"], "paired": paired,
                                        "cpu_ratio": cost(base_rs) / cost(rs)}  # fmt: skip
            cells = [name, clients, f"{m['rps']:.1f}", f"{m['p50']:.1f}", f"{m['p95']:.1f}", f"{m['p99']:.1f}",
                     f"{m['rps'] / base['rps']:.3f}", f"{paired:.3f}", f"{m['p50'] - base['p50']:+.2f}",
                     f"{cost(rs):.2f}", f"{cost(base_rs) / cost(rs):.3f}", int(m["errors"])]  # fmt: skip
            print("| " + " | ".join(str(x) for x in cells) + " |")
    print()
    print("(vs plain, added p50: against plain at the same clients; gRPC rows against grpc-plain. CPU ms/req: the "
          "server processes', with the proxy's for proxy rows, per request answered)")  # fmt: skip
    for name in reviews_before:
        delta = {k: reviews_after[name].get(k, 0) - reviews_before[name].get(k, 0) for k in reviews_after[name]}
        shown = ", ".join(f"{k} {v:.0f}" for k, v in sorted(delta.items()) if v)
        print(f"kiln_server_auth_* of {name} during the measured turns: {shown}")
    for name in ("proxy", "proxy-tls"):
        rs = runs.get((name, args.clients))
        if rs:
            answered = sum(x["answered"] for x in rs)
            own = 1000 * sum(x["cpu_each"][1] for x in rs) / max(answered, 1)
            upstream = 1000 * sum(x["cpu_each"][0] for x in rs) / max(answered, 1)
            closed = sum(x["closed"] for x in rs)
            share = 100 * closed / max(answered, 1)
            print(f"{name} at {args.clients} clients: kube-rbac-proxy's own CPU {own:.2f} ms/request, the "
                  f"server's {upstream:.2f}; it closed {closed} connections to the server for {answered:.0f} "
                  f"requests ({share:.0f} %; Go's default transport keeps 2 idle per host)")  # fmt: skip
    for name, procs in cpu_split.items():
        print(f"CPU seconds, {name}: " + ", ".join(f"pid {pid} {c:.0f}" for pid, c in procs))
    print()
    for name in ("auth", "proxy", "tls", "auth-tls", "proxy-tls", "grpc-auth"):
        s = summary.get((name, args.clients))
        if s is None:
            continue
        target = " (target >= 0.95)" if name in ("auth", "proxy", "grpc-auth") else ""
        print(f"{name} at {args.clients} clients: {s['ratio']:.3f} of plain as measured, {s['paired']:.3f} paired "
              f"median, {s['cpu_ratio']:.3f} from CPU per request{target}")  # fmt: skip
    return 0


def print_profile(path: Path, requests: float) -> None:
    """Where the auth server's event loop spent its time: the checks (what ``--auth kubernetes`` adds to a request)
    against everything else on that thread; the inference itself runs in executor threads, outside the profile."""
    import pstats

    stats = pstats.Stats(str(path))
    rows = stats.stats  # type: ignore[attr-defined]  # (file, line, function) -> (cc, nc, tottime, cumtime, callers)
    total = sum(tt for _, _, tt, _, _ in rows.values())
    checks = {}
    for (file, _, func), (_, calls, tt, cum, _) in rows.items():
        if file.endswith("kiln_server/auth.py") and func in ("cached", "authorize"):
            checks[func] = (calls, cum)  # the whole check, hash and counter included
        elif file.endswith("kiln_server/app.py") and func == "_authorize":
            checks["_authorize (own)"] = (calls, tt)  # the middleware's own lines, not the handler it calls
    spent = sum(t for _, t in checks.values())
    print(f"## cProfile of the auth server's event loop ({path}; its figures above are slowed by the profiler)")
    print(f"event-loop thread: {total:.2f} s in all, {1e6 * total / max(requests, 1):.0f} us per request answered "
          f"({requests:.0f}, warm-ups included)")  # fmt: skip
    print(f"the checks: {spent:.3f} s = {100 * spent / total:.2f} % of it, {1e6 * spent / max(requests, 1):.1f} us "
          "per request: " + ", ".join(f"{k} {n} calls {t:.3f} s" for k, (n, t) in checks.items()))  # fmt: skip
    print("top of the event loop by own time:")
    top = sorted(rows.items(), key=lambda kv: kv[1][2], reverse=True)[:12]
    for (file, line, func), (_, calls, tt, cum, _) in top:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        print(f"  {tt:7.3f} s own {cum:7.3f} s cum {calls:8d} calls  {func} ({where})")


def kube_rbac_proxy_version() -> str:
    binary = bin_dir() / "kube-rbac-proxy"
    if not binary.exists():
        return "(not built)"
    out = subprocess.run([str(binary), "--version"], capture_output=True, text=True, check=False)
    return (out.stdout or out.stderr).strip().removeprefix("kube-rbac-proxy ")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--configs", default=",".join(ALL_CONFIGS), help="comma list; plain is always needed")
    p.add_argument("--grpc", action=argparse.BooleanOptionalAction, default=True,
                   help="also the gRPC pair: plain and auth servers' gRPC ports (needs auth in --configs)")  # fmt: skip
    p.add_argument("--clients", type=int, default=32, help="closed-loop clients of the throughput level")
    p.add_argument("--seconds", type=float, default=20.0, help="measured seconds per configuration at --clients")
    p.add_argument("--latency-clients", type=int, default=1, help="a second, latency level (0: none)")
    p.add_argument("--latency-seconds", type=float, default=5.0, help="measured seconds per configuration there")
    p.add_argument("--turns", type=int, default=5, help="rounds the measured seconds are split into (alternating)")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of load before each turn is measured")
    p.add_argument("--auth-cache-ttl", type=float, default=None, help="the server's --auth-cache-ttl (its default)")
    p.add_argument("--threads", type=int, default=2, help="ONNX Runtime threads in all (bench/server.py's)")
    p.add_argument("--kiln-instances", type=int, default=2)
    p.add_argument("--max-batch", type=int, default=32)
    p.add_argument("--max-delay-ms", type=float, default=0.0)
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument(
        "--profile",
        default=None,
        help="run the auth server under cProfile, write its profile here and print where its event loop spent its "
        "time (a diagnosis run: the profiler slows that server, so its row is not comparable)",
    )
    args = p.parse_args()

    kubeconfig = kubeconfig_path()
    cluster = Cluster(kubeconfig, bin_dir())
    if cluster.kubectl("get", "--raw", "/readyz", check=False).returncode != 0:
        raise SystemExit(f"no cluster answers at {kubeconfig} (start one with hack/cluster.sh up; this never does)")
    work = Path(args.work or tempfile.mkdtemp(prefix="kiln-bench-auth-"))
    work.mkdir(parents=True, exist_ok=True)
    log(f"work folder {work}; kubeconfig {kubeconfig}; load average {srv.loadavg()}; {os.cpu_count()} CPUs")

    # SIGTERM as an exception, so that the servers are stopped and the cluster objects deleted on the way out.
    def stop(signum: int, _frame: object) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    with identities(cluster, work, secrets.token_hex(3)) as ids:
        return run(args, cluster, work, ids)


if __name__ == "__main__":
    sys.exit(main())
