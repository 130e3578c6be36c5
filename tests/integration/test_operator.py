"""The whole chain: CRDs applied with kubectl to the real API server, custom resources
created, the operator (kopf under KopfRunner) reconciling them, with its liveness and metrics endpoints."""

import re

from support.cluster import REPO, Cluster, Operator, run_operator
from support.waiting import wait_for

KINDS = ("trainingjobs", "modelcompressions", "modeldeployments")


def status_of(cluster: Cluster, ns: str, resource: str) -> dict:
    return cluster.get(resource, "-n", ns).get("status") or {}


def reconciled(cluster: Cluster, ns: str, resource: str, generation: int) -> dict:
    status = status_of(cluster, ns, resource)
    return status if status.get("observedGeneration") == generation else {}


def counter(metrics: str, kind: str, outcome: str) -> float:
    m = re.search(rf'^kiln_reconciles_total\{{kind="{kind}",outcome="{outcome}"\}} (\S+)$', metrics, re.M)
    return float(m.group(1)) if m else 0.0


def test_crds_are_established_and_grouped(cluster: Cluster, crds: None):
    for plural in KINDS:
        crd = cluster.get("crd", f"{plural}.kiln.dev")
        assert "kiln" in crd["spec"]["names"]["categories"]
        assert any(c["type"] == "Established" and c["status"] == "True" for c in crd["status"]["conditions"])
    # `kubectl get kiln` resolves the category to all three kinds.
    assert cluster.kubectl("get", "kiln", "-A").returncode == 0


def test_operator_reconciles_samples_and_spec_changes(cluster: Cluster, namespace: str, operator: Operator):
    cluster.kubectl("apply", "-n", namespace, "-k", str(REPO / "manifests/samples"))
    samples = ("trainingjob/classifier", "modelcompression/classifier-int8", "modeldeployment/classifier")
    # The TrainingJob controller runs the sample to the end (kwok's pods succeed).
    done = wait_for(
        lambda: reconciled(cluster, namespace, samples[0], 1).get("phase") == "Succeeded", what="sample TrainingJob"
    )
    assert done
    # The ModelCompression waits for a model the sample TrainingJob did not publish (kwok runs no trainer).
    status = wait_for(
        lambda: (s := reconciled(cluster, namespace, samples[1], 1)).get("conditions") and s, what="sample compression"
    )
    (source,) = [c for c in status["conditions"] if c["type"] == "SourceReady"]
    assert (source["status"], source["reason"]) == ("False", "SourceNotReady")
    # The ModelDeployment follows that compression: nothing promoted yet, so nothing to serve, and it says why.
    status = wait_for(lambda: reconciled(cluster, namespace, samples[2], 1), what=f"{samples[2]} observedGeneration=1")
    (ready,) = [c for c in status["conditions"] if c["type"] == "Ready"]
    assert (ready["status"], ready["reason"], ready["observedGeneration"]) == ("False", "SourceNotReady", 1)
    assert "classifier-int8" in ready["message"]
    assert ready["lastTransitionTime"]

    # A spec change bumps metadata.generation; the operator catches up.
    cluster.kubectl(
        "patch", "-n", namespace, samples[0], "--type=merge", "-p", '{"spec":{"image":"kiln/trainer:0.2.0"}}'
    )
    wait_for(lambda: reconciled(cluster, namespace, samples[0], 2), what="observedGeneration=2")

    # `kubectl wait` understands the status (kstatus shape).
    out = cluster.kubectl("wait", "-n", namespace, samples[0], "--for=condition=Succeeded", "--timeout=10s")
    assert "condition met" in out.stdout
    out = cluster.kubectl("wait", "-n", namespace, samples[2], "--for=condition=Ready=False", "--timeout=10s")
    assert "condition met" in out.stdout

    metrics = operator.metrics()
    assert counter(metrics, "TrainingJob", "success") >= 2
    assert counter(metrics, "ModelDeployment", "success") >= 1
    assert re.search(r'^kiln_reconcile_duration_seconds_count\{kind="TrainingJob"\} [1-9]', metrics, re.M)
    assert "now" in operator.liveness()


def test_namespaced_operator_leaves_other_namespaces_alone(cluster: Cluster, crds: None, namespace: str):
    other = f"{namespace}-other"
    cluster.create_namespace(other)
    try:
        sample = str(REPO / "manifests/samples/trainingjob.yaml")
        cluster.kubectl("apply", "-n", other, "-f", sample)  # created first...
        cluster.kubectl("apply", "-n", namespace, "-f", sample)
        with run_operator(f"--namespace={namespace}"):
            wait_for(lambda: reconciled(cluster, namespace, "trainingjob/classifier", 1), what="ours reconciled")
            # ...yet, once ours is done, the one outside the watched namespace is still untouched.
            assert status_of(cluster, other, "trainingjob/classifier") == {}
    finally:
        cluster.kubectl("delete", "namespace", other, "--wait=false", check=False)


def test_changes_made_while_the_operator_is_down_are_reconciled_on_restart(
    cluster: Cluster, crds: None, namespace: str
):
    ref = "trainingjob/classifier"
    cluster.kubectl("apply", "-n", namespace, "-f", str(REPO / "manifests/samples/trainingjob.yaml"))
    with run_operator(f"--namespace={namespace}"):
        wait_for(lambda: reconciled(cluster, namespace, ref, 1), what="generation 1 reconciled")
    cluster.kubectl("patch", "-n", namespace, ref, "--type=merge", "-p", '{"spec":{"image":"kiln/trainer:0.3.0"}}')
    assert status_of(cluster, namespace, ref)["observedGeneration"] == 1  # nobody is running
    with run_operator("-A"):
        wait_for(lambda: reconciled(cluster, namespace, ref, 2), what="generation 2 reconciled after restart")
