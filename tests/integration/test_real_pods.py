"""Real pods: Kiln's four images, built here (hack/images.sh), run by a real kubelet and containerd on the real node
(hack/real-node.sh) beside the simulated ones, under the restricted Pod Security profile. What kwok cannot show is
checked here: the image really starting as uid 65532 on a read-only root filesystem, volumes from the default
StorageClass, the environment contract, exit codes and termination messages reaching pod status, probes, Service
routing through kube-proxy, cluster DNS, the operator's in-cluster login, and each workload doing its job in
miniature (the trainer trains and publishes to pvc://, the compressor exports and quantises that, the server
serves it behind its Service)."""

from __future__ import annotations

import json
import os
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from support.cluster import IMAGES, PERMISSION_ERROR, REAL_NODE, REPO, RESTRICTED, Cluster, run_operator
from support.waiting import wait_for

import kiln_artifacts as ka
from kiln_artifacts import samples
from kiln_artifacts.k8s import pvc_volume

POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": 65532,
    "runAsGroup": 65532,
    "fsGroup": 65532,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in (obj.get("status") or {}).get("conditions", []) if c["type"] == type_), {})


def status(cluster: Cluster, ns: str, ref: str) -> dict:
    return cluster.get(ref, "-n", ns).get("status") or {}


def apply(cluster: Cluster, ns: str, *bodies: dict) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump_all(bodies))


@pytest.fixture(scope="module")
def real_node(cluster: Cluster) -> dict:
    return cluster.real_node()


@pytest.fixture
def real_namespace(cluster: Cluster, real_node: dict, request: pytest.FixtureRequest) -> Iterator[str]:
    """A namespace whose pods run for real, under the restricted Pod Security Standard (enforced)."""
    name = f"r-{request.node.name[5:30].lower().replace('_', '-').strip('-')}-{uuid.uuid4().hex[:6]}"
    cluster.create_namespace(name, simulated=False, labels=RESTRICTED)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def job(name: str, image: str, script: str, **pod: Any) -> dict:
    """A one-pod Job running `python -c script` in `image`, hardened as every Kiln workload is."""
    container = {
        "name": "main",
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["python", "-c", script],
        "securityContext": CONTAINER_SECURITY,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}, *pod.pop("mounts", [])],
        "env": pod.pop("env", []),
        "resources": {"requests": {"cpu": "100m", "memory": "128Mi"}, "limits": {"memory": "1Gi"}},
    }
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {
                "spec": {
                    "restartPolicy": "Never",
                    "automountServiceAccountToken": pod.pop("token", False),
                    "enableServiceLinks": False,
                    "securityContext": POD_SECURITY,
                    "containers": [container],
                    "volumes": [{"name": "tmp", "emptyDir": {}}, *pod.pop("volumes", [])],
                    "terminationGracePeriodSeconds": 5,
                    **pod,
                }
            },
        },
    }


def finished_pod(cluster: Cluster, ns: str, job_name: str, timeout: float = 120) -> dict:
    def done() -> dict | None:
        pods = cluster.get("pods", "-n", ns, "-l", f"batch.kubernetes.io/job-name={job_name}")["items"]
        return next((p for p in pods if p["status"].get("phase") in ("Succeeded", "Failed")), None)

    return wait_for(done, what=f"pod of Job {job_name} finished", timeout=timeout)


def terminated(pod: dict) -> dict:
    return pod["status"]["containerStatuses"][0]["state"]["terminated"]


