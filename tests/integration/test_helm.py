"""The Helm chart charts/kiln against the real API server: `helm install` into a fresh namespace (the operator's
Deployment Available and, on the real node, its pod reconciling a TrainingJob), `helm upgrade` with a changed value,
and `helm uninstall` removing everything the chart made but the CRDs.

The release watches only its own namespace (scope namespace) and prefixes its names with it, so that its
cluster-scoped ClusterRole and ClusterRoleBinding never collide with the kustomize install the other tests make, and
its operator never competes with theirs; the servers' ClusterRoles are the cluster's one shared pair
(serverRoles.create false), as in overlays/namespaced."""

import os
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cluster import IMAGES, PERMISSION_ERROR, REAL_NODE, REPO, RESTRICTED, Cluster, bin_dir
from support.waiting import wait_for

CHART = REPO / "charts/kiln"
CRDS = sorted(yaml.safe_load(p.read_text())["metadata"]["name"] for p in (REPO / "crds").glob("*.yaml"))
SELECTOR = "app.kubernetes.io/name=kiln-operator"


@dataclass
class Release:
    cluster: Cluster
    name: str
    namespace: str
    home: Path
    real: bool  # the operator's pod runs on the real node (else kwok plays its kubelet)
    set_values: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        return f"{self.namespace}-"

    @property
    def operator(self) -> str:
        return f"{self.prefix}kiln-operator"

    def helm(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        helm = bin_dir() / "helm"
        # Helm's config, cache and data in the test's folder, never the user's.
        env = {
            **os.environ,
            "KUBECONFIG": self.cluster.kubeconfig,
            **{f"HELM_{k}_HOME": str(self.home / k.lower()) for k in ("CONFIG", "CACHE", "DATA")},
        }
        out = subprocess.run(
            [str(helm), *args, "--namespace", self.namespace], capture_output=True, text=True, env=env, check=False
        )
        if check:
            assert out.returncode == 0, f"helm {' '.join(args)}: {out.stdout}{out.stderr}"
        return out

    def manifest(self) -> list[dict[str, Any]]:
        """The objects of the release's current revision, as Helm recorded them."""
        return [d for d in yaml.safe_load_all(self.helm("get", "manifest", self.name).stdout) if d]


@pytest.fixture
def release(cluster: Cluster, crds: None, tmp_path: Path) -> Iterator[Release]:
    if not (bin_dir() / "helm").exists():
        if os.environ.get("CI"):
            pytest.fail(f"{bin_dir() / 'helm'} is not built (hack/build-helm.sh)")
        pytest.skip(f"{bin_dir() / 'helm'} is not built (hack/build-helm.sh)")
    real = cluster.kubectl("get", "node", REAL_NODE, check=False).returncode == 0
    if not real and os.environ.get("CI"):
        cluster.real_node()  # fails under CI: the operator must run for real there
    name = f"h-{uuid.uuid4().hex[:8]}"
    # Restricted Pod Security, enforced, as manifests/base labels kiln-system (docs/operations.md, Install with Helm).
    cluster.create_namespace(name, simulated=not real, labels=RESTRICTED)
    rel = Release(cluster, "kiln", name, tmp_path / "helm", real)
    try:
        yield rel
    finally:
        rel.helm("uninstall", rel.name, "--ignore-not-found", "--wait", "--timeout=120s", check=False)
        # Only what this test's release made: its prefixed cluster-scoped names.
        for kind in ("clusterrolebinding", "clusterrole"):
            cluster.kubectl("delete", kind, rel.operator, "--ignore-not-found", check=False)
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def available(cluster: Cluster, ns: str, name: str) -> dict[str, Any] | None:
    """The Deployment once its current generation is rolled out and Available, else None."""
    d = cluster.get("deployment", name, "-n", ns)
    status = d.get("status", {})
    conditions = {c["type"]: c["status"] for c in status.get("conditions", [])}
    done = (
        status.get("observedGeneration") == d["metadata"]["generation"]
        and status.get("updatedReplicas") == status.get("availableReplicas") == 1
        and not status.get("unavailableReplicas")
        and conditions.get("Available") == "True"
    )
    return d if done else None


def replica_set_trouble(cluster: Cluster, ns: str) -> str:
    events = cluster.get("events", "-n", ns, "--field-selector=involvedObject.kind=ReplicaSet")["items"]
    return "; ".join(f"{e['reason']}: {e['message']}" for e in events if e["reason"] != "SuccessfulCreate")


def wait_available(rel: Release) -> dict[str, Any]:
    try:
        return wait_for(
            lambda: available(rel.cluster, rel.namespace, rel.operator),
            what="the operator Deployment Available",
            timeout=180,
        )
    except AssertionError as e:
        raise AssertionError(f"{e}; ReplicaSet: {replica_set_trouble(rel.cluster, rel.namespace)}") from None


def operator_pod(rel: Release) -> dict[str, Any]:
    pods = rel.cluster.get("pods", "-n", rel.namespace, "-l", SELECTOR)["items"]
    running = [p for p in pods if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")]
    assert len(running) == 1, [p["metadata"]["name"] for p in pods]
    return running[0]


def crd_uids(cluster: Cluster) -> dict[str, str]:
    return {name: cluster.get("crd", name)["metadata"]["uid"] for name in CRDS}


def exists(cluster: Cluster, doc: dict[str, Any]) -> bool:
    where = ["-n", doc["metadata"]["namespace"]] if doc["metadata"].get("namespace") else []
    kind = f"{doc['kind'].lower()}.{doc['apiVersion'].rsplit('/', 1)[0]}" if "/" in doc["apiVersion"] else doc["kind"]
    out = cluster.kubectl("get", kind, doc["metadata"]["name"], *where, "-o", "name", check=False)
    assert out.returncode == 0 or "NotFound" in out.stderr, out.stderr
    return out.returncode == 0


def test_install_upgrade_uninstall(release: Release):
    rel, cluster = release, release.cluster
    crds_before = crd_uids(cluster)
    values = ["--set", "scope=namespace", "--set", f"namePrefix={rel.prefix}", "--set", "serverRoles.create=false"]
    rel.helm("install", rel.name, str(CHART), *values)

    # --- install: the Deployment Available, the operator's pod admitted under restricted Pod Security.
    deployment = wait_available(rel)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGES["operator"]
    assert container["args"][0] == "--namespace=$(POD_NAMESPACE)"
    pod = operator_pod(rel)
    assert pod["spec"]["serviceAccountName"] == rel.operator
    assert not replica_set_trouble(cluster, rel.namespace)
    installed = rel.manifest()
    assert {(d["kind"], d["metadata"]["name"]) for d in installed} == {
        (kind, rel.operator) for kind in ("ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding")
    } | {
        ("Deployment", rel.operator),
        ("NetworkPolicy", rel.operator),
        ("Service", f"{rel.prefix}kiln-operator-metrics"),
    }
    assert all(exists(cluster, d) for d in installed)
    binding = cluster.get("clusterrolebinding", rel.operator)
    assert binding["roleRef"]["name"] == rel.operator
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": rel.operator, "namespace": rel.namespace}]

    if rel.real:
        # The operator really runs from the chart: it logs in with the ServiceAccount the chart made and reconciles
        # in its namespace with the chart's Role (a suspended TrainingJob: a child Job, no trainer pod).
        assert pod["spec"]["nodeName"] == REAL_NODE
        body = {
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "held"},
            "spec": {"image": IMAGES["trainer"], "dataset": {"uri": "pvc://data/digits"}, "suspend": True},
        }
        cluster.kubectl("apply", "-n", rel.namespace, "-f", "-", stdin=yaml.safe_dump(body))
        status = wait_for(
            lambda: (
                (s := cluster.get("tj/held", "-n", rel.namespace).get("status") or {}).get("observedGeneration") == 1
                and s
            ),
            what="the TrainingJob reconciled by the chart's operator",
            timeout=120,
        )
        assert status["phase"] == "Suspended", status
        logs = cluster.kubectl("logs", "-n", rel.namespace, pod["metadata"]["name"]).stdout
        assert not PERMISSION_ERROR.search(logs), logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]

    # --- upgrade with a changed value: the Deployment's env changes, a new pod rolls out, the CRDs stay as they were.
    generation = deployment["metadata"]["generation"]
    rel.helm("upgrade", rel.name, str(CHART), "--reuse-values", "--set", "config.workers=4")
    deployment = wait_available(rel)
    assert deployment["metadata"]["generation"] > generation
    env = {e["name"]: e.get("value") for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KILN_WORKERS"] == "4"
    new_pod = operator_pod(rel)
    assert new_pod["metadata"]["name"] != pod["metadata"]["name"]
    assert {e["name"]: e.get("value") for e in new_pod["spec"]["containers"][0]["env"]}["KILN_WORKERS"] == "4"
    history = yaml.safe_load(rel.helm("history", rel.name, "-o", "yaml").stdout)
    assert [(h["revision"], h["status"]) for h in history] == [(1, "superseded"), (2, "deployed")]
    assert crd_uids(cluster) == crds_before  # Helm never upgrades (nor replaces) a chart's CRDs

    # --- uninstall: every object of the release is gone, cluster-scoped ones included; the CRDs stay.
    upgraded = rel.manifest()
    rel.helm("uninstall", rel.name, "--wait", "--timeout=120s")
    wait_for(
        lambda: not [d for d in upgraded if exists(cluster, d)],
        what="every object of the release deleted",
        timeout=120,
    )
    wait_for(
        lambda: not cluster.get("pods", "-n", rel.namespace, "-l", SELECTOR)["items"],
        what="the operator's pod gone",
        timeout=90,
    )
    assert crd_uids(cluster) == crds_before  # Helm never deletes a chart's CRDs
    assert rel.helm("status", rel.name, check=False).returncode != 0


def test_every_rendering_is_accepted_by_the_api_server(release: Release):
    """What the chart renders for each way of installing it is valid for this API server (server-side dry run:
    schemas, names, references), not only well-formed YAML."""
    rel, cluster = release, release.cluster
    monitoring = cluster.kubectl("get", "crd", "prometheusrules.monitoring.coreos.com", check=False).returncode == 0
    cases: dict[str, list[str]] = {
        "default": [],
        "namespaced": ["--set", "scope=namespace", "--set", f"namePrefix={rel.prefix}"],
        "store": ["--set", "store.enabled=true", "--set", "config.progressPollSeconds=5"],
    }
    if monitoring:  # the Prometheus Operator's CRDs, where this cluster has them
        cases["monitoring"] = [
            "--set", "monitoring.serviceMonitor.enabled=true", "--set", "monitoring.alerts.enabled=true",
            "--set", "monitoring.dashboards.enabled=true",
        ]  # fmt: skip
    for case, values in cases.items():
        rendered = rel.helm("template", rel.name, str(CHART), *values).stdout
        out = cluster.kubectl("apply", "--dry-run=server", "-f", "-", stdin=rendered, check=False)
        assert out.returncode == 0, f"{case}: {out.stderr}"
        assert out.stdout.count("(server dry run)") == len([d for d in yaml.safe_load_all(rendered) if d]), case
