"""Kiln's Prometheus Operator objects against the real thing: the pinned release's CRDs (hack/versions.env,
PROMETHEUS_OPERATOR_VERSION) admit the ServiceMonitor, PodMonitor and PrometheusRule of manifests/components, as
users render them, with strict field validation (a misspelled field fails instead of being pruned silently), and
the Prometheus Operator itself, run against the local cluster, accepts them and turns them into the scrape jobs
and rule files Kiln's canary analysis, alerts and dashboards rely on."""

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.cluster import Cluster
from support.prometheus_operator import (
    COMPONENTS,
    GROUP,
    MANIFESTS,
    PrometheusOperator,
    apply_crds,
    apply_strict,
    endpoint_targets,
    generated_config,
    missing_fields,
    monitoring_objects,
    pod_targets,
    render,
    run_prometheus_operator,
    scrape_job,
    scrape_targets,
)
from support.waiting import wait_for

from kiln_operator.builders import modeldeployment as b
from kiln_operator.controllers.modeldeployment import MD_TARGET_LABEL, REVISION_TARGET_LABEL

SHIPPED = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}


@pytest.fixture(scope="module")
def prometheus_crds(cluster: Cluster) -> list[str]:
    """The pinned CRDs, cluster-wide (idempotent; left installed, like Kiln's own CRDs)."""
    return apply_crds(cluster)


@pytest.fixture
def shipped(cluster: Cluster, tmp_path: Path, namespace: str) -> list[dict[str, Any]]:
    """Every document of an install with the Prometheus Operator components, in the test's namespace."""
    return render(cluster, tmp_path / "overlay", namespace)


@pytest.fixture
def prometheus_operator(
    cluster: Cluster, prometheus_crds: list[str], namespace: str, tmp_path: Path
) -> Iterator[PrometheusOperator]:
    with run_prometheus_operator(cluster, namespace, tmp_path / "prometheus-operator") as op:
        yield op


def only(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind]
    return doc


def test_the_pinned_crds_serve_every_kind_kiln_ships(cluster: Cluster, prometheus_crds: list[str]) -> None:
    served = cluster.kubectl("api-resources", f"--api-group={GROUP}", "-o", "name").stdout.split()
    for kind in ("servicemonitors", "podmonitors", "prometheusrules", "prometheuses"):
        assert f"{kind}.{GROUP}" in served
        assert f"{kind}.{GROUP}" in prometheus_crds


def test_every_prometheus_operator_object_in_manifests_is_under_test(cluster: Cluster, tmp_path: Path) -> None:
    # The components this file applies must be all that ships for the Prometheus Operator: each component on its
    # own, and the install and overlays, rendered; a new monitor elsewhere would otherwise go unchecked.
    found: set[tuple[str, str]] = set()
    for component in sorted(p.name for p in (MANIFESTS / "components").iterdir() if p.is_dir()):
        docs = render(cluster, tmp_path / component, "ns", (component,))
        found |= {(component, d["kind"]) for d in monitoring_objects(docs)}
    assert found == {
        ("servicemonitor", "ServiceMonitor"),
        ("servicemonitor", "PodMonitor"),
        ("alerts", "PrometheusRule"),
    }
    assert {c for c, _ in found} == set(COMPONENTS)
    for root in [MANIFESTS, *sorted(p for p in (MANIFESTS / "overlays").iterdir() if p.is_dir())]:
        docs = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(root)).stdout) if d]
        assert not monitoring_objects(docs), root


def test_kiln_monitoring_objects_are_admitted_by_the_real_crds_unchanged(
    cluster: Cluster, prometheus_crds: list[str], shipped: list[dict[str, Any]], namespace: str
) -> None:
    objects = monitoring_objects(shipped)
    assert {o["kind"] for o in objects} == SHIPPED
    assert {o["metadata"]["namespace"] for o in objects} == {namespace}
    applied = apply_strict(cluster, objects)
    assert applied.returncode == 0, applied.stderr
    # No warning either: a deprecated field or version comes back as one.
    assert not applied.stderr.strip(), applied.stderr
    for obj in objects:
        stored = cluster.get(obj["kind"].lower(), obj["metadata"]["name"], "-n", namespace)
        # What was sent is what is stored: nothing pruned, nothing rewritten (defaults may be added).
        assert not missing_fields(obj["spec"], stored["spec"], ".spec"), (obj["kind"], obj["spec"], stored["spec"])
        assert obj["metadata"]["labels"].items() <= stored["metadata"]["labels"].items()