def test_the_real_node_runs_beside_the_simulated_ones(cluster: Cluster, real_node: dict):
    pins = dict(line.split("=", 1) for line in (REPO / "hack/versions.env").read_text().splitlines() if "=" in line)
    assert condition(real_node, "Ready")["status"] == "True"
    info = real_node["status"]["nodeInfo"]
    assert info["kubeletVersion"] == f"v{pins['K8S_VERSION']}"
    assert info["containerRuntimeVersion"] == f"containerd://{pins['CONTAINERD_VERSION']}"
    assert real_node["metadata"]["labels"]["kiln.dev/node-kind"] == "real"
    assert not real_node["spec"].get("taints")
    # Its kubelet, not kwok, holds its lease and reports its capacity (this machine's cores).
    lease = cluster.get("lease", REAL_NODE, "-n", "kube-node-lease")
    assert lease["spec"]["holderIdentity"] == REAL_NODE
    assert int(real_node["status"]["capacity"]["cpu"]) == os.cpu_count()
    # The images built here are in its runtime, under the names pods use.
    names = {n for image in real_node["status"].get("images", []) for n in image.get("names") or []}
    for image in IMAGES.values():
        assert f"docker.io/{image}" in names, sorted(names)
    for node in cluster.get("nodes", "-l", "type=kwok")["items"]:
        assert node["status"]["nodeInfo"]["kubeletVersion"].startswith("kwok-")
        assert condition(node, "Ready")["status"] == "True"


IDENTITY = r"""
import errno, getpass, json, os, sys
found = {"uid": os.getuid(), "gid": os.getgid(), "user": getpass.getuser(), "groups": os.getgroups()}
try:
    open("/etc/kiln-was-here", "w")
except OSError as e:
    found["rootfs"] = errno.errorcode[e.errno]
open("/tmp/scratch", "w").write("ok")
found["tmp"] = open("/tmp/scratch").read()
found["caps"] = [l.split()[1] for l in open("/proc/self/status") if l.startswith("CapEff")][0]
open("/dev/termination-log", "w").write(json.dumps(found))
sys.exit(3)
"""


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_each_image_starts_restricted_as_65532_and_its_exit_reaches_pod_status(
    cluster: Cluster, real_namespace: str, name: str
):
    apply(cluster, real_namespace, job("identity", IMAGES[name], IDENTITY))
    pod = finished_pod(cluster, real_namespace, "identity")
    assert pod["spec"]["nodeName"] == REAL_NODE
    assert pod["status"]["phase"] == "Failed"
    state = terminated(pod)
    assert state["exitCode"] == 3
    found = json.loads(state["message"])
    assert (found["uid"], found["gid"]) == (65532, 65532)
    assert found["user"]  # a passwd entry for 65532: libraries that ask for the user name work
    assert found["rootfs"] == "EROFS"
    assert found["tmp"] == "ok"
    assert int(found["caps"], 16) == 0


NETWORK = r"""
import json, socket, ssl, sys, urllib.request
ns = sys.argv[1]
found = {}
for name in ("kubernetes.default.svc.cluster.local", f"echo.{ns}.svc.cluster.local", "echo", "pypi.org"):
    try:
        found[name] = socket.gethostbyname(name)
    except OSError as e:
        found[name] = f"error: {e}"
sa = "/var/run/secrets/kubernetes.io/serviceaccount"
context = ssl.create_default_context(cafile=f"{sa}/ca.crt")
request = urllib.request.Request("https://kubernetes.default.svc/version")
request.add_header("Authorization", "Bearer " + open(f"{sa}/token").read())
found["version"] = json.load(urllib.request.urlopen(request, context=context, timeout=10))["gitVersion"]
found["http"] = urllib.request.urlopen(f"http://echo.{ns}.svc.cluster.local:8080/", timeout=10).read().decode()
open("/dev/termination-log", "w").write(json.dumps(found))
"""

ECHO = r"""
import http.server, socket
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = socket.gethostname().encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
"""


