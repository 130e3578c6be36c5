"""The ModelDeployment controller on the real control plane: children and scaling, truthful status when pods crash,
and canary rollouts judged on real metrics. kwok plays the serving pods (they have no network), so the canary
test runs real inference servers on loopback, one per artifact, and a real Prometheus scraping them with the
target labels a PodMonitor gives the pods of each revision; the operator queries that Prometheus, as in
production."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml
from support.cluster import REPO, Cluster, run_operator
from support.prometheus import require_prometheus, run_prometheus
from support.server import Broken, ServerProcess, image_request, onnx_artifact_of
from support.waiting import wait_for

import kiln_artifacts as ka
from kiln_operator.builders import modeldeployment as b

D1 = "sha256:" + "a" * 64


def apply(cluster: Cluster, ns: str, *bodies: dict) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump_all(bodies))


def status(cluster: Cluster, ns: str, ref: str) -> dict:
    return cluster.get(ref, "-n", ns).get("status") or {}


def condition(st: dict, type_: str) -> dict:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})


def deployments(cluster: Cluster, ns: str, md: str) -> list[dict]:
    return cluster.get("deployments", "-n", ns, "-l", f"app.kubernetes.io/instance={md}")["items"]


def serving(name: str, **spec) -> dict:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "source": {"uri": "file:///models/sentiment", "digest": D1},
            "replicas": 2,
            "runtime": {"image": "kiln/server:test"},
            "resources": {"cpu": "1", "memory": "1Gi"},
            "podTemplate": {"spec": {"terminationGracePeriodSeconds": 1}},
            **spec,
        },
    }


def test_children_scale_autoscale_and_cleanup(cluster: Cluster, namespace: str, operator):
    apply(cluster, namespace, serving("sentiment"))
    st = wait_for(
        lambda: (s := status(cluster, namespace, "md/sentiment")).get("phase") == "Ready" and s, what="md Ready"
    )
    assert condition(st, "Ready")["status"] == "True"
    assert (st["replicas"], st["readyReplicas"]) == (2, 2)
    assert st["selector"] == "kiln.dev/modeldeployment=sentiment"
    assert st["url"] == f"http://sentiment.{namespace}.svc.cluster.local:8080"
    assert st["current"]["digest"] == D1
    assert st["current"]["revision"] == 1
    (dep,) = deployments(cluster, namespace, "sentiment")
    assert dep["metadata"]["name"] == "sentiment-aaaaaaaaaa"
    assert dep["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"
    pod = dep["spec"]["template"]["spec"]
    server = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["KILN_MODEL_URI"] == "file:///models/sentiment"
    assert env["KILN_MODEL_DIGEST"] == D1
    assert server["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert server["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["securityContext"]["runAsNonRoot"] is True
    svc = cluster.get("service", "sentiment", "-n", namespace)
    assert svc["spec"]["selector"] == {"kiln.dev/modeldeployment": "sentiment"}
    assert svc["spec"]["ports"][0]["port"] == 8080
    pdb = cluster.get("pdb", "sentiment", "-n", namespace)
    assert pdb["spec"]["maxUnavailable"] == 1

    # kubectl scale goes through the scale subresource to spec.replicas, then to the Deployment.
    cluster.kubectl("scale", "-n", namespace, "md/sentiment", "--replicas=3")
    wait_for(
        lambda: [d["spec"]["replicas"] for d in deployments(cluster, namespace, "sentiment")] == [3],
        what="Deployment scaled to 3",
    )
    wait_for(lambda: status(cluster, namespace, "md/sentiment").get("readyReplicas") == 3, what="3 ready")
    scale = json.loads(
        cluster.kubectl(
            "get", "--raw", f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/modeldeployments/sentiment/scale"
        ).stdout
    )
    assert scale["spec"]["replicas"] == 3
    assert scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == "kiln.dev/modeldeployment=sentiment"

    # Autoscaling: an HPA on the ModelDeployment's scale subresource, within the bounds.
    patch = {"spec": {"autoscaling": {"minReplicas": 1, "maxReplicas": 4, "metric": "CPU", "target": "70"}}}
    cluster.kubectl("patch", "-n", namespace, "md/sentiment", "--type=merge", "-p", json.dumps(patch))
    hpa = wait_for(
        lambda: (
            cluster.kubectl("get", "hpa", "sentiment", "-n", namespace, "-o", "json", check=False).returncode == 0
            and cluster.get("hpa", "sentiment", "-n", namespace)
        ),
        what="HPA",
    )
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "sentiment",
    }
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (1, 4)
    assert hpa["spec"]["metrics"][0]["resource"]["target"]["averageUtilization"] == 70
    cluster.kubectl(
        "patch", "-n", namespace, "md/sentiment", "--type=json", "-p", '[{"op":"remove","path":"/spec/autoscaling"}]'
    )
    wait_for(
        lambda: cluster.kubectl("get", "hpa", "sentiment", "-n", namespace, check=False).returncode != 0,
        what="HPA removed with autoscaling",
    )

    # Deleting the ModelDeployment deletes its children (owner references; the garbage collector).
    cluster.kubectl("delete", "-n", namespace, "md/sentiment", "--wait=true")
    wait_for(lambda: deployments(cluster, namespace, "sentiment") == [], what="Deployments collected")
    wait_for(
        lambda: cluster.kubectl("get", "service", "sentiment", "-n", namespace, check=False).returncode != 0,
        what="Service collected",
    )


def test_crash_looping_pods_make_it_degraded_not_ready(cluster: Cluster, namespace: str, operator):
    failing = {
        "metadata": {
            "annotations": {
                "kwok.kiln.dev/waiting-reason": "CrashLoopBackOff",
                "kwok.kiln.dev/last-exit-code": "10",  # ExitCode.ARTIFACT
                "kwok.kiln.dev/message": "artifact file model.onnx: sha256 mismatch",
            }
        },
        "spec": {"terminationGracePeriodSeconds": 1},
    }
    apply(cluster, namespace, serving("broken", podTemplate=failing))
    st = wait_for(
        lambda: (s := status(cluster, namespace, "md/broken")).get("phase") == "Degraded" and s, what="Degraded"
    )
    degraded = condition(st, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ModelLoadFailed")
    assert "sha256 mismatch" in degraded["message"]
    assert condition(st, "Ready")["status"] == "False"
    assert st["readyReplicas"] == 0
    out = cluster.kubectl("wait", "-n", namespace, "md/broken", "--for=condition=Ready=False", "--timeout=10s")
    assert "condition met" in out.stdout


def test_unschedulable_pods_are_reported_with_the_schedulers_reason(cluster: Cluster, namespace: str, operator):
    gpu = {"image": "kiln/server:test", "executionProvider": "CUDAExecutionProvider"}
    apply(cluster, namespace, serving("huge", runtime=gpu, resources={"gpus": 16}))
    st = wait_for(
        lambda: condition(s := status(cluster, namespace, "md/huge"), "Ready").get("reason") == "Unschedulable" and s,
        what="Unschedulable",
    )
    ready = condition(st, "Ready")
    assert ready["status"] == "False"
    assert "nvidia.com/gpu" in ready["message"]
    assert st["phase"] == "Pending"


def test_pinned_uri_source_is_served_as_given_and_a_change_rolls(cluster: Cluster, namespace: str, operator):
    apply(cluster, namespace, serving("pinned", replicas=1))
    wait_for(lambda: status(cluster, namespace, "md/pinned").get("phase") == "Ready", what="Ready")
    d2 = "sha256:" + "b" * 64
    patch = {"spec": {"source": {"uri": "file:///models/v2", "digest": d2}}}
    cluster.kubectl("patch", "-n", namespace, "md/pinned", "--type=merge", "-p", json.dumps(patch))
    # RollingUpdate: the new revision comes up beside the old one, then the old one goes.
    st = wait_for(
        lambda: (
            (s := status(cluster, namespace, "md/pinned")).get("current", {}).get("digest") == d2
            and [d["metadata"]["name"] for d in deployments(cluster, namespace, "pinned")] == ["pinned-bbbbbbbbbb"]
            and s
        ),
        what="revision 2 serving alone",
    )
    assert st["current"]["revision"] == 2
    assert [h["outcome"] for h in st["history"]][-2:] == ["Promoted", "Superseded"]


@pytest.fixture(scope="session")
def gateway_api(cluster: Cluster, crds: None) -> None:
    """The Gateway API's HTTPRoute CRD (the standard channel, from the Go module proxy)."""
    crd = subprocess.run([str(REPO / "hack/gateway-api.sh")], check=True, capture_output=True, text=True).stdout.strip()
    cluster.kubectl("apply", "--server-side", "-f", crd)
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", "-f", crd)


