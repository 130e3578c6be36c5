"""The local control plane and the operator under test: the cluster handle (kubectl, namespaces, service-account
kubeconfigs) and the operator runner, for the integration tests and the benchmarks."""

import contextlib
import json
import os
import re
import subprocess
import tempfile
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from kopf.testing import KopfRunner

from .net import free_port

REPO = Path(__file__).resolve().parents[2]

# The operator never runs as cluster admin in tests: run_operator logs it in from this kubeconfig, which the
# integration fixtures write for the kiln-operator ServiceAccount bound to the RBAC of manifests/.
OPERATOR_KUBECONFIG_ENV = "KILN_OPERATOR_KUBECONFIG"
OPERATOR_NAMESPACE = "kiln-system"
OPERATOR_ACCOUNT = "kiln-operator"
# kopf retries and then often only logs what the API server refused (e.g. "Not enough permissions to list
# namespaces", a Forbidden on posting an event), so the operator's output is searched for it too.
PERMISSION_ERROR = re.compile(
    # RBAC's wording ("... is forbidden: User ... cannot create resource ..."), kopf's, and auth failures; not a bare
    # "403 Forbidden", which is also what creating in a namespace being deleted gets.
    r"is forbidden|cannot \w+ resource|unauthorized|not enough permissions|\b(?:status|code)[=:] ?401\b",
    re.IGNORECASE,
)


# The kwok CPU node carries this taint while a real node runs beside it (hack/cluster.sh), so ordinary pods run for
# real. A namespace with these annotations keeps every pod on the simulated nodes, where kwok plays the kubelet and
# its failure hooks (kwok.kiln.dev/*) work: the API server's PodNodeSelector and PodTolerationRestriction admission
# plugins add the node selector and the toleration to each pod.
SIMULATED_TAINT = "kwok.x-k8s.io/node"
SIMULATED_NAMESPACE_ANNOTATIONS = {
    "scheduler.alpha.kubernetes.io/node-selector": "type=kwok",
    "scheduler.alpha.kubernetes.io/defaultTolerations": json.dumps(
        [{"key": SIMULATED_TAINT, "operator": "Exists", "effect": "NoSchedule"}]
    ),
}


# The real node (hack/real-node.sh) and the images built here (hack/images.sh) that it runs.
REAL_NODE = "kiln-real-0"
IMAGES = {name: f"kiln/{name}:0.1.0" for name in ("operator", "trainer", "compressor", "server")}
RESTRICTED = {
    "pod-security.kubernetes.io/enforce": "restricted",
    "pod-security.kubernetes.io/enforce-version": "latest",
}


@dataclass
class Cluster:
    kubeconfig: str
    bin_dir: Path

    def kubectl(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            [str(self.bin_dir / "kubectl"), "--kubeconfig", self.kubeconfig, *args],
            input=stdin,
            capture_output=True,
            text=True,
            check=check,
        )

    def get(self, *args: str) -> dict[str, Any]:
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    def create_namespace(self, name: str, *, simulated: bool = True, labels: dict[str, str] | None = None) -> None:
        """A namespace whose pods run on the simulated nodes (`simulated`), or wherever the scheduler puts them."""
        meta: dict[str, Any] = {"name": name, "labels": labels or {}}
        if simulated:
            meta["annotations"] = SIMULATED_NAMESPACE_ANNOTATIONS
        self.kubectl("create", "-f", "-", stdin=json.dumps({"apiVersion": "v1", "kind": "Namespace", "metadata": meta}))

    def real_node(self) -> dict[str, Any]:
        """The real node; the test skips without one (KILN_REAL_NODE=0), except under CI, where it fails."""
        found = self.kubectl("get", "node", REAL_NODE, "-o", "json", check=False)
        if found.returncode:
            if os.environ.get("CI"):
                pytest.fail(f"no real node {REAL_NODE} in the test cluster (hack/real-node.sh): {found.stderr.strip()}")
            pytest.skip(f"no real node {REAL_NODE} (KILN_REAL_NODE=0, or hack/real-node.sh could not start one)")
        return json.loads(found.stdout)

    def env(self) -> dict[str, str]:
        """The environment hack/ scripts need to act on this cluster (a kwokctl cluster's work directory layout)."""
        d = Path(self.kubeconfig).parent
        return {**os.environ, "KWOK_WORKDIR": str(d.parent.parent), "KILN_CLUSTER_NAME": d.name}


