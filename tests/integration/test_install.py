"""The install surface against the real API server: `kubectl apply -k manifests/` (twice), RBAC as the server sees
it, the operator's pod admitted under the restricted Pod Security Standard, and the namespaced component's RBAC
being enough to run the operator in one namespace."""

import json
import os
from pathlib import Path

import pytest
import yaml
from support.cluster import OPERATOR_KUBECONFIG_ENV, REPO, Cluster, run_operator, service_account_kubeconfig
from support.waiting import wait_for

MANIFESTS = REPO / "manifests"
OPERATOR = "system:serviceaccount:kiln-system:kiln-operator"
SELECTOR = "app.kubernetes.io/name=kiln-operator"


def rendered(cluster: Cluster, path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(path)).stdout) if d]


def running_pods(cluster: Cluster, ns: str) -> list[str]:
    pods = cluster.get("pods", "-n", ns, "-l", SELECTOR)["items"]
    return [p["metadata"]["name"] for p in pods if p["status"].get("phase") == "Running"]


def replica_set_trouble(cluster: Cluster, ns: str) -> str:
    """Why a ReplicaSet could not create its pods (Pod Security admission says so here): for failure messages."""
    events = cluster.get("events", "-n", ns, "--field-selector=involvedObject.kind=ReplicaSet")["items"]
    return "; ".join(f"{e['reason']}: {e['message']}" for e in events if e["reason"] != "SuccessfulCreate")


def can_i(cluster: Cluster, *args: str, who: str = OPERATOR) -> bool:
    out = cluster.kubectl("auth", "can-i", *args, f"--as={who}", check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


def access_review(cluster: Cluster, verb: str, group: str, resource: str, namespace: str, who: str = OPERATOR) -> bool:
    """A SubjectAccessReview asked directly: `kubectl auth can-i` resolves the resource through discovery and asks
    about something else when that API is not served (Kueue's, before Kueue is installed)."""
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": who,
            "groups": ["system:serviceaccounts", f"system:serviceaccounts:{who.split(':')[2]}", "system:authenticated"],
            "resourceAttributes": {"verb": verb, "group": group, "resource": resource, "namespace": namespace},
        },
    }
    answer = cluster.kubectl("create", "-o", "json", "-f", "-", stdin=json.dumps(review))
    return json.loads(answer.stdout)["status"].get("allowed") is True


@pytest.mark.parametrize(
    ("verb", "allowed"), [("list", True), ("patch", True), ("get", False), ("update", False), ("delete", False)]
)
def test_service_account_may_read_and_deactivate_kueue_workloads_only(
    cluster: Cluster, crds: None, verb: str, allowed: bool
):
    """A queued TrainingJob's Kueue Workload: listed for its eviction counts, patched (spec.active) for spec.suspend;
    granted whether or not Kueue is installed."""
    assert access_review(cluster, verb, "kueue.x-k8s.io", "workloads", "default") is allowed


def test_apply_k_manifests_installs_and_is_idempotent(cluster: Cluster, crds: None):
    first = cluster.kubectl("apply", "-k", str(MANIFESTS))
    assert "deployment.apps/kiln-operator" in first.stdout
    again = cluster.kubectl("apply", "-k", str(MANIFESTS)).stdout.splitlines()
    assert again
    assert all(line.endswith(" unchanged") for line in again), again
    try:
        # The operator's pod is admitted in kiln-system (restricted) and runs (on the real node; without one, kwok
        # plays the kubelet).
        cluster.kubectl("rollout", "status", "-n", "kiln-system", "deployment/kiln-operator", "--timeout=180s")
        (name, *_) = wait_for(lambda: running_pods(cluster, "kiln-system"), what="the operator pod Running")
        # The hardening reaches the pod through admission unchanged.
        pod = cluster.get("pod", name, "-n", "kiln-system")["spec"]
        (container,) = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["serviceAccountName"] == "kiln-operator"
    finally:
        # An installed operator watches every namespace: it would compete with the operator each test runs.
        cluster.kubectl("delete", "-n", "kiln-system", "deployment/kiln-operator", "--wait=true", check=False)
        wait_for(
            lambda: not cluster.get("pods", "-n", "kiln-system", "-l", SELECTOR)["items"],
            what="the installed operator's pod gone",
            timeout=90,
        )