def test_gateway_route_gets_exact_canary_weights(cluster: Cluster, namespace: str, gateway_api: None, operator):
    gateway = {"parentRefs": [{"name": "public", "namespace": "gateways"}], "hostnames": ["digits.example.com"]}
    canary = {"strategy": "Canary", "steps": [{"weight": 10, "pauseSeconds": 0}, {"weight": 100}]}
    apply(cluster, namespace, serving("routed", service={"gateway": gateway}, rollout=canary))
    st = wait_for(lambda: (s := status(cluster, namespace, "md/routed")).get("phase") == "Ready" and s, what="Ready")
    assert st["routeUrl"] == "http://digits.example.com"

    def weights() -> dict[str, int]:
        found = cluster.kubectl("get", "httproute", "routed", "-n", namespace, "-o", "json", check=False)
        if found.returncode:
            return {}
        route = json.loads(found.stdout)
        return {b["name"]: b["weight"] for b in route["spec"]["rules"][0]["backendRefs"]}

    assert wait_for(weights, what="route") == {"routed-aaaaaaaaaa": 100}
    d2 = "sha256:" + "c" * 64
    patch = {"spec": {"source": {"uri": "file:///models/v2", "digest": d2}}}
    cluster.kubectl("patch", "-n", namespace, "md/routed", "--type=merge", "-p", json.dumps(patch))
    # 2 replicas: by replica ratio a 10% step would be 1 pod in 3; on the route it is exactly 10%.
    wait_for(lambda: weights() == {"routed-aaaaaaaaaa": 90, "routed-cccccccccc": 10}, what="10% on the route")
    assert status(cluster, namespace, "md/routed")["canaryWeight"] == 10
    svc = cluster.get("service", "routed-cccccccccc", "-n", namespace)
    assert svc["spec"]["selector"] == {"kiln.dev/modeldeployment": "routed", "kiln.dev/revision": "cccccccccc"}
    route = cluster.get("httproute", "routed", "-n", namespace)
    assert route["spec"]["parentRefs"][0]["name"] == "public"
    assert route["spec"]["hostnames"] == ["digits.example.com"]
    assert route["metadata"]["ownerReferences"][0]["name"] == "routed"