def service_account_kubeconfig(
    cluster: Cluster, path: Path, *, name: str = OPERATOR_ACCOUNT, namespace: str = OPERATOR_NAMESPACE
) -> Path:
    """Write a kubeconfig that logs in as ServiceAccount namespace/name: the admin kubeconfig's server and CA
    (embedded), and a token from the TokenRequest API (`kubectl create token`)."""
    admin = json.loads(cluster.kubectl("config", "view", "--raw", "--minify", "--flatten", "-o", "json").stdout)
    token = cluster.kubectl("create", "token", name, "-n", namespace, "--duration=12h").stdout.strip()
    user = f"system:serviceaccount:{namespace}:{name}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "kiln", "cluster": admin["clusters"][0]["cluster"]}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": user, "context": {"cluster": "kiln", "user": user}}],
        "current-context": user,
    }
    path.write_text(yaml.safe_dump(config))
    path.chmod(0o600)
    return path


def bin_dir() -> Path:
    cache = Path(os.environ.get("KILN_CACHE", Path.home() / ".cache/kiln"))
    return Path(os.environ.get("KILN_BIN_DIR", cache / "bin"))


@dataclass
class Operator:
    runner: KopfRunner
    liveness_url: str
    metrics_url: str

    def metrics(self) -> str:
        return urllib.request.urlopen(self.metrics_url, timeout=5).read().decode()

    def liveness(self) -> dict[str, Any]:
        return json.loads(urllib.request.urlopen(self.liveness_url, timeout=5).read())


@contextlib.contextmanager
def _environ(**values: str) -> Iterator[None]:
    """Set environment variables for the duration (they are process-wide), then restore what was there."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def run_operator(*scope: str) -> Iterator[Operator]:
    """The operator in this process under KopfRunner, logged in as its ServiceAccount (not as admin); on exit its
    exit code and exceptions are asserted, and its output must show no permission error."""
    kubeconfig = os.environ.get(OPERATOR_KUBECONFIG_ENV)
    if not kubeconfig:
        raise RuntimeError(f"{OPERATOR_KUBECONFIG_ENV} is not set: the operator would run with the admin kubeconfig")
    liveness = f"http://127.0.0.1:{free_port()}/healthz"
    metrics_port = free_port()
    args = ["run", "--standalone", "-m", "kiln_operator.startup", f"--liveness={liveness}", "--verbose", *scope]
    # kopf's login handler (startup.login) reads KUBECONFIG when the operator starts and when it re-authenticates.
    with (
        _environ(KUBECONFIG=kubeconfig, KILN_METRICS_ADDRESS=f"127.0.0.1:{metrics_port}"),
        KopfRunner(args, timeout=60) as runner,
    ):
        yield Operator(runner, liveness, f"http://127.0.0.1:{metrics_port}/metrics")
    assert runner.exception is None, runner.output
    assert runner.exit_code == 0, runner.output
    # kr8s logs every 403 as "Unauthorized 403 error, reauthenticating"; a real denial also logs the API's message.
    lines = [line for line in runner.output.splitlines() if "reauthenticating" not in line]
    denied = [line for line in lines if PERMISSION_ERROR.search(line)]
    assert not denied, "the operator was refused by the API server:\n" + "\n".join(denied[:20])


@contextlib.contextmanager
def bench_cluster(name: str) -> Iterator[tuple[Cluster, Path, Path]]:
    """A control plane for a benchmark: KILN_TEST_KUBECONFIG's, or one started here (hack/cluster.sh) and deleted
    afterwards; with Kiln's CRDs and the operator's RBAC installed. Yields the cluster, a kubeconfig of the
    operator's ServiceAccount and a work folder. KUBECONFIG is set to the admin's for the benchmark itself."""
    given = os.environ.get("KILN_TEST_KUBECONFIG")
    workdir = Path(tempfile.mkdtemp(prefix=f"{name}-"))
    # Benchmarks measure the control plane and the operator with simulated pods only: no real node.
    env = {**os.environ, "KWOK_WORKDIR": str(workdir), "KILN_CLUSTER_NAME": name, "KILN_REAL_NODE": "0"}
    if given:
        kubeconfig = given
    else:
        print(f"[{name}] starting the local control plane (hack/cluster.sh up)", flush=True)
        up = subprocess.run(
            [str(REPO / "hack/cluster.sh"), "up"], env=env, stdout=subprocess.PIPE, text=True, check=True
        )
        kubeconfig = up.stdout.strip().splitlines()[-1]
    try:
        os.environ["KUBECONFIG"] = kubeconfig
        cluster = Cluster(kubeconfig, bin_dir())
        cluster.kubectl("apply", "-f", str(REPO / "crds"))
        cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"))
        rendered = yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / "manifests")).stdout)
        kinds = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding"}
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all([d for d in rendered if d and d["kind"] in kinds]))
        yield cluster, service_account_kubeconfig(cluster, workdir / "operator-kubeconfig.yaml"), workdir
    finally:
        if not given:
            subprocess.run([str(REPO / "hack/cluster.sh"), "down"], env=env, check=False)
