"""The install surface under manifests/, built the way users build it (kubectl's kustomize): least-privilege RBAC,
a hardened single-replica Deployment, and optional components that keep both true."""

import json
import os
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cluster import bin_dir
from support.dashboards import dashboards, rule_groups

from kiln_operator import resources
from kiln_operator.__main__ import parse

REPO = Path(__file__).resolve().parents[2]
MANIFESTS = REPO / "manifests"
KUBECTL = bin_dir() / "kubectl"
IMAGE = "kiln/operator:0.1.0"
ACCOUNT = ("kiln-system", "kiln-operator")
PLURALS = sorted(k.plural for k in resources.ALL)
MONITORING = ("servicemonitor", "alerts", "dashboards")  # what docs/operations.md says to add together

# (apiGroup, resource, verb) the operator is allowed: exactly what kopf and the handlers call today (README, Install).
# No Events: kopf 1.45 posts none by default (settings.posting.loggers is false) and no handler calls kopf.event().
NAMESPACED_GRANTS = (
    {("kiln.dev", plural, verb) for plural in PLURALS for verb in ("list", "watch", "patch", "delete")}
    | {("kiln.dev", f"{plural}/status", "patch") for plural in PLURALS}
    | {("batch", "jobs", verb) for verb in ("get", "list", "watch", "create", "patch", "delete")}
    | {("", "services", verb) for verb in ("get", "create", "patch", "delete")}
    | {("apps", "deployments", verb) for verb in ("list", "watch", "create", "patch", "delete")}
    | {("policy", "poddisruptionbudgets", verb) for verb in ("create", "patch")}
    | {("autoscaling", "horizontalpodautoscalers", verb) for verb in ("create", "patch", "delete")}
    | {("gateway.networking.k8s.io", "httproutes", verb) for verb in ("create", "patch", "delete")}
    | {("", "pods", "list"), ("", "pods", "watch"), ("", "pods/log", "get"), ("", "events", "create")}
    | {("networking.k8s.io", "networkpolicies", verb) for verb in ("create", "patch")}
    | {("", "serviceaccounts", verb) for verb in ("create", "patch", "delete")}
    | {("rbac.authorization.k8s.io", "rolebindings", verb) for verb in ("create", "patch", "delete")}
    | {("rbac.authorization.k8s.io", "clusterroles", "bind")}
    | {("kueue.x-k8s.io", "workloads", "list"), ("kueue.x-k8s.io", "workloads", "patch")}
)
CLUSTER_SCOPED_GRANTS = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
    ("", "namespaces", "list"),
    ("", "namespaces", "watch"),
    *(("rbac.authorization.k8s.io", "clusterrolebindings", verb) for verb in ("list", "create", "patch", "delete")),
    ("rbac.authorization.k8s.io", "clusterroles", "bind"),
}
# The only roles the operator may bind (RBAC's escalation check): what an inference server with auth may ask.
SERVER_ROLES = {"kiln-server-tokenreview", "kiln-server-access-review"}