def test_canary_without_prometheus_waits_when_its_pods_cannot_be_scraped(cluster: Cluster, namespace: str, operator):
    """Without Prometheus the analysis scrapes the pods directly. Simulated pods have addresses that are unreachable
    on this machine: the verdict is Unavailable at once, with the reason, and the canary holds its step."""
    canary = {
        "strategy": "Canary",
        "steps": [{"weight": 50, "pauseSeconds": 0}, {"weight": 100}],
        "analysis": {"intervalSeconds": 5, "minRequests": 1},
    }
    apply(cluster, namespace, serving("unscraped", rollout=canary))
    wait_for(lambda: status(cluster, namespace, "md/unscraped").get("phase") == "Ready", what="Ready")
    patch = {"spec": {"source": {"uri": "file:///models/v2", "digest": "sha256:" + "d" * 64}}}
    cluster.kubectl("patch", "-n", namespace, "md/unscraped", "--type=merge", "-p", json.dumps(patch))
    st = wait_for(
        lambda: (
            (s := status(cluster, namespace, "md/unscraped")).get("analysis", {}).get("verdict") == "Unavailable" and s
        ),
        what="an Unavailable analysis",
        timeout=90,
    )
    assert "No route to host" in st["analysis"]["message"], st["analysis"]
    assert st["candidate"]["digest"] == "sha256:" + "d" * 64
    assert st["canaryWeight"] == 50
    assert condition(st, "RolledBack").get("status") != "True"


# ---------------------------------------------------------------- canary on real metrics


def image_model(root: Path, seed: int | None) -> ka.Artifact:
    import torch

    from kiln_artifacts.models import KilnCNN

    root.mkdir(parents=True)
    torch.manual_seed(seed or 0)
    model = Broken.build() if seed is None else KilnCNN(10).eval()
    uri, _ = onnx_artifact_of(str(root), model)
    return ka.load(uri)