def test_pods_resolve_cluster_names_reach_services_and_the_api_over_tls(cluster: Cluster, real_namespace: str):
    ns = real_namespace
    echo = job("echo", IMAGES["operator"], ECHO)["spec"]["template"]
    echo["metadata"] = {"labels": {"app": "echo"}}
    echo["spec"]["restartPolicy"] = "Always"
    echo["spec"]["containers"][0]["readinessProbe"] = {"httpGet": {"path": "/", "port": 8080}, "periodSeconds": 1}
    service = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": "echo"},
        "spec": {"selector": {"app": "echo"}, "ports": [{"port": 8080}]},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "echo"},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "echo"}}, "template": echo},
    }
    apply(cluster, ns, service, deployment)
    cluster.kubectl("rollout", "status", "-n", ns, "deployment/echo", "--timeout=120s")
    # Host to ClusterIP, through kube-proxy's rules.
    ip = cluster.get("service", "echo", "-n", ns)["spec"]["clusterIP"]
    echo_pod = cluster.get("pods", "-n", ns, "-l", "app=echo")["items"][0]["metadata"]["name"]
    wait_for(
        lambda: _get(f"http://{ip}:8080/") == echo_pod,
        what="the echo Service answering on its ClusterIP from this machine",
        timeout=60,
    )
    probe = job("probe", IMAGES["operator"], NETWORK, token=True)
    probe["spec"]["template"]["spec"]["containers"][0]["command"] = ["python", "-c", NETWORK, ns]
    apply(cluster, ns, probe)
    pod = finished_pod(cluster, ns, "probe")
    state = terminated(pod)
    assert state["exitCode"] == 0, state
    found = json.loads(state["message"])
    kubernetes_ip = cluster.get("service", "kubernetes", "-n", "default")["spec"]["clusterIP"]
    assert found["kubernetes.default.svc.cluster.local"] == kubernetes_ip
    assert found[f"echo.{ns}.svc.cluster.local"] == ip
    assert found["echo"] == ip  # the search path of the pod's namespace
    assert found["pypi.org"].startswith("error"), "a name outside the cluster must not resolve from a pod"
    assert found["version"] == json.loads(cluster.kubectl("get", "--raw", "/version").stdout)["gitVersion"]
    assert found["http"] == echo_pod  # pod -> Service name -> ClusterIP -> the echo pod


def _get(url: str) -> str | None:
    try:
        return urllib.request.urlopen(url, timeout=5).read().decode()
    except OSError:
        return None


def test_the_operator_runs_in_the_cluster_as_installed(cluster: Cluster, crds: None, real_namespace: str):
    """The Deployment of manifests/, from the image built here: it logs in with its ServiceAccount token through
    the `kubernetes` Service (cluster DNS, verified TLS) and reconciles; no permission is missing."""
    rendered = [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / "manifests")).stdout) if d]
    deployment = next(d for d in rendered if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == IMAGES["operator"]
    # Only this test's namespace: the other tests run their own operator in theirs.
    container["args"] = [a for a in container["args"] if a != "--all-namespaces"] + [f"--namespace={real_namespace}"]
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rendered))
    try:
        cluster.kubectl("rollout", "status", "-n", "kiln-system", "deployment/kiln-operator", "--timeout=180s")
        (pod,) = cluster.get("pods", "-n", "kiln-system", "-l", "app.kubernetes.io/name=kiln-operator")["items"]
        assert pod["spec"]["nodeName"] == REAL_NODE
        assert cluster.get("namespace", "kiln-system")["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == (
            "restricted"
        )
        body = {
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "held"},
            "spec": {"image": IMAGES["trainer"], "dataset": {"uri": "pvc://data/digits"}, "suspend": True},
        }
        apply(cluster, real_namespace, body)
        st = wait_for(
            lambda: (s := status(cluster, real_namespace, "tj/held")).get("observedGeneration") == 1 and s,
            what="the TrainingJob reconciled by the operator's pod",
            timeout=120,
        )
        assert st["phase"] == "Suspended", st
        (child,) = cluster.get("jobs", "-n", real_namespace, "-l", "kiln.dev/trainingjob=held")["items"]
        assert child["spec"]["suspend"] is True
        logs = cluster.kubectl("logs", "-n", "kiln-system", pod["metadata"]["name"]).stdout
        assert not PERMISSION_ERROR.search(logs), logs[-3000:]
        assert "Traceback" not in logs, logs[-3000:]
        assert pod["status"]["containerStatuses"][0]["restartCount"] == 0
    finally:
        cluster.kubectl("delete", "-n", "kiln-system", "deployment/kiln-operator", "--wait=true", check=False)