def kustomize(path: Path) -> list[dict[str, Any]]:
    if not KUBECTL.exists():
        pytest.skip(f"{KUBECTL} is not built (hack/build-control-plane.sh)")
    out = subprocess.run([str(KUBECTL), "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def with_components(tmp_path: Path, *components: str) -> list[dict[str, Any]]:
    """The default install plus the given components, as a user's own kustomization would combine them."""
    here = os.path.relpath(MANIFESTS, tmp_path)  # kustomize refuses absolute roots
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [here],
        "components": [f"{here}/components/{c}" for c in components],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(tmp_path)


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def operator_role(docs: list[dict[str, Any]]) -> dict[str, Any]:
    """The operator's ClusterRole, beside the servers' (whose names it keeps: the operator binds them by name)."""
    (doc,) = [d for d in docs if d["kind"] == "ClusterRole" and d["metadata"]["name"] not in SERVER_ROLES]
    return doc


def grants(role: dict[str, Any]) -> set[tuple[str, str, str]]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


@pytest.fixture(
    params=["default", "servicemonitor", "namespaced", "both", "monitoring", "overlays/namespaced", "overlays/local"],
)
def build(request: pytest.FixtureRequest, tmp_path: Path) -> list[dict[str, Any]]:
    if request.param == "default":
        return kustomize(MANIFESTS)
    if request.param == "both":
        return with_components(tmp_path, "servicemonitor", "namespaced")
    if request.param == "monitoring":
        return with_components(tmp_path, *MONITORING)
    if request.param.startswith("overlays/"):
        return kustomize(MANIFESTS / request.param)
    return with_components(tmp_path, request.param)


def test_no_rbac_rule_has_a_wildcard_or_touches_secrets(build):
    roles = [d for d in build if d["kind"] in ("ClusterRole", "Role")]
    assert roles
    for role in roles:
        for rule in role["rules"]:
            assert "nonResourceURLs" not in rule, role["metadata"]["name"]
            for field in ("apiGroups", "resources", "verbs", "resourceNames"):
                assert not any("*" in item for item in rule.get(field, [])), (role["metadata"]["name"], rule)
            assert "secrets" not in rule.get("resources", []), (role["metadata"]["name"], rule)
            assert not {"escalate", "impersonate"} & set(rule["verbs"]), rule
            if "bind" in rule["verbs"]:
                # Binding only the servers' roles, each by name, and nothing else in the same rule.
                assert rule["verbs"] == ["bind"], rule
                assert rule["resources"] == ["clusterroles"], rule
                assert rule["resourceNames"], rule
                assert set(rule["resourceNames"]) <= SERVER_ROLES, rule


def test_the_servers_roles_allow_exactly_the_two_reviews():
    docs = kustomize(MANIFESTS)
    roles = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ClusterRole"}
    assert grants(roles["kiln-server-tokenreview"]) == {("authentication.k8s.io", "tokenreviews", "create")}
    # Local: a server can ask about its own namespace only, through the RoleBinding the operator makes there.
    assert grants(roles["kiln-server-access-review"]) == {
        ("authorization.k8s.io", "localsubjectaccessreviews", "create")
    }


def test_the_default_install_grants_exactly_what_the_operator_calls():
    docs = kustomize(MANIFESTS)
    assert grants(operator_role(docs)) == NAMESPACED_GRANTS | CLUSTER_SCOPED_GRANTS
    binding = only(docs, "ClusterRoleBinding")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": "kiln-operator",
    }
    assert [(s["kind"], s["namespace"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", *ACCOUNT)]
    sa = only(docs, "ServiceAccount")
    assert (sa["metadata"]["namespace"], sa["metadata"]["name"]) == ACCOUNT
    assert not [d for d in docs if d["kind"] in ("Role", "RoleBinding")]


def test_the_default_install_is_the_operator_only():
    docs = kustomize(MANIFESTS)
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Namespace",
            "ServiceAccount",
            "ClusterRole",
            "ClusterRoleBinding",
            "Deployment",
            "Service",
            "NetworkPolicy",
            "ClusterRole",  # the two a server with auth may be bound to
            "ClusterRole",
        ]
    )
    # Not the samples (custom resources, applied after the CRDs) and not the optional ServiceMonitor.
    assert not [d for d in docs if d["apiVersion"].startswith(("kiln.dev/", "monitoring.coreos.com/"))]
    namespace = only(docs, "Namespace")
    assert namespace["metadata"]["name"] == "kiln-system"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"


def test_the_deployment_is_hardened(build):
    deployment = only(build, "Deployment")
    spec = deployment["spec"]
    assert spec["replicas"] == 1
    assert spec["strategy"] == {"type": "Recreate"}  # kopf --standalone: never two operators at once
    pod = spec["template"]["spec"]
    assert spec["selector"]["matchLabels"].items() <= spec["template"]["metadata"]["labels"].items()
    assert pod["automountServiceAccountToken"] is True
    assert pod["serviceAccountName"] == only(build, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] == pod["securityContext"]["runAsGroup"] == 65532
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    (container,) = pod["containers"]
    assert container["image"] == IMAGE
    sc = container["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == sc["runAsGroup"] == 65532
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(container["resources"][kind]), kind
    # Writable /tmp on the read-only root filesystem.
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in volume
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}


def test_the_probe_and_the_ports_match_the_operator_flags(build):
    container = only(build, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    # The args must be what kiln-operator accepts, and the probe must hit the liveness endpoint they configure.
    kopf_argv, env = parse(container["args"])
    assert "--liveness=http://0.0.0.0:8080/healthz" in kopf_argv
    assert env["KILN_METRICS_ADDRESS"] == "0.0.0.0:9090"
    probe = container["livenessProbe"]["httpGet"]
    assert probe["path"] == "/healthz"
    assert ports.get(probe["port"], probe["port"]) == 8080
    service = only(build, "Service")
    (port,) = service["spec"]["ports"]
    assert (port["name"], port["port"], ports[port["targetPort"]]) == ("metrics", 9090, 9090)
    pod_labels = only(build, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()


def test_the_default_install_watches_every_namespace():
    container = only(kustomize(MANIFESTS), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["args"] == [
        "--all-namespaces",
        "--liveness=http://0.0.0.0:8080/healthz",
        "--metrics=0.0.0.0:9090",
    ]


def test_the_user_matches_the_image():
    dockerfile = (REPO / "images/operator/Dockerfile").read_text()
    assert "USER 65532:65532" in dockerfile
    assert 'ENTRYPOINT ["python", "-m", "kiln_operator"]' in dockerfile


def test_namespaced_component_moves_the_namespaced_grants_into_a_role(tmp_path):
    docs = with_components(tmp_path, "namespaced")
    role, binding = only(docs, "Role"), only(docs, "RoleBinding")
    deployment = only(docs, "Deployment")
    assert grants(role) == NAMESPACED_GRANTS
    # Only what has no namespace stays cluster-wide, read-only.
    assert grants(operator_role(docs)) == CLUSTER_SCOPED_GRANTS
    assert role["metadata"]["namespace"] == binding["metadata"]["namespace"] == deployment["metadata"]["namespace"]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert [(s["kind"], s["namespace"], s["name"]) for s in binding["subjects"]] == [("ServiceAccount", *ACCOUNT)]
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "--namespace=$(POD_NAMESPACE)"
    assert "--all-namespaces" not in container["args"]
    env = {e["name"]: e for e in container["env"]}
    assert env["POD_NAMESPACE"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_namespaced_overlay_installs_into_an_existing_namespace():
    docs = kustomize(MANIFESTS / "overlays/namespaced")
    assert not [d for d in docs if d["kind"] == "Namespace"]  # the team's namespace is not ours to create
    namespaced = [d for d in docs if d["kind"] not in ("ClusterRole", "ClusterRoleBinding")]
    assert {d["metadata"]["namespace"] for d in namespaced} == {"team-a"}
    binding = only(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == operator_role(docs)["metadata"]["name"] == "team-a-kiln-operator"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "team-a-kiln-operator", "namespace": "team-a"}]


def test_servicemonitor_component_scrapes_the_metrics_service(tmp_path):
    docs = with_components(tmp_path, "servicemonitor")
    monitor, service = only(docs, "ServiceMonitor"), only(docs, "Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]
    # The object series' own namespace label wins over the target's (the alerts and dashboards select on it).
    assert [e.get("honorLabels") for e in monitor["spec"]["endpoints"]] == [True]


def test_alerts_and_dashboards_land_beside_the_operator(tmp_path):
    docs = with_components(tmp_path, *MONITORING)
    namespace = only(docs, "Deployment")["metadata"]["namespace"]
    rule = only(docs, "PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == namespace
    assert rule["spec"]["groups"] == rule_groups()  # the rule file the promtool tests check is what ships
    maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    assert sorted(maps) == [f"kiln-dashboard-{n}" for n in ("compression", "operator", "serving", "training")]
    for name, config_map in maps.items():
        assert config_map["metadata"]["namespace"] == namespace
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"  # what Grafana's sidecar looks for
        ((key, text),) = config_map["data"].items()
        assert key == f"kiln-{name.removeprefix('kiln-dashboard-')}.json"
        assert json.loads(text) == dashboards()[key]


def test_the_operator_down_alert_finds_an_operator_under_an_overlays_name_prefix(tmp_path):
    here = os.path.relpath(MANIFESTS, tmp_path)
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "namespace": "team-b",
        "namePrefix": "team-b-",
        "resources": [f"{here}/base"],
        "components": [f"{here}/components/{c}" for c in ("namespaced", *MONITORING)],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = kustomize(tmp_path)
    service = only(docs, "Service")["metadata"]["name"]  # the ServiceMonitor's job label is the Service's name
    (down,) = [
        r
        for g in only(docs, "PrometheusRule")["spec"]["groups"]
        for r in g["rules"]
        if r.get("alert") == "KilnOperatorDown"
    ]
    (pattern,) = set(re.findall(r'up\{job=~"([^"]+)"\}', down["expr"]))
    assert re.fullmatch(pattern, service), (pattern, service)
    assert re.fullmatch(pattern, "kiln-operator-metrics")
    assert not re.fullmatch(pattern, "kiln-operator-metrics-other")
    assert {d["metadata"]["namespace"] for d in docs if d["kind"] in ("PrometheusRule", "ConfigMap")} == {"team-b"}


def test_the_runbook_links_can_be_made_absolute_as_the_operations_doc_shows(tmp_path):
    here = os.path.relpath(MANIFESTS, tmp_path)
    base = "https://git.example.com/platform/kiln/blob/main/docs/runbook.md"
    (tmp_path / "runbook-url.yaml").write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "kiln-runbook", "annotations": {"config.kubernetes.io/local-config": "true"}},
                "data": {"url": base},
            }
        )
    )
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [here, "runbook-url.yaml"],
        "components": [f"{here}/components/{c}" for c in MONITORING],
        "replacements": [
            {
                "source": {"kind": "ConfigMap", "name": "kiln-runbook", "fieldPath": "data.url"},
                "targets": [
                    {
                        "select": {"kind": "PrometheusRule"},
                        "fieldPaths": ["spec.groups.*.rules.*.annotations.runbook_url"],
                        "options": {"delimiter": "#", "index": 0},
                    }
                ],
            }
        ],
    }
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    docs = kustomize(tmp_path)
    urls = [
        r["annotations"]["runbook_url"]
        for g in only(docs, "PrometheusRule")["spec"]["groups"]
        for r in g["rules"]
        if "alert" in r
    ]
    assert urls
    assert all(u.startswith(f"{base}#kiln") for u in urls), urls
    assert not [d for d in docs if d["metadata"]["name"] == "kiln-runbook"]  # local-config: read, not applied


def test_the_local_install_gives_the_operator_its_store():
    docs = kustomize(MANIFESTS / "overlays/local")
    pod = only(docs, "Deployment")["spec"]["template"]["spec"]
    env = {e["name"]: e.get("value") for e in pod["containers"][0]["env"]}
    assert env["KILN_ARTIFACT_ROOT"] == "pvc://kiln-store/artifacts"
    mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
    assert mounts["kiln-store"] == "/mnt/kiln/pvc/kiln-store"  # where pvc://kiln-store/... resolves
    claim = only(docs, "PersistentVolumeClaim")
    assert (claim["metadata"]["namespace"], claim["metadata"]["name"]) == ("kiln-system", "kiln-store")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]


def _leaves(node: Any, path: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        return {k: v for key, child in node.items() for k, v in _leaves(child, f"{path}.{key}").items()}
    return {path: node}


def test_the_local_samples_differ_from_the_real_ones_in_a_few_visible_fields():
    real = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(MANIFESTS / "samples")}
    local = {(d["kind"], d["metadata"]["name"]): d for d in kustomize(MANIFESTS / "overlays/local-samples")}
    added = {("Namespace", "kiln-demo"), ("PersistentVolumeClaim", "kiln-store"), ("Job", "publish-digits")}
    assert set(local) == set(real) | added
    changed = set()
    for key, doc in real.items():
        assert local[key]["metadata"]["namespace"] == "kiln-demo"
        before, after = _leaves(doc["spec"]), _leaves(local[key]["spec"])
        changed |= {f"{key[0]}{p}" for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
        assert doc["spec"].get("image", "") == local[key]["spec"].get("image", "")  # the same images
    assert len(changed) <= 30, sorted(changed)
    assert "TrainingJob.resources.gpus" in changed
    tj = local[("TrainingJob", "classifier")]["spec"]
    mc = local[("ModelCompression", "classifier-int8")]["spec"]
    assert tj["dataset"]["uri"] == mc["evaluation"]["dataset"]["uri"] == "pvc://kiln-store/datasets/digits"
    job = local[("Job", "publish-digits")]["spec"]["template"]
    assert job["spec"]["containers"][0]["command"][-1] == tj["dataset"]["uri"]  # publishes what the job reads
    assert job["spec"]["automountServiceAccountToken"] is False
    assert job["spec"]["securityContext"]["runAsNonRoot"] is True
    assert job["spec"]["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    hardened = job["spec"]["containers"][0]["securityContext"]
    assert hardened == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    labels = local[("Namespace", "kiln-demo")]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