class Load:
    """Steady load on every server, as clients of the revisions in service would send it: one thread each."""

    def __init__(self, servers: list[ServerProcess]) -> None:
        self.servers, self.stop = servers, threading.Event()
        self.codes: dict[int, dict[int, int]] = {s.port: {} for s in servers}
        self.threads = [threading.Thread(target=self.run, args=(s,), daemon=True) for s in servers]

    def run(self, server: ServerProcess) -> None:
        rng = np.random.default_rng(server.port)
        while not self.stop.is_set():
            doc = image_request(rng.random((1, 1, 8, 8), dtype=np.float32) + 0.1)
            try:
                code = server.infer(doc)[0]
            except OSError:
                code = -1
            self.codes[server.port][code] = self.codes[server.port].get(code, 0) + 1
            self.stop.wait(0.02)

    def __enter__(self) -> Load:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[tuple[list[ka.Artifact], list[ServerProcess]]]:
    artifacts = [image_model(tmp_path / f"m{i}", seed) for i, seed in enumerate((0, 1, None))]
    procs = [ServerProcess(tmp_path, a.uri, name="digits").start() for a in artifacts]
    try:
        for p in procs:
            p.wait_ready()
        yield artifacts, procs
    finally:
        for p in procs:
            p.kill()


def compressor_message(candidate: ka.Artifact) -> str:
    gate = {"name": "maxAccuracyDrop", "passed": True, "value": 0.0, "threshold": 0.01}
    return json.dumps(
        {
            "exitCode": 0,
            "reason": "Succeeded",
            "artifact": {"uri": candidate.uri, "digest": candidate.digest},
            "gatesPassed": True,
            "candidate": "int8-dynamic",
            "report": {"sizeRatio": 0.3, "accuracyDrop": 0.0, "gates": [gate]},
        }
    )


def compression(source: ka.Artifact, candidate: ka.Artifact) -> dict:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelCompression",
        "metadata": {"name": "digits-int8"},
        "spec": {
            "image": "kiln/compressor:test",
            "source": {"uri": source.uri, "digest": source.digest},
            "recipe": {"steps": [{"export": {}}, {"quantize": {"mode": "Dynamic"}}]},
            "evaluation": {"dataset": {"uri": "file:///data/digits"}},
            "gates": {"maxAccuracyDrop": 0.01},
            "podTemplate": {
                "metadata": {
                    "annotations": {
                        "kwok.kiln.dev/run-for": "1s",
                        "kwok.kiln.dev/message": compressor_message(candidate),
                    }
                },
                "spec": {"terminationGracePeriodSeconds": 1},
            },
        },
    }


def recompress(cluster: Cluster, ns: str, source: ka.Artifact, candidate: ka.Artifact) -> None:
    cluster.kubectl("delete", "-n", ns, "mc/digits-int8", "--wait=true")
    apply(cluster, ns, compression(source, candidate))