def test_cluster_role_on_the_server_has_no_wildcards_and_matches_the_manifests(cluster: Cluster):
    role = cluster.get("clusterrole", "kiln-operator")
    assert role["rules"]
    for rule in role["rules"]:
        assert "nonResourceURLs" not in rule, rule
        for field in ("apiGroups", "resources", "verbs", "resourceNames"):
            assert not any("*" in item for item in rule.get(field, [])), rule
        assert "secrets" not in rule.get("resources", []), rule
    (manifest,) = [
        d
        for d in rendered(cluster, MANIFESTS)
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "kiln-operator"
    ]
    assert role["rules"] == manifest["rules"]
    assert role.get("aggregationRule") is None
    binding = cluster.get("clusterrolebinding", "kiln-operator")
    assert binding["roleRef"]["name"] == "kiln-operator"
    assert [(s["kind"], s["namespace"], s["name"]) for s in binding["subjects"]] == [
        ("ServiceAccount", "kiln-system", "kiln-operator")
    ]


ALLOWED = [
    ("list", "trainingjobs.kiln.dev", "--all-namespaces"),
    ("watch", "modelcompressions.kiln.dev", "--all-namespaces"),
    ("patch", "modeldeployments.kiln.dev", "-n", "default"),
    ("patch", "trainingjobs.kiln.dev", "--subresource=status", "-n", "default"),
    ("patch", "modeldeployments.kiln.dev", "--subresource=status", "-n", "default"),
    ("list", "customresourcedefinitions.apiextensions.k8s.io"),
    ("watch", "customresourcedefinitions.apiextensions.k8s.io"),
    ("watch", "namespaces"),
    ("delete", "trainingjobs.kiln.dev", "-n", "default"),  # runPolicy.ttlSecondsAfterFinished
    ("create", "jobs.batch", "-n", "default"),
    ("delete", "jobs.batch", "-n", "default"),
    ("patch", "jobs.batch", "-n", "default"),
    ("create", "services", "-n", "default"),
    ("patch", "services", "-n", "default"),
    ("patch", "deployments.apps", "-n", "default"),
    ("watch", "deployments.apps", "--all-namespaces"),
    ("patch", "poddisruptionbudgets.policy", "-n", "default"),
    ("delete", "horizontalpodautoscalers.autoscaling", "-n", "default"),
    ("get", "pods", "--subresource=log", "-n", "default"),
    ("create", "events", "-n", "default"),
    # A NetworkPolicy per ModelDeployment; with auth, the servers' ServiceAccount and its two bindings.
    ("create", "networkpolicies.networking.k8s.io", "-n", "default"),
    ("create", "serviceaccounts", "-n", "default"),
    ("create", "rolebindings.rbac.authorization.k8s.io", "-n", "default"),
    ("bind", "clusterroles.rbac.authorization.k8s.io/kiln-server-access-review", "-n", "default"),
    ("create", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("list", "clusterrolebindings.rbac.authorization.k8s.io"),
    ("bind", "clusterroles.rbac.authorization.k8s.io/kiln-server-tokenreview"),
]
DENIED = [
    ("get", "secrets", "-n", "kiln-system"),
    ("list", "secrets", "--all-namespaces"),
    ("delete", "pods", "-n", "default"),
    ("create", "pods", "-n", "default"),
    ("update", "trainingjobs.kiln.dev", "-n", "default"),
    ("update", "jobs.batch", "-n", "default"),
    ("update", "deployments.apps", "-n", "default"),
    ("delete", "poddisruptionbudgets.policy", "-n", "default"),
    ("create", "pods", "--subresource=exec", "-n", "default"),
    ("create", "trainingjobs.kiln.dev", "-n", "default"),
    ("patch", "events", "-n", "default"),
    ("create", "customresourcedefinitions.apiextensions.k8s.io"),
    ("delete", "namespaces"),
    ("bind", "clusterroles.rbac.authorization.k8s.io/cluster-admin"),
    ("bind", "clusterroles.rbac.authorization.k8s.io/admin", "-n", "default"),
    ("escalate", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "clusterroles.rbac.authorization.k8s.io"),
    ("create", "roles.rbac.authorization.k8s.io", "-n", "default"),
    ("impersonate", "serviceaccounts", "-n", "kube-system"),
    ("*", "*", "--all-namespaces"),
]


def test_the_operator_can_bind_the_servers_roles_and_no_other(cluster: Cluster, crds: None, namespace: str):
    """RBAC's escalation check, as the API server applies it to the operator's own requests."""
    cluster.kubectl("apply", "-k", str(MANIFESTS / "server-roles"))
    who = f"--as={OPERATOR}"

    def binding(kind: str, role: str, *where: str) -> str:
        out = cluster.kubectl(
            "create", kind, f"t-{role}", f"--clusterrole={role}", f"--serviceaccount={namespace}:x", *where,
            "--dry-run=server", who, check=False,
        )  # fmt: skip
        return out.stdout + out.stderr

    assert "created (server dry run)" in binding("clusterrolebinding", "kiln-server-tokenreview")
    assert "created (server dry run)" in binding("rolebinding", "kiln-server-access-review", "-n", namespace)
    for kind, role, *where in [
        ("clusterrolebinding", "cluster-admin"),
        ("rolebinding", "admin", "-n", namespace),
    ]:
        said = binding(kind, role, *where)
        assert "forbidden" in said, (kind, role, said)
        assert "attempting to grant RBAC permissions not currently held" in said, (kind, role, said)


@pytest.mark.parametrize("check", ALLOWED, ids=" ".join)
def test_service_account_can_do_what_the_operator_does(cluster: Cluster, crds: None, check: tuple[str, ...]):
    assert can_i(cluster, *check)


@pytest.mark.parametrize("check", DENIED, ids=" ".join)
def test_service_account_can_do_nothing_else(cluster: Cluster, crds: None, check: tuple[str, ...]):
    assert not can_i(cluster, *check)


def test_restricted_namespace_admits_the_operator_pod(cluster: Cluster, namespace: str):
    cluster.kubectl(
        "label",
        "namespace",
        namespace,
        "pod-security.kubernetes.io/enforce=restricted",
        "pod-security.kubernetes.io/enforce-version=latest",
    )
    # Admission is really enforced here: a pod without the hardening is refused...
    bare = cluster.kubectl(
        "run", "bare", "-n", namespace, "--image=example.invalid/x:1", "--dry-run=server", check=False
    )
    assert bare.returncode != 0
    assert 'violates PodSecurity "restricted' in bare.stderr
    # ...and the operator's Deployment, rendered from the base into this namespace, gets its pod.
    docs = [d for d in rendered(cluster, MANIFESTS / "base") if d["kind"] in ("ServiceAccount", "Deployment")]
    for doc in docs:
        doc["metadata"]["namespace"] = namespace
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))

    def admitted() -> list[str]:
        trouble = replica_set_trouble(cluster, namespace)
        assert "PodSecurity" not in trouble, trouble  # FailedCreate: refused by Pod Security admission
        return running_pods(cluster, namespace)

    try:
        wait_for(admitted, what="the operator pod Running under restricted")
    except AssertionError as e:
        raise AssertionError(f"{e}; ReplicaSet: {replica_set_trouble(cluster, namespace)}") from None
    assert not replica_set_trouble(cluster, namespace)