def test_a_misspelled_field_is_rejected_by_name(
    cluster: Cluster, prometheus_crds: list[str], shipped: list[dict[str, Any]]
) -> None:
    monitor = copy.deepcopy(only(shipped, "ServiceMonitor"))
    monitor["spec"]["endpoints"][0]["honourLabels"] = True  # the field is honorLabels
    refused = apply_strict(cluster, [monitor], dry_run=True)
    assert refused.returncode != 0
    assert ".spec.endpoints[0].honourLabels" in refused.stderr, refused.stderr
    rule = copy.deepcopy(only(shipped, "PrometheusRule"))
    rule["spec"]["groups"][0]["rules"][0]["expresion"] = "vector(1)"
    refused = apply_strict(cluster, [rule], dry_run=True)
    assert refused.returncode != 0
    group = rule["spec"]["groups"][0]["name"]  # groups are a map keyed by name in the schema
    assert f'.spec.groups[name="{group}"].rules[0].expresion' in refused.stderr, refused.stderr
    # Why strict validation: without it the API server stores the object with the field silently pruned.
    lenient = cluster.kubectl(
        "create", "--validate=false", "--dry-run=server", "-o", "json", "-f", "-", stdin=yaml.safe_dump(monitor)
    )
    stored = yaml.safe_load(lenient.stdout)
    assert "honourLabels" not in stored["spec"]["endpoints"][0]


def server_pod(namespace: str) -> tuple[dict[str, Any], str, str]:
    """A pod of a ModelDeployment revision as the operator's builder makes it; with its name and revision key."""
    md = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "digits", "namespace": namespace, "uid": "u-1", "generation": 1},
        "spec": {"source": {"uri": "file:///m"}, "runtime": {"image": "kiln/server:0.1.0"}},
    }
    key = b.revision_key("file:///m", None)
    deployment = b.deployment(md, key, uri="file:///m", digest=None, number=1, role="stable", replicas=1, created=0)
    template = deployment["spec"]["template"]
    pod = {
        "metadata": {**template["metadata"], "name": "digits-abc-1", "namespace": namespace},
        "spec": template["spec"],
    }
    return pod, "digits", key


def test_the_prometheus_operator_turns_kiln_objects_into_scrape_jobs_and_rules(
    cluster: Cluster, prometheus_operator: PrometheusOperator, shipped: list[dict[str, Any]], namespace: str
) -> None:
    objects = monitoring_objects(shipped)
    applied = apply_strict(cluster, objects)
    assert applied.returncode == 0, applied.stderr
    # A Prometheus selecting Kiln's objects by their common label. No pod: its image is not here, and what the
    # operator generates for it is what is under test.
    prometheus = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Prometheus",
        "metadata": {"name": "kiln", "namespace": namespace},
        "spec": {
            "replicas": 0,
            "serviceMonitorSelector": {"matchLabels": {"app.kubernetes.io/part-of": "kiln"}},
            "podMonitorSelector": {"matchLabels": {"app.kubernetes.io/part-of": "kiln"}},
            "ruleSelector": {"matchLabels": {"app.kubernetes.io/part-of": "kiln"}},
        },
    }
    applied = apply_strict(cluster, [prometheus])
    assert applied.returncode == 0, applied.stderr
    pod_monitor, service_monitor = only(objects, "PodMonitor"), only(objects, "ServiceMonitor")
    pod_job = f"podMonitor/{namespace}/{pod_monitor['metadata']['name']}/0"
    service_job = f"serviceMonitor/{namespace}/{service_monitor['metadata']['name']}/0"

    def both_jobs() -> dict[str, Any] | None:
        config = generated_config(cluster, namespace, "kiln")
        names = {j["job_name"] for j in (config or {}).get("scrape_configs") or []}
        return config if {pod_job, service_job} <= names else None

    try:
        config = wait_for(both_jobs, what="the operator's scrape configuration for Kiln's monitors", timeout=90)
    except AssertionError as e:
        raise AssertionError(f"{e}\nprometheus-operator log tail:\n{prometheus_operator.log_tail()}") from None

    # The PodMonitor: every namespace's inference servers, their metrics port only, with the target labels the
    # operator's analysis queries and the alerts select on.
    job = scrape_job(config, pod_job)
    assert (job["metrics_path"], job["scrape_interval"], job["honor_labels"]) == ("/metrics", "15s", False)
    assert [c["role"] for c in job["kubernetes_sd_configs"]] == ["pod"]
    assert "namespaces" not in job["kubernetes_sd_configs"][0]  # namespaceSelector any: true
    pod, md_name, key = server_pod(namespace)
    (target,) = scrape_targets(job, pod_targets(pod))  # the metrics port, not http or grpc
    assert target["__address__"] == f"10.0.0.7:{b.METRICS_PORT}"
    assert target["__metrics_path__"] == "/metrics"
    assert target[MD_TARGET_LABEL] == md_name
    assert target[REVISION_TARGET_LABEL] == key
    assert (target["namespace"], target["pod"], target["container"]) == (namespace, "digits-abc-1", b.CONTAINER)
    # A pod that is not a server (no kiln.dev/modeldeployment label) is not scraped.
    stranger = copy.deepcopy(pod)
    stranger["metadata"]["labels"] = {"app": "other"}
    assert scrape_targets(job, pod_targets(stranger)) == []

    # The ServiceMonitor: the operator's metrics Service of this install, honoring the series' own namespace.
    job = scrape_job(config, service_job)
    assert (job["metrics_path"], job["scrape_interval"], job["honor_labels"]) == ("/metrics", "30s", True)
    assert [(c["role"], c["namespaces"]["names"]) for c in job["kubernetes_sd_configs"]] == [("endpoints", [namespace])]
    service = only(shipped, "Service")
    (target,) = scrape_targets(job, endpoint_targets(service, "kiln-operator-0"))
    assert target["__address__"] == "10.0.0.8:9090"
    # The job label KilnOperatorDown looks for: the Service's name.
    assert (target["job"], target["service"], target["endpoint"]) == (
        service["metadata"]["name"],
        service["metadata"]["name"],
        "metrics",
    )

    # The PrometheusRule reaches the rule files the Prometheus pod would load, groups unchanged.
    rule = only(objects, "PrometheusRule")

    def rule_file() -> dict[str, Any] | None:
        found = cluster.kubectl(
            "get", "configmap", "prometheus-kiln-rulefiles-0", "-n", namespace, "-o", "json", check=False
        )
        if found.returncode:
            return None
        files = yaml.safe_load(found.stdout).get("data") or {}
        return next((yaml.safe_load(text) for name, text in files.items() if rule["metadata"]["name"] in name), None)

    loaded = wait_for(rule_file, what="Kiln's PrometheusRule in prometheus-kiln-rulefiles-0", timeout=60)
    assert loaded["groups"] == rule["spec"]["groups"]
    assert any("/prometheus-kiln-rulefiles-0/" in f for f in config["rule_files"])

    # The operator reports each object accepted by the Prometheus that selected it, and logged no complaint.
    for obj in objects:

        def accepted(obj: dict[str, Any] = obj) -> list[dict[str, Any]]:
            status = cluster.get(obj["kind"].lower(), obj["metadata"]["name"], "-n", namespace).get("status") or {}
            return [
                c
                for binding in status.get("bindings") or []
                if binding["name"] == "kiln" and binding["resource"] == "prometheuses"
                for c in binding.get("conditions") or []
                if c["type"] == "Accepted"
            ]

        conditions = wait_for(accepted, what=f"{obj['kind']} bound to Prometheus kiln", timeout=60)
        assert [c["status"] for c in conditions] == ["True"], (obj["kind"], conditions)
    assert not prometheus_operator.warnings(), "\n".join(prometheus_operator.warnings())