def test_canary_follows_promotions_promotes_on_good_metrics_and_rolls_back_on_bad(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path, servers, monkeypatch
):
    require_prometheus()
    (v1, v2, bad), procs = servers
    # The model bytes each compression starts from (they only have to exist and differ).
    sources = []
    for i in range(3):
        folder = tmp_path / f"src{i}"
        folder.mkdir()
        (folder / "model.bin").write_bytes(b"weights %d" % i * 100)
        sources.append(ka.publish(folder, f"file://{tmp_path}/sources/{i}", format="hf-transformers"))
    labels = {"namespace": namespace, "kiln_dev_modeldeployment": "digits"}
    targets = [
        (f"127.0.0.1:{p.metrics_port}", {**labels, "kiln_dev_revision": a.digest[7:17]})
        for a, p in zip((v1, v2, bad), procs, strict=True)
    ]
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", f"file://{store}")
    with run_prometheus(tmp_path, targets) as prometheus, Load(procs) as load:
        monkeypatch.setenv("KILN_PROMETHEUS_URL", prometheus)
        with run_operator(f"--namespace={namespace}"):
            apply(cluster, namespace, compression(sources[0], v1))
            md = serving(
                "digits",
                source={"modelCompressionRef": {"name": "digits-int8"}},
                rollout={
                    "strategy": "Canary",
                    "steps": [{"weight": 50, "pauseSeconds": 0}, {"weight": 100, "pauseSeconds": 0}],
                    "analysis": {"intervalSeconds": 5, "minRequests": 20, "maxErrorRate": 0.05},
                },
            )
            apply(cluster, namespace, md)
            st = wait_for(
                lambda: (
                    (s := status(cluster, namespace, "md/digits")).get("phase") == "Ready"
                    and s.get("current", {}).get("digest") == v1.digest
                    and s
                ),
                what="revision 1 (v1) Ready",
                timeout=90,
            )
            # v2 promoted by the compression (spec.source is immutable: the compression is made anew from another
            # model): a canary starts without any change to the ModelDeployment.
            recompress(cluster, namespace, sources[1], v2)
            wait_for(
                lambda: status(cluster, namespace, "md/digits").get("candidate", {}).get("digest") == v2.digest,
                what="canary of v2",
                timeout=90,
            )
            st = wait_for(
                lambda: (
                    (s := status(cluster, namespace, "md/digits")).get("current", {}).get("digest") == v2.digest and s
                ),
                what="v2 promoted",
                timeout=120,
            )
            assert st["history"][-2]["outcome"] == "Promoted"
            assert st["history"][-2]["digest"] == v2.digest
            assert st["analysis"]["verdict"] == "Pass"
            assert st["analysis"]["candidate"]["requests"] >= 20
            assert st["analysis"]["candidate"]["errorRate"] == 0
            assert [d["metadata"]["name"] for d in deployments(cluster, namespace, "digits")] == [
                f"digits-{v2.digest[7:17]}"
            ]
            # The broken model: promoted by the compression, rolled back by the analysis within an interval or so.
            recompress(cluster, namespace, sources[2], bad)
            st = wait_for(
                lambda: (
                    condition(s := status(cluster, namespace, "md/digits"), "RolledBack").get("status") == "True" and s
                ),
                what="rolled back",
                timeout=120,
            )
            rolled = condition(st, "RolledBack")
            assert rolled["reason"] == "AnalysisFailed", rolled
            assert "maxErrorRate 0.05" in rolled["message"]
            assert st["current"]["digest"] == v2.digest
            assert [r["digest"] for r in st["rejected"]] == [bad.digest]
            # Not retried: the next passes see the same promoted digest and leave it rejected.
            st = wait_for(
                lambda: (
                    "not retried" in condition(s := status(cluster, namespace, "md/digits"), "RolledBack")["message"]
                    and s
                ),
                what="bad digest rejected, not retried",
            )
            assert [d["metadata"]["name"] for d in deployments(cluster, namespace, "digits")] == [
                f"digits-{v2.digest[7:17]}"
            ]
            reasons = {e["reason"] for e in cluster.get("events", "-n", namespace)["items"]}
            assert {"RolloutStarted", "Promoted", "RolledBack"} <= reasons
            # Pinned to v2: the compression promoting another digest changes nothing.
            pin = {"spec": {"source": {"modelCompressionRef": {"name": "digits-int8"}, "digest": v2.digest}}}
            cluster.kubectl("patch", "-n", namespace, "md/digits", "--type=merge", "-p", json.dumps(pin))
            st = wait_for(
                lambda: (s := status(cluster, namespace, "md/digits")).get("observedGeneration") == 2 and s,
                what="pin observed",
            )
            assert condition(st, "SourceReady")["message"] == f"pinned to {v2.digest}"
            assert st["current"]["digest"] == v2.digest
            assert "candidate" not in st
    # The servers really saw the traffic the analysis judged: good ones only 200s, the broken one 500s.
    assert set(load.codes[procs[1].port]) == {200}
    assert load.codes[procs[2].port].get(500, 0) > 0


def test_manual_step_approved_while_the_operator_is_down_completes_after_restart(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path, monkeypatch
):
    """The rollout state lives on the revisions' Deployments: a new operator process (empty memory) picks the
    canary up where the old one left it, and a person's approval given meanwhile takes effect."""
    require_prometheus()
    d2 = "sha256:" + "d" * 64
    canary = {
        "strategy": "Canary",
        "steps": [{"weight": 50, "pauseSeconds": 0}, {"weight": 100}],
        # No traffic to these kwok pods: an empty window passes when no minimum is asked for.
        "analysis": {"intervalSeconds": 5, "minRequests": 0},
    }
    with run_prometheus(tmp_path, []) as prometheus:
        monkeypatch.setenv("KILN_PROMETHEUS_URL", prometheus)
        with run_operator(f"--namespace={namespace}"):
            apply(cluster, namespace, serving("manual", rollout=canary))
            wait_for(lambda: status(cluster, namespace, "md/manual").get("phase") == "Ready", what="v1 Ready")
            patch = {"spec": {"source": {"uri": "file:///models/v2", "digest": d2}}}
            cluster.kubectl("patch", "-n", namespace, "md/manual", "--type=merge", "-p", json.dumps(patch))
            st = wait_for(
                lambda: (
                    condition(s := status(cluster, namespace, "md/manual"), "Progressing").get("reason")
                    == "AwaitingApproval"
                    and s
                ),
                what="step 1 awaiting approval",
                timeout=90,
            )
            assert st["canaryStep"] == 1
            assert f"kiln.dev/approve={d2[7:19]}/1" in condition(st, "Progressing")["message"]
        # The operator is gone; a person approves step 1.
        cluster.kubectl("annotate", "-n", namespace, "md/manual", f"kiln.dev/approve={d2[7:19]}/1")
        with run_operator(f"--namespace={namespace}"):
            st = wait_for(
                lambda: (
                    (s := status(cluster, namespace, "md/manual")).get("current", {}).get("digest") == d2
                    and s.get("phase") == "Ready"
                    and s
                ),
                what="v2 promoted after the restart",
                timeout=60,
            )
    assert [h["outcome"] for h in st["history"]].count("Promoted") == 1
    assert [d["metadata"]["name"] for d in deployments(cluster, namespace, "manual")] == ["manual-dddddddddd"]