def host_path_of(cluster: Cluster, ns: str, claim: str) -> Path:
    """Where the default StorageClass put a bound claim's volume on this machine."""
    volume = wait_for(
        lambda: (pvc := cluster.get("pvc", claim, "-n", ns))["status"].get("phase") == "Bound" and pvc["spec"],
        what=f"claim {claim} bound",
    )["volumeName"]
    spec = cluster.get("pv", volume)["spec"]
    return Path((spec.get("hostPath") or spec["local"])["path"])


def test_trainer_compressor_and_server_run_for_real_on_a_pvc(
    cluster: Cluster, crds: None, real_namespace: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The pipeline in miniature, every step in its own image on the real node, all artifacts on one claim of the
    default StorageClass: the packaged digits published as a dataset by a Job, a TrainingJob trains and publishes,
    a ModelCompression exports and quantises that, a ModelDeployment serves the promoted model behind its Service."""
    ns = real_namespace
    claim = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "store"},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": "1Gi"}}},
    }
    mount = pvc_volume("pvc://store/datasets", read_only=False)
    publish = job(
        "publish-digits",
        IMAGES["trainer"],
        "from kiln_artifacts import samples; print(samples.publish_dataset('digits', 'pvc://store/datasets/digits'))",
        mounts=[mount["volumeMount"]],
        volumes=[mount["volume"]],
        env=mount["env"],
    )
    apply(cluster, ns, claim, publish)
    pod = finished_pod(cluster, ns, "publish-digits", timeout=180)
    assert pod["status"]["phase"] == "Succeeded", cluster.kubectl("logs", "-n", ns, pod["metadata"]["name"]).stdout
    # The operator, in this process, reaches the same store as the pods: the claim's volume on this machine.
    pvc_root = tmp_path / "pvc"
    pvc_root.mkdir()
    (pvc_root / "store").symlink_to(host_path_of(cluster, ns, "store"))
    monkeypatch.setenv("KILN_PVC_ROOT", str(pvc_root))
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", "pvc://store/artifacts")
    dataset = ka.load("pvc://store/datasets/digits")
    assert dataset.manifest.kind == "dataset"
    small = {"cpu": "1", "memory": "2Gi"}
    training = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "digits"},
        "spec": {
            "image": IMAGES["trainer"],
            "dataset": {"uri": "pvc://store/datasets/digits"},
            "hyperparameters": {"learningRate": 0.003, "batchSize": 32, "maxSteps": 40, "precision": "fp32"},
            "checkpoint": {"everySteps": 20, "keep": 1},
            "resources": small,
        },
    }
    compression = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelCompression",
        "metadata": {"name": "digits-int8"},
        "spec": {
            "source": {"trainingJobRef": {"name": "digits"}},
            "image": IMAGES["compressor"],
            "target": {"device": "cpu", "executionProvider": "CPUExecutionProvider", "precision": "int8"},
            "recipe": {"steps": [{"export": {}}, {"optimize": {}}, {"quantize": {"mode": "Dynamic"}}]},
            "evaluation": {"dataset": {"uri": "pvc://store/datasets/digits"}},
            "benchmark": {"batchSizes": [1], "iterations": 10, "warmup": 2},
            "gates": {"maxAccuracyDrop": 0.1},
            "resources": small,
        },
    }
    serving = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "digits"},
        "spec": {
            "source": {"modelCompressionRef": {"name": "digits-int8"}},
            "replicas": 1,
            "runtime": {"image": IMAGES["server"]},
            "resources": {"cpu": "500m", "memory": "1Gi"},
        },
    }
    with run_operator(f"--namespace={ns}"):
        apply(cluster, ns, training, compression, serving)
        st = wait_for(
            lambda: (s := status(cluster, ns, "tj/digits")).get("phase") in ("Succeeded", "Failed") and s,
            what="the TrainingJob finished",
            timeout=300,
        )
        assert st["phase"] == "Succeeded", st
        trained = ka.load(st["artifact"]["uri"])
        assert trained.digest == st["artifact"]["digest"]  # what the trainer's termination message said
        assert trained.manifest.lineage.dataset.revision == dataset.digest
        st = wait_for(
            lambda: (
                (s := status(cluster, ns, "mc/digits-int8")).get("phase") in ("Promoted", "Rejected", "Failed") and s
            ),
            what="the ModelCompression decided",
            timeout=420,
        )
        assert st["phase"] == "Promoted", st
        assert st["sourceArtifact"]["digest"] == trained.digest
        report = st["report"]
        assert 0 < report["sizeRatio"] < 1, report
        candidate = ka.load(st["promoted"]["uri"])
        assert candidate.digest == st["promoted"]["digest"]
        assert candidate.manifest.format == "onnx"
        st = wait_for(
            lambda: (s := status(cluster, ns, "md/digits")).get("phase") == "Ready" and s,
            what="the ModelDeployment Ready",
            timeout=240,
        )
        assert st["current"]["digest"] == candidate.digest
        (server,) = cluster.get("pods", "-n", ns, "-l", "kiln.dev/modeldeployment=digits")["items"]
        assert server["spec"]["nodeName"] == REAL_NODE
        service = cluster.get("service", "digits", "-n", ns)["spec"]
        port = next(p["port"] for p in service["ports"] if p["name"] == "http")
        pixels = np.stack([samples.load_idx_dataset(dataset.root, "test")[0][i] for i in range(4)])
        request = {
            "inputs": [
                {
                    "name": "pixel_values",
                    "datatype": "FP32",
                    "shape": [4, 1, 8, 8],
                    "data": (pixels.astype(np.float32) / 127.5 - 1).ravel().tolist(),
                }
            ]
        }
        answer = wait_for(
            lambda: _post(f"http://{service['clusterIP']}:{port}/v2/models/digits/infer", request),
            what="an answer through the Service",
            timeout=60,
        )
        outputs = {o["name"]: o for o in answer["outputs"]}
        output = outputs["logits"]
        assert output["shape"] == [4, 10], sorted(outputs)
        logits = np.array(output["data"]).reshape(4, 10)
        labels = samples.load_idx_dataset(dataset.root, "test")[1][:4]
        assert (logits.argmax(1) == np.array(labels)).sum() >= 2, (logits.argmax(1), labels)


def test_broken_pods_show_the_kubelets_reason(cluster: Cluster, crds: None, real_namespace: str):
    """An image that does not exist here (the node never tries a registry off this machine) and a model that does
    not load: the controllers report what the real kubelet and the server said."""
    ns = real_namespace
    missing = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "no-image"},
        "spec": {"image": "kiln/trainer:does-not-exist", "dataset": {"uri": "file:///data"}},
    }
    unloadable = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "unloadable"},
        "spec": {
            "source": {"uri": "file:///nonexistent/model", "digest": "sha256:" + "e" * 64},
            "replicas": 1,
            "runtime": {"image": IMAGES["server"]},
            "resources": {"cpu": "100m", "memory": "512Mi"},
            "podTemplate": {"spec": {"terminationGracePeriodSeconds": 1}},
        },
    }
    with run_operator(f"--namespace={ns}"):
        apply(cluster, ns, missing, unloadable)
        st = wait_for(
            lambda: (
                condition(s := {"status": status(cluster, ns, "tj/no-image")}, "Ready").get("reason")
                in ("ErrImagePull", "ImagePullBackOff")
                and s["status"]
            ),
            what="the image pull failure reported",
            timeout=120,
        )
        assert "does-not-exist" in condition({"status": st}, "Ready")["message"]
        st = wait_for(
            lambda: (s := status(cluster, ns, "md/unloadable")).get("phase") == "Degraded" and s,
            what="Degraded",
            timeout=180,
        )
        degraded = condition({"status": st}, "Degraded")
        assert degraded["status"] == "True"
        assert "/nonexistent/model" in degraded["message"], degraded


def _post(url: str, body: dict) -> dict | None:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        return json.loads(urllib.request.urlopen(request, timeout=10).read())
    except OSError:
        return None
