"""Integration fixtures: one real local control plane per session (kube-apiserver, etcd, kube-controller-manager,
kube-scheduler, kwok), a namespace per test, and the operator under kopf's KopfRunner.

Set KILN_TEST_KUBECONFIG to reuse a running cluster (it is then left alone); otherwise hack/cluster.sh starts
one in KILN_TEST_WORKDIR (or a temporary directory) and always deletes it, also on failure or interruption."""

import os
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import kr8s
import pytest
import yaml
from support.cluster import (
    OPERATOR_KUBECONFIG_ENV,
    REPO,
    Cluster,
    Operator,
    bin_dir,
    run_operator,
    service_account_kubeconfig,
)
from support.waiting import wait_for

CLUSTER_NAME = "kiln-test"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.integration)


def pytest_configure(config: pytest.Config) -> None:
    # Turn SIGTERM (CI timeouts, `kill`) into KeyboardInterrupt so session teardown deletes the cluster.
    def interrupt(*_: Any) -> None:
        raise KeyboardInterrupt("SIGTERM")

    signal.signal(signal.SIGTERM, interrupt)


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    given = os.environ.get("KILN_TEST_KUBECONFIG")
    if given:
        os.environ["KUBECONFIG"] = given
        yield Cluster(given, bin_dir())
        return
    workdir = os.environ.get("KILN_TEST_WORKDIR") or str(tmp_path_factory.mktemp("kwok"))
    env = {**os.environ, "KWOK_WORKDIR": workdir, "KILN_CLUSTER_NAME": CLUSTER_NAME}
    script = str(REPO / "hack/cluster.sh")
    try:
        up = subprocess.run([script, "up"], env=env, stdout=subprocess.PIPE, text=True, check=True)
        kubeconfig = up.stdout.strip().splitlines()[-1]
        os.environ["KUBECONFIG"] = kubeconfig  # kopf and kr8s log in from it
        yield Cluster(kubeconfig, bin_dir())
    finally:
        subprocess.run([script, "down"], env=env, check=False)


@pytest.fixture(scope="session")
def api(cluster: Cluster) -> kr8s.Api:
    return kr8s.api(kubeconfig=cluster.kubeconfig)


@pytest.fixture(scope="session")
def crds(cluster: Cluster) -> None:
    """The CRDs, applied the way users do: kubectl apply -f crds/."""
    cluster.kubectl("apply", "-f", str(REPO / "crds"))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", str(REPO / "crds"))
    # Refresh kubectl's discovery cache (filled before the CRDs existed): categories like `kiln` are looked up
    # in the cache only, so a stale cache makes `kubectl get kiln` fail.
    wait_for(
        lambda: len(cluster.kubectl("api-resources", "--api-group=kiln.dev", "-o", "name").stdout.split()) == 3,
        what="kiln.dev resources in discovery",
    )


# What the in-process operator needs from manifests/: its identity and permissions, not the Deployment (on a real
# cluster that would start a second operator competing with the one under test).
RBAC_KINDS = {"Namespace", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}


@pytest.fixture(scope="session", autouse=True)
def operator_account(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The operator's ServiceAccount and RBAC, applied from manifests/ as users install them, and a kubeconfig
    that logs in as it: run_operator uses it, so a permission missing from manifests/ fails the tests."""
    rendered = yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / "manifests")).stdout)
    rbac = [doc for doc in rendered if doc and doc["kind"] in RBAC_KINDS]
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    path = service_account_kubeconfig(cluster, tmp_path_factory.mktemp("operator") / "kubeconfig.yaml")
    os.environ[OPERATOR_KUBECONFIG_ENV] = str(path)
    yield path
    os.environ.pop(OPERATOR_KUBECONFIG_ENV, None)


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    # Deterministic prefix plus a random suffix: tests in one session never share a namespace.
    name = f"t-{request.node.name[:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


@pytest.fixture
def operator(crds: None, namespace: str) -> Iterator[Operator]:
    with run_operator(f"--namespace={namespace}") as op:
        yield op