def can_i(cluster: Cluster, who: str, *args: str) -> bool:
    out = cluster.kubectl("auth", "can-i", *args, f"--as={who}", check=False)
    assert out.stdout.strip() in ("yes", "no"), out.stderr
    return out.stdout.strip() == "yes"


def exists(cluster: Cluster, *ref: str) -> bool:
    return cluster.kubectl("get", *ref, "-o", "name", check=False).returncode == 0


def test_auth_gives_the_servers_an_identity_that_can_ask_exactly_two_questions(
    cluster: Cluster, namespace: str, operator
):
    cluster.kubectl("apply", "-k", str(REPO / "manifests/server-roles"))
    apply(cluster, namespace, serving("secure", service={"auth": "Kubernetes"}))
    account = f"system:serviceaccount:{namespace}:secure-server"
    binding = f"clusterrolebinding/{b.token_review_binding_name(namespace, 'secure')}"
    children = [
        ("serviceaccount/secure-server", "-n", namespace),
        ("rolebinding/secure-server-access-review", "-n", namespace),
        (binding,),
    ]
    wait_for(lambda: all(exists(cluster, *c) for c in children), what="the servers' identity and its bindings")
    (dep,) = deployments(cluster, namespace, "secure")
    pod = dep["spec"]["template"]["spec"]
    assert (pod["serviceAccountName"], pod["automountServiceAccountToken"]) == ("secure-server", True)
    # What RBAC really lets that identity do: the two reviews, in its own namespace only, and nothing else.
    assert can_i(cluster, account, "create", "tokenreviews.authentication.k8s.io")
    assert can_i(cluster, account, "create", "localsubjectaccessreviews.authorization.k8s.io", "-n", namespace)
    assert not can_i(cluster, account, "create", "localsubjectaccessreviews.authorization.k8s.io", "-n", "default")
    assert not can_i(cluster, account, "create", "subjectaccessreviews.authorization.k8s.io")
    for denied in (("get", "secrets"), ("list", "pods"), ("get", "modeldeployments.kiln.dev")):
        assert not can_i(cluster, account, *denied, "-n", namespace), denied
    # The API server took the NetworkPolicy as built: serving ports from this namespace, metrics from the scrapers.
    policy = cluster.get("networkpolicy/secure", "-n", namespace)
    serving_rule, metrics_rule = policy["spec"]["ingress"]
    assert serving_rule["from"] == [{"podSelector": {}}]
    assert {p["port"] for p in metrics_rule["ports"]} == {"metrics"}
    assert policy["metadata"]["ownerReferences"][0]["kind"] == "ModelDeployment"

    # Auth switched off: the identity and its grants go (the ClusterRoleBinding too, which nothing owns).
    cluster.kubectl("patch", "-n", namespace, "md/secure", "--type=merge", "-p", '{"spec":{"service":{"auth":"None"}}}')
    wait_for(lambda: not any(exists(cluster, *c) for c in children), what="the servers' identity removed")
    wait_for(
        lambda: (
            deployments(cluster, namespace, "secure")[0]["spec"]["template"]["spec"].get("serviceAccountName") is None
        ),
        what="the pods without the identity",
    )
    # On again, then the ModelDeployment deleted: its cluster-scoped binding is swept at once.
    cluster.kubectl(
        "patch", "-n", namespace, "md/secure", "--type=merge", "-p", '{"spec":{"service":{"auth":"Kubernetes"}}}'
    )
    wait_for(lambda: exists(cluster, binding), what="the binding back")
    cluster.kubectl("delete", "-n", namespace, "md/secure")
    wait_for(lambda: not exists(cluster, binding), what="the ClusterRoleBinding swept with its ModelDeployment")