def test_the_prometheus_operator_refuses_a_monitor_it_cannot_use(
    cluster: Cluster, prometheus_operator: PrometheusOperator, shipped: list[dict[str, Any]], namespace: str
) -> None:
    # The acceptance check above can fail: a PodMonitor the CRD admits but the operator cannot turn into
    # configuration (a relabeling regex that does not compile) is reported Accepted=False and gets no job.
    monitor = copy.deepcopy(only(shipped, "PodMonitor"))
    monitor["metadata"]["name"] = "kiln-serving-broken"
    endpoint = monitor["spec"]["podMetricsEndpoints"][0]
    endpoint["metricRelabelings"] = [{"action": "drop", "sourceLabels": ["__name__"], "regex": "kiln_(server"}]
    prometheus = {
        "apiVersion": f"{GROUP}/v1",
        "kind": "Prometheus",
        "metadata": {"name": "kiln", "namespace": namespace},
        "spec": {"replicas": 0, "podMonitorSelector": {"matchLabels": {"app.kubernetes.io/part-of": "kiln"}}},
    }
    applied = apply_strict(cluster, [monitor, prometheus])
    assert applied.returncode == 0, applied.stderr

    def refused() -> list[dict[str, Any]]:
        status = cluster.get("podmonitor", "kiln-serving-broken", "-n", namespace).get("status") or {}
        return [c for b in status.get("bindings") or [] for c in b.get("conditions") or [] if c["type"] == "Accepted"]

    try:
        (condition,) = wait_for(refused, what="the broken PodMonitor's Accepted condition", timeout=60)
    except AssertionError as e:
        raise AssertionError(f"{e}\nprometheus-operator log tail:\n{prometheus_operator.log_tail()}") from None
    assert condition["status"] == "False", condition
    assert "kiln_(server" in condition.get("message", ""), condition
    config = wait_for(lambda: generated_config(cluster, namespace, "kiln"), what="the generated configuration")
    assert not [j for j in config.get("scrape_configs") or [] if "kiln-serving-broken" in j["job_name"]]