def test_namespaced_component_is_enough_to_run_the_operator(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    # The namespaced component's RBAC for an operator watching `namespace` (as overlays/namespaced does it).
    here = os.path.relpath(MANIFESTS, tmp_path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": namespace,
        "namePrefix": f"{namespace}-",
        "resources": [f"{here}/base"],
        "components": [f"{here}/components/namespaced"],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    rbac = [
        d
        for d in rendered(cluster, tmp_path)
        if d["kind"] in ("ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding")
    ]
    account = f"{namespace}-kiln-operator"
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rbac))
    try:
        who = f"system:serviceaccount:{namespace}:{account}"
        assert can_i(cluster, "patch", "trainingjobs.kiln.dev", "-n", namespace, who=who)
        assert not can_i(cluster, "list", "trainingjobs.kiln.dev", "--all-namespaces", who=who)
        assert not can_i(cluster, "list", "trainingjobs.kiln.dev", "-n", "kiln-system", who=who)

        kubeconfig = service_account_kubeconfig(
            cluster, tmp_path / "kubeconfig.yaml", name=account, namespace=namespace
        )
        monkeypatch.setenv(OPERATOR_KUBECONFIG_ENV, str(kubeconfig))
        cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "manifests/samples/trainingjob.yaml"))
        # run_operator fails the test on any Forbidden/"Not enough permissions" in the operator's output.
        with run_operator(f"--namespace={namespace}"):
            wait_for(
                lambda: (
                    cluster.get("trainingjob/classifier", "-n", namespace).get("status", {}).get("observedGeneration")
                    == 1
                ),
                what="the TrainingJob reconciled under the namespaced RBAC",
            )
    finally:
        for kind in ("clusterrolebinding", "clusterrole"):
            cluster.kubectl("delete", kind, account, "--ignore-not-found", check=False)
