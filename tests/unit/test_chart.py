"""The Helm chart charts/kiln against the kustomize tree it mirrors: with default values it renders what
`kubectl kustomize manifests/` renders, with the namespaced values what overlays/namespaced renders, with the store
what overlays/local renders, and with monitoring on what the components add; its copies of the CRDs, alerts and
dashboards are byte-for-byte the originals; every value does what values.yaml says and the schema refuses bad ones.
helm comes from hack/build-helm.sh, kubectl from hack/build-control-plane.sh."""

import json
import os
import re
import subprocess
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cluster import bin_dir

from kiln_artifacts.settings import PVC_ROOT_ENV
from kiln_operator.__main__ import parse
from kiln_operator.api import crds
from kiln_operator.config import METRICS_ADDRESS_ENV, Config

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts/kiln"
MANIFESTS = REPO / "manifests"
MONITORING = ("servicemonitor", "alerts", "dashboards")
# Labels only Helm's objects carry (Helm's recommended labels; instance is the release name, version the chart's
# appVersion): everything else about each object must be what kustomize renders.
HELM_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
}
MONITORING_VALUES = {"monitoring": {k: {"enabled": True} for k in ("serviceMonitor", "alerts", "dashboards")}}
NAMESPACED_VALUES = {"scope": "namespace", "serverRoles": {"create": False}}
DASHBOARDS = sorted((MANIFESTS / "components/dashboards").glob("*.json"))
Docs = list[dict[str, Any]]


def tool(name: str, built_by: str) -> Path:
    path = bin_dir() / name
    if not path.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{path} is not built ({built_by})")
        pytest.skip(f"{path} is not built ({built_by})")
    return path


def helm(*args: str, tmp: Path) -> subprocess.CompletedProcess:
    # Helm's own config, cache and data in the test's folder: nothing read from or written to the user's ~/.config.
    env = {**os.environ, **{f"HELM_{k}_HOME": str(tmp / f"helm-{k.lower()}") for k in ("CONFIG", "CACHE", "DATA")}}
    return subprocess.run(
        [str(tool("helm", "hack/build-helm.sh")), *args], capture_output=True, text=True, check=False, env=env
    )


def render(tmp: Path, values: dict[str, Any] | None = None, *, namespace: str = "kiln-system") -> Docs:
    """`helm template` of the chart with these values (a values file, as users pass them), release kiln."""
    file = tmp / "values.yaml"
    file.write_text(yaml.safe_dump(values or {}))
    out = helm("template", "kiln", str(CHART), "--namespace", namespace, "-f", str(file), tmp=tmp)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kustomize(path: Path) -> Docs:
    kubectl = tool("kubectl", "hack/build-control-plane.sh")
    out = subprocess.run([str(kubectl), "kustomize", str(path)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def kustomization(tmp: Path, *, resources: list[str], components: tuple[str, ...] = (), **fields: Any) -> Docs:
    """A user's own kustomization over manifests/ (paths relative to it), rendered."""
    here = os.path.relpath(MANIFESTS, tmp)  # kustomize refuses absolute roots
    doc = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        **fields,
        "resources": [f"{here}/{r}".rstrip("/") for r in resources],
        "components": [f"{here}/components/{c}" for c in components],
    }
    (tmp / "kustomization.yaml").write_text(yaml.safe_dump(doc))
    return kustomize(tmp)


def key(doc: dict[str, Any]) -> tuple[str, str, str]:
    return doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"]


def without_helm_labels(docs: Docs) -> dict[tuple[str, str, str], dict[str, Any]]:
    out = {}
    for doc in docs:
        meta = doc["metadata"]
        labels = {k: v for k, v in meta.get("labels", {}).items() if k not in HELM_LABELS}
        meta.pop("labels", None)
        if labels:
            meta["labels"] = labels
        out[key(doc)] = doc
    return out


def assert_same_objects(chart: Docs, kustomized: Docs) -> None:
    got, want = without_helm_labels(chart), {key(d): d for d in kustomized}
    assert sorted(got) == sorted(want), "objects differ (kind, namespace, name)"
    for k, doc in want.items():
        assert got[k] == doc, f"{k} differs from what kustomize renders"


def only(docs: Docs, kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def container(docs: Docs) -> dict[str, Any]:
    (c,) = only(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    return c


def env(docs: Docs) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container(docs)["env"]}


def pod(docs: Docs) -> dict[str, Any]:
    return only(docs, "Deployment")["spec"]["template"]["spec"]


# --- Lint, version, copies -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "values", [{}, NAMESPACED_VALUES | MONITORING_VALUES | {"store": {"enabled": True}}], ids=["default", "all-on"]
)
def test_helm_lint_strict(tmp_path: Path, values: dict[str, Any]):
    file = tmp_path / "values.yaml"
    file.write_text(yaml.safe_dump(values))
    out = helm("lint", "--strict", str(CHART), "-f", str(file), tmp=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 chart(s) failed" in out.stdout


def test_chart_version_is_the_project_version(tmp_path: Path):
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["version"] == chart["appVersion"] == project
    # The default image is the one hack/images.sh builds and manifests/ runs: kiln/operator:<version>.
    assert container(render(tmp_path))["image"] == f"kiln/operator:{project}"


def test_the_charts_crds_are_the_generated_ones():
    # Helm installs a chart's crds/ (never templates/): `python -m kiln_operator.api.crds` writes both copies.
    assert crds.main(["--check", str(CHART / "crds")]) == 0, "run: .venv/bin/python -m kiln_operator.api.crds"
    assert sorted(p.name for p in (CHART / "crds").iterdir()) == sorted(p.name for p in (REPO / "crds").iterdir())
    for path in (REPO / "crds").iterdir():
        assert (CHART / "crds" / path.name).read_bytes() == path.read_bytes(), path.name


@pytest.mark.parametrize(
    ("original", "copy"),
    [
        *[(f"components/dashboards/{p.name}", f"dashboards/{p.name}") for p in DASHBOARDS],
        ("components/alerts/prometheusrule.yaml", "alerts/prometheusrule.yaml"),
    ],
)
def test_the_charts_monitoring_files_are_copies(original: str, copy: str):
    # Helm reads only files inside the chart; the alerts and dashboards stay edited under manifests/.
    assert (CHART / "files" / copy).read_bytes() == (MANIFESTS / original).read_bytes(), (
        f"cp manifests/{original} charts/kiln/files/{copy}"
    )
    shipped = {p.name for p in (CHART / "files/dashboards").iterdir()}
    assert shipped == {p.name for p in DASHBOARDS}


# --- The same objects as the kustomize tree ----------------------------------------------------------------------


def test_default_values_render_the_kustomize_install(tmp_path: Path):
    kustomized = kustomize(MANIFESTS)
    # The one object left out: Helm installs into the release namespace, which exists before the release (Helm keeps
    # the release record there), so the chart cannot create it; docs/operations.md says to create and label it.
    (namespace,) = [d for d in kustomized if d["kind"] == "Namespace"]
    assert namespace["metadata"]["name"] == "kiln-system"
    assert_same_objects(render(tmp_path), [d for d in kustomized if d["kind"] != "Namespace"])


def test_the_documented_namespace_gets_the_kustomize_namespaces_labels():
    """What docs/operations.md has users run before `helm install` labels the namespace as manifests/base does."""
    (namespace,) = [d for d in kustomize(MANIFESTS) if d["kind"] == "Namespace"]
    section = (REPO / "docs/operations.md").read_text().split("## Install with Helm", 1)[1].split("\n## ", 1)[0]
    for label, value in namespace["metadata"]["labels"].items():
        if label.startswith("pod-security.kubernetes.io/"):
            assert f"{label}={value}" in section, label


def test_namespaced_values_render_the_namespaced_overlay(tmp_path: Path):
    values = NAMESPACED_VALUES | {"namePrefix": "team-a-"}
    assert_same_objects(render(tmp_path, values, namespace="team-a"), kustomize(MANIFESTS / "overlays/namespaced"))


def test_store_values_render_the_local_overlay(tmp_path: Path):
    values = {
        "store": {"enabled": True, "storageClassName": "kiln-shared", "keep": False},
        "config": {"progressPollSeconds": 5},
    }
    kustomized = [d for d in kustomize(MANIFESTS / "overlays/local") if d["kind"] != "Namespace"]
    assert_same_objects(render(tmp_path, values), kustomized)


def test_monitoring_values_render_the_components(tmp_path: Path):
    kustomized = [d for d in kustomization(tmp_path, resources=[""], components=MONITORING) if d["kind"] != "Namespace"]
    assert {"ServiceMonitor", "PodMonitor", "PrometheusRule", "ConfigMap"} <= {d["kind"] for d in kustomized}
    assert_same_objects(render(tmp_path, MONITORING_VALUES), kustomized)


@pytest.mark.parametrize("component", ["serviceMonitor", "alerts", "dashboards"])
def test_each_monitoring_component_alone(tmp_path: Path, component: str):
    names = {"serviceMonitor": "servicemonitor", "alerts": "alerts", "dashboards": "dashboards"}
    kustomized = [
        d for d in kustomization(tmp_path, resources=[""], components=(names[component],)) if d["kind"] != "Namespace"
    ]
    assert_same_objects(render(tmp_path, {"monitoring": {component: {"enabled": True}}}), kustomized)


def test_a_prefixed_namespaced_install_with_monitoring_renders_what_an_overlay_does(tmp_path: Path):
    kustomized = kustomization(
        tmp_path,
        namespace="team-b",
        namePrefix="team-b-",
        resources=["base"],
        components=("namespaced", *MONITORING),
    )
    kustomized = [d for d in kustomized if d["kind"] != "Namespace"]
    values = NAMESPACED_VALUES | MONITORING_VALUES | {"namePrefix": "team-b-"}
    assert_same_objects(render(tmp_path, values, namespace="team-b"), kustomized)


# --- Schema ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "field"),
    [
        ({"scope": "everywhere"}, "/scope"),
        ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
        ({"image": {"digest": "sha256:abc"}}, "/image/digest"),
        ({"namePrefix": "Team_A"}, "/namePrefix"),
        ({"config": {"workers": 0}}, "/config/workers"),
        ({"config": {"progressPollSeconds": "fast"}}, "/config/progressPollSeconds"),
        ({"config": {"artifactRoot": "gs://bucket/models"}}, "/config/artifactRoot"),
        ({"config": {"prometheusUrl": "prometheus:9090"}}, "/config/prometheusUrl"),
        ({"config": {"artifactRot": "s3://b"}}, "artifactRot"),  # a misspelt key is not ignored
        ({"monitoringNamespaces": []}, "/monitoringNamespaces"),  # none would let every namespace in
        ({"monitoring": {"alerts": {"enabled": "yes"}}}, "/monitoring/alerts/enabled"),
        ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
        ({"store": {"accessModes": ["ReadWriteSometimes"]}}, "/store/accessModes/0"),
        ({"replicas": 2}, "replicas"),  # kopf --standalone: never two operators, so no such value
    ],
)
def test_the_schema_refuses_a_bad_value_naming_it(tmp_path: Path, values: dict[str, Any], field: str):
    file = tmp_path / "values.yaml"
    file.write_text(yaml.safe_dump(values))
    out = helm("template", "kiln", str(CHART), "-f", str(file), tmp=tmp_path)
    assert out.returncode != 0, out.stdout[:500]
    assert "values don't meet the specifications of the schema" in out.stderr, out.stderr
    assert field in out.stderr, out.stderr


def test_every_value_has_a_comment():
    """Each key of values.yaml has a comment above it, shares one with the sibling keys right above it, or is the
    first key under a commented parent."""
    documented: dict[int, bool] = {}  # indent -> whether the last key at that indent was documented
    previous = ""
    missing = []
    for line in (CHART / "values.yaml").read_text().splitlines():
        match = re.match(r"^( *)([A-Za-z][\w]*):", line)
        if match:
            indent, name = len(match[1]), match[2]
            before = previous.strip()
            prev_indent = len(previous) - len(previous.lstrip())
            ok = (
                before.startswith("#")
                or (re.match(r"^[A-Za-z]\w*:", before) and prev_indent == indent and documented.get(indent, False))
                or (before.endswith(":") and prev_indent < indent and documented.get(prev_indent, False))
            )
            documented[indent] = bool(ok)
            documented = {i: d for i, d in documented.items() if i <= indent}
            if not ok:
                missing.append(name)
        previous = line
    assert not missing


def test_the_schema_knows_every_value(tmp_path: Path):
    """Every key of values.yaml is declared (and the schema refuses undeclared ones, so none is unchecked)."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def walk(value: Any, node: dict[str, Any], path: str) -> list[str]:
        node = schema["definitions"][node["$ref"].rsplit("/", 1)[1]] if "$ref" in node else node
        if not isinstance(value, dict) or "properties" not in node:
            return []
        assert node.get("additionalProperties") is False, path
        return [
            p
            for k, v in value.items()
            for p in ([f"{path}.{k}"] if k not in node["properties"] else walk(v, node["properties"][k], f"{path}.{k}"))
        ]

    assert walk(values, schema, "") == []


# --- Every knob --------------------------------------------------------------------------------------------------

# Each operator setting (operator/kiln_operator/config.py) the chart has a value for: value -> (variable, example).
CONFIG = {
    "artifactRoot": ("KILN_ARTIFACT_ROOT", "s3://models/kiln"),
    "registryRoot": ("KILN_REGISTRY_ROOT", "s3://models/registry"),
    "artifactS3Secret": ("KILN_ARTIFACT_S3_SECRET", "store-credentials"),
    "artifactS3Endpoint": ("KILN_ARTIFACT_S3_ENDPOINT", "http://minio.store:9000"),
    "pvcRoot": ("KILN_PVC_ROOT", "/mnt/claims"),
    "trainerImage": ("KILN_TRAINER_IMAGE", "registry.example/kiln/trainer:1"),
    "compressorImage": ("KILN_COMPRESSOR_IMAGE", "registry.example/kiln/compressor:1"),
    "serverImage": ("KILN_SERVER_IMAGE", "registry.example/kiln/server:1"),
    "progressPollSeconds": ("KILN_PROGRESS_POLL_SECONDS", 2.5),
    "workers": ("KILN_WORKERS", 8),
    "prometheusUrl": ("KILN_PROMETHEUS_URL", "http://prometheus.monitoring:9090"),
}
# What the operator reads that is not a config value, and why.
NOT_VALUES = {
    "KILN_METRICS_ADDRESS",  # the chart passes --metrics, which wins, to match the port, probe and Service
    "KILN_MONITORING_NAMESPACES",  # monitoringNamespaces, shared with the operator's NetworkPolicy
}


def test_every_setting_the_operator_reads_is_a_value(tmp_path: Path):
    """A variable added to config.py without a value here fails this test."""
    source = (REPO / "operator/kiln_operator/config.py").read_text()
    literal = set(re.findall(r'get\("(\w+)"\)', source))
    constants = set(re.findall(r"get\(([A-Z_]+)\)", source))
    assert constants == {"PVC_ROOT_ENV", "METRICS_ADDRESS_ENV"}  # the two read through a named constant
    read = literal | {PVC_ROOT_ENV, METRICS_ADDRESS_ENV}
    # POD_NAME and POD_NAMESPACE come from the downward API in every install.
    assert read - {"POD_NAME", "POD_NAMESPACE"} == {v for v, _ in CONFIG.values()} | NOT_VALUES
    assert env(render(tmp_path))["POD_NAMESPACE"] == {"fieldRef": {"fieldPath": "metadata.namespace"}}


def test_the_config_values_reach_the_operator_as_it_reads_them(tmp_path: Path):
    values = {"config": {k: example for k, (_, example) in CONFIG.items()}}
    got = env(render(tmp_path, values))
    assert {k: v for k, v in got.items() if k.startswith("KILN_")} == {v: str(e) for v, e in CONFIG.values()}
    config = Config.from_env({k: v for k, v in got.items() if isinstance(v, str)})
    assert config.artifact_root == "s3://models/kiln"
    assert config.registry_root == "s3://models/registry"
    assert config.artifact_s3_secret == "store-credentials"
    assert config.artifact_s3_endpoint == "http://minio.store:9000"
    assert config.pvc_root == "/mnt/claims"
    assert (config.trainer_image, config.compressor_image, config.server_image) == (
        "registry.example/kiln/trainer:1",
        "registry.example/kiln/compressor:1",
        "registry.example/kiln/server:1",
    )
    assert config.progress_poll_seconds == 2.5
    assert config.workers == 8
    assert config.prometheus_url == "http://prometheus.monitoring:9090"


def test_unset_config_values_set_no_variable(tmp_path: Path):
    assert sorted(env(render(tmp_path))) == ["POD_NAME", "POD_NAMESPACE"]


@pytest.mark.parametrize("scope", ["cluster", "namespace"])
def test_the_args_are_what_kiln_operator_accepts(tmp_path: Path, scope: str):
    args = container(render(tmp_path, {"scope": scope}))["args"]
    kopf_argv, _ = parse(args)
    assert ("-A" in kopf_argv) == (scope == "cluster")
    assert ("--namespace=$(POD_NAMESPACE)" in kopf_argv) == (scope == "namespace")


def _names(docs: Docs) -> set[str]:
    return {d["metadata"]["name"] for d in docs}


Check = Callable[[Docs], None]


def _check_prefix(docs: Docs) -> None:
    for doc in docs:
        name = doc["metadata"]["name"]
        assert name.startswith("x1-") or name in {"kiln-server-tokenreview", "kiln-server-access-review"}, name
    binding = only(docs, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "x1-kiln-operator"
    assert binding["subjects"][0]["name"] == pod(docs)["serviceAccountName"] == "x1-kiln-operator"


def _check_store(docs: Docs) -> None:
    claim = only(docs, "PersistentVolumeClaim")
    assert claim["metadata"]["name"] == "models"
    assert claim["spec"]["resources"]["requests"]["storage"] == "1Ti"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]
    assert claim["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep"}
    assert env(docs)["KILN_ARTIFACT_ROOT"] == "pvc://models/kiln/artifacts"
    (mount,) = [m for m in container(docs)["volumeMounts"] if m["name"] == "kiln-store"]
    assert mount["mountPath"] == "/mnt/claims/models"  # where the operator resolves pvc://models/...
    assert env(docs)["KILN_PVC_ROOT"] == "/mnt/claims"
    (volume,) = [v for v in pod(docs)["volumes"] if v["name"] == "kiln-store"]
    assert volume["persistentVolumeClaim"] == {"claimName": "models"}


def _check_existing_claim(docs: Docs) -> None:
    assert not [d for d in docs if d["kind"] == "PersistentVolumeClaim"]
    (volume,) = [v for v in pod(docs)["volumes"] if v["name"] == "kiln-store"]
    assert volume["persistentVolumeClaim"] == {"claimName": "shared"}
    assert env(docs)["KILN_ARTIFACT_ROOT"] == "s3://elsewhere"  # config.artifactRoot wins over the store's


def _check_monitoring_namespaces(docs: Docs) -> None:
    assert env(docs)["KILN_MONITORING_NAMESPACES"] == "prometheus,observability"
    (rule,) = only(docs, "NetworkPolicy")["spec"]["ingress"]
    assert [f["namespaceSelector"]["matchLabels"]["kubernetes.io/metadata.name"] for f in rule["from"]] == [
        "prometheus",
        "observability",
    ]


def _check_monitoring_labels(docs: Docs) -> None:
    for doc in docs:
        if doc["apiVersion"].startswith("monitoring.coreos.com/"):
            assert doc["metadata"]["labels"]["release"] == "kube-prometheus-stack", doc["kind"]
            assert doc["metadata"]["labels"]["app.kubernetes.io/part-of"] == "kiln", doc["kind"]  # the chart's wins
    assert {d["kind"] for d in docs if d["metadata"].get("labels", {}).get("release")} == {
        "ServiceMonitor",
        "PodMonitor",
        "PrometheusRule",
    }


KNOBS: dict[str, tuple[dict[str, Any], Check]] = {
    "image": (
        {"image": {"repository": "registry.example:5000/kiln/operator", "tag": "9.9.9", "pullPolicy": "Always"}},
        lambda d: (
            container(d)["image"] == "registry.example:5000/kiln/operator:9.9.9"
            and container(d)["imagePullPolicy"] == "Always"
        ),
    ),
    "image.digest": (
        {"image": {"digest": "sha256:" + "a" * 64}},
        lambda d: container(d)["image"] == "kiln/operator@sha256:" + "a" * 64,
    ),
    "imagePullSecrets": (
        {"imagePullSecrets": [{"name": "registry"}]},
        lambda d: pod(d)["imagePullSecrets"] == [{"name": "registry"}],
    ),
    "resources": (
        # Helm merges maps with the defaults: null removes a default key.
        {"resources": {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"cpu": None, "memory": "2Gi"}}},
        lambda d: container(d)["resources"] == {"requests": {"cpu": "2", "memory": "1Gi"}, "limits": {"memory": "2Gi"}},
    ),
    "serviceAccount.annotations": (
        {"serviceAccount": {"annotations": {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/kiln"}}},
        lambda d: (
            only(d, "ServiceAccount")["metadata"]["annotations"]
            == {"eks.amazonaws.com/role-arn": "arn:aws:iam::1:role/kiln"}
        ),
    ),
    "nodeSelector": ({"nodeSelector": {"pool": "system"}}, lambda d: pod(d)["nodeSelector"] == {"pool": "system"}),
    "tolerations": (
        {"tolerations": [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}]},
        lambda d: pod(d)["tolerations"] == [{"key": "system", "operator": "Exists", "effect": "NoSchedule"}],
    ),
    "affinity": (
        {"affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}}},
        lambda d: pod(d)["affinity"] == {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": []}},
    ),
    "priorityClassName": (
        {"priorityClassName": "system-cluster-critical"},
        lambda d: pod(d)["priorityClassName"] == "system-cluster-critical",
    ),
    "podAnnotations": (
        {"podAnnotations": {"example.com/team": "ml"}},
        lambda d: only(d, "Deployment")["spec"]["template"]["metadata"]["annotations"] == {"example.com/team": "ml"},
    ),
    "extraEnv": (
        {"extraEnv": [{"name": "AWS_REGION", "value": "eu-west-1"}]},
        lambda d: container(d)["env"][-1] == {"name": "AWS_REGION", "value": "eu-west-1"},
    ),
    "networkPolicy.enabled": (
        {"networkPolicy": {"enabled": False}},
        lambda d: "NetworkPolicy" not in {x["kind"] for x in d},
    ),
    "serverRoles.create": (
        {"serverRoles": {"create": False}},
        lambda d: not {"kiln-server-tokenreview", "kiln-server-access-review"} & _names(d),
    ),
    "namePrefix": ({"namePrefix": "x1-"} | MONITORING_VALUES, _check_prefix),
    "monitoringNamespaces": ({"monitoringNamespaces": ["prometheus", "observability"]}, _check_monitoring_namespaces),
    "store": (
        {
            "config": {"pvcRoot": "/mnt/claims"},
            "store": {
                "enabled": True,
                "claimName": "models",
                "path": "kiln/artifacts",
                "size": "1Ti",
                "accessModes": ["ReadWriteOnce"],
            },
        },
        _check_store,
    ),
    "store.create": (
        {
            "config": {"artifactRoot": "s3://elsewhere"},
            "store": {"enabled": True, "create": False, "claimName": "shared"},
        },
        _check_existing_claim,
    ),
    "store.keep": (
        {"store": {"enabled": True, "keep": False}},
        lambda d: "annotations" not in only(d, "PersistentVolumeClaim")["metadata"],
    ),
    "store.storageClassName": (
        {"store": {"enabled": True, "storageClassName": "nfs"}},
        lambda d: only(d, "PersistentVolumeClaim")["spec"]["storageClassName"] == "nfs",
    ),
    "monitoring.labels": (
        {
            "monitoring": {
                **MONITORING_VALUES["monitoring"],
                "labels": {"release": "kube-prometheus-stack", "app.kubernetes.io/part-of": "platform"},
            }
        },
        _check_monitoring_labels,
    ),
}


@pytest.mark.parametrize("knob", KNOBS)
def test_each_value_changes_what_it_should(tmp_path: Path, knob: str):
    values, check = KNOBS[knob]
    default = render(tmp_path)
    docs = render(tmp_path, values)
    assert without_helm_labels(docs) != without_helm_labels(default)
    result = check(docs)
    assert result is None or result is True, knob


def test_every_value_has_a_knob_test():
    """Every leaf of values.yaml is changed by one of the tests above (the config values by the config tests, scope
    and the monitoring switches by the kustomize comparisons)."""
    values = yaml.safe_load((CHART / "values.yaml").read_text())

    def leaves(node: Any, path: str) -> set[str]:
        if isinstance(node, dict) and node:
            return {p for k, v in node.items() for p in leaves(v, f"{path}.{k}" if path else k)}
        return {path}

    tested = {k for values, _ in KNOBS.values() for k in leaves(values, "")}
    tested |= {f"config.{k}" for k in CONFIG} | {"scope"} | leaves(MONITORING_VALUES, "")
    untested = {leaf for leaf in leaves(values, "") if not any(t == leaf or t.startswith(f"{leaf}.") for t in tested)}
    assert untested == set()
