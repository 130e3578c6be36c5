"""The pipeline end to end, as a user runs it: the operator installed from manifests/overlays/local (its pod, its
ServiceAccount, the shared artifact store), then one `kubectl apply` of manifests/overlays/local-samples into a
namespace whose pods run for real on the real node. The digits are published by the sample's own Job, a
TrainingJob trains, a ModelCompression exports, quantises, measures and promotes, a ModelDeployment serves it
behind its Service; the answers are checked against the promoted ONNX model run here, and the lineage back to the
training run and its data. The failure drills happen to real processes: the operator's pod deleted mid-pipeline, a
trainer pod deleted mid-run (a real SIGTERM), a serving pod deleted and evicted under load.

Every wait is on a condition with a deadline; a timeout prints the Kiln objects' conditions and their pods' logs."""

from __future__ import annotations

import base64
import copy
import http.client
import json
import shutil
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, TypeVar
from urllib.parse import urlencode

import numpy as np
import pytest
import tritonclient.grpc as tg
import yaml
from support.cluster import PERMISSION_ERROR, REAL_NODE, REPO, RESTRICTED, Cluster
from support.dashboards import check_queries, panel_queries, write_rule_file
from support.pki import make_ca, make_leaf
from support.prometheus import require_prometheus, run_prometheus
from support.server import Broken, onnx_artifact_of
from support.waiting import wait_for
from tritonclient.utils import InferenceServerException

import kiln_artifacts as ka
from kiln_artifacts import samples
from kiln_artifacts.signing import Signer, TrustedKeys, verify_manifest

T = TypeVar("T")
OPERATOR = ("-n", "kiln-system", "-l", "app.kubernetes.io/name=kiln-operator")
DATASET = "pvc://kiln-store/datasets/digits"
DRIFT_ALERT = "KilnModelDrift"


@dataclass
class Demo:
    cluster: Cluster
    ns: str
    store: Path  # the shared store as this machine sees it: $KILN_PVC_ROOT for pvc://kiln-store/...
    samples: list[dict[str, Any]]
    facts: dict[str, Any] = field(default_factory=dict)

    def get(self, ref: str) -> dict[str, Any]:
        return self.cluster.get(ref, "-n", self.ns)

    def status(self, ref: str) -> dict[str, Any]:
        return self.get(ref).get("status") or {}

    def items(self, kind: str, selector: str) -> list[dict[str, Any]]:
        return self.cluster.get(kind, "-n", self.ns, "-l", selector)["items"]

    def apply(self, *docs: dict[str, Any]) -> None:
        self.cluster.kubectl("apply", "-n", self.ns, "-f", "-", stdin=yaml.safe_dump_all(docs))

    def explain(self) -> str:
        """The Kiln objects' phases and conditions, and the last log lines of every pod, the operator's included."""
        out = []
        for obj in self.cluster.get("kiln", "-n", self.ns)["items"]:
            st = obj.get("status") or {}
            out.append(f"{obj['kind']}/{obj['metadata']['name']}: phase {st.get('phase')}")
            out += [
                f"  {c['type']}={c['status']} {c.get('reason')}: {c.get('message')}" for c in st.get("conditions", [])
            ]
        for args in (("-n", self.ns), OPERATOR):
            for pod in self.cluster.get("pods", *args)["items"]:
                name, pns = pod["metadata"]["name"], pod["metadata"]["namespace"]
                out.append(f"pod {pns}/{name}: {pod['status'].get('phase')}")
                logs = self.cluster.kubectl("logs", "-n", pns, name, "--all-containers", "--tail=15", check=False)
                out += [f"  | {line}" for line in (logs.stdout or logs.stderr).splitlines()]
        return "\n".join(out)

    def wait(self, probe: Callable[[], T], *, what: str, timeout: float) -> T:
        try:
            return wait_for(probe, what=what, timeout=timeout, interval=1)
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.explain()}") from None

    def load(self, uri: str) -> ka.LoadedArtifact:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("KILN_PVC_ROOT", str(self.store))
            return ka.load(uri)


def render(cluster: Cluster, path: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(cluster.kubectl("kustomize", str(REPO / path)).stdout) if d]


def operator_pod(cluster: Cluster) -> dict[str, Any] | None:
    pods = [p for p in cluster.get("pods", *OPERATOR)["items"] if not p["metadata"].get("deletionTimestamp")]
    ready = [p for p in pods if any(c.get("ready") for c in p["status"].get("containerStatuses", []))]
    return ready[0] if len(ready) == 1 else None


def failed(obj: dict[str, Any]) -> str | None:
    st = obj.get("status") or {}
    if st.get("phase") in ("Failed", "Rejected"):
        return f"{obj['kind']}/{obj['metadata']['name']} {st['phase']}: {st.get('conditions')}"
    return None


@pytest.fixture(scope="module")
def demo(cluster: Cluster, crds: None) -> Iterator[Demo]:
    """The operator installed as hack/up.sh installs it (watching only this module's namespace: the other tests
    run their own operators), the store shared with a namespace for the sample."""
    cluster.real_node()
    ns = f"e2e-{uuid.uuid4().hex[:8]}"
    cluster.create_namespace(ns, simulated=False, labels=RESTRICTED)
    subprocess.run(
        [str(REPO / "hack/real-node.sh"), "share", "kiln-store", "kiln-system", ns], env=cluster.env(), check=True
    )
    install = render(cluster, "manifests/overlays/local")
    deployment = next(d for d in install if d["kind"] == "Deployment")
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    container["args"] = [a for a in container["args"] if a != "--all-namespaces"] + [f"--namespace={ns}"]
    cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(install))
    docs = [d for d in render(cluster, "manifests/overlays/local-samples") if d["kind"] != "Namespace"]
    for d in docs:
        d["metadata"]["namespace"] = ns
        if d["kind"] == "ModelDeployment":  # the test's pace: verdicts from a few hundred requests, read often
            d["spec"]["monitoring"] = {
                "windowSamples": 300,
                "minSamples": 100,
                "intervalSeconds": 5,
                "payloadLog": {
                    "rate": 0.5,
                    "uri": f"pvc://kiln-store/payloads/{ns}",
                    "batchRecords": 50,
                    "batchSeconds": 5,
                },
            }
    store = Path(cluster.kubeconfig).parent / "real-node/volumes/shared"
    d = Demo(cluster, ns, store, docs)
    try:
        cluster.kubectl("rollout", "status", "-n", "kiln-system", "deployment/kiln-operator", "--timeout=180s")
        yield d
        for pod in cluster.get("pods", *OPERATOR)["items"]:
            logs = cluster.kubectl("logs", "-n", "kiln-system", pod["metadata"]["name"], check=False).stdout
            assert not PERMISSION_ERROR.search(logs), logs[-3000:]
            assert "Traceback" not in logs, logs[-3000:]
    finally:
        cluster.kubectl("delete", "-n", "kiln-system", "deployment/kiln-operator", "--wait=true", check=False)
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


@pytest.fixture(scope="module")
def served(demo: Demo) -> Demo:
    """One apply of the sample; the operator's pod deleted while the TrainingJob runs; then wait until the
    ModelDeployment serves what the ModelCompression promoted."""
    start = time.monotonic()
    demo.apply(*demo.samples)

    def training() -> dict[str, Any] | None:
        if msg := failed(demo.get("tj/classifier")):
            raise AssertionError(msg)
        st = demo.status("tj/classifier")
        return st if st.get("phase") == "Running" and (st.get("progress") or {}).get("step") else None

    running = demo.wait(training, what="the TrainingJob reporting progress", timeout=300)
    old = operator_pod(demo.cluster)
    assert old is not None
    demo.cluster.kubectl("delete", "pod", "-n", "kiln-system", old["metadata"]["name"], "--wait=false")
    demo.facts.update(progress_seen=running["progress"], old_operator=old["metadata"]["uid"])

    def done() -> dict[str, Any] | None:
        for ref in ("tj/classifier", "mc/classifier-int8", "md/classifier"):
            if msg := failed(demo.get(ref)):
                raise AssertionError(msg)
        promoted = (demo.status("mc/classifier-int8").get("promoted") or {}).get("digest")
        md = demo.status("md/classifier")
        return md if promoted and md.get("phase") == "Ready" and md["current"]["digest"] == promoted else None

    demo.wait(done, what="the ModelDeployment serving the promoted model", timeout=600)
    demo.facts["seconds"] = time.monotonic() - start
    return demo


def request_for(images: np.ndarray) -> dict[str, Any]:
    # The trainer's input scaling: uint8 pixels to [-1, 1], one channel.
    pixels = (images.astype(np.float32) / 127.5 - 1).reshape(len(images), 1, *images.shape[1:])
    return {
        "inputs": [
            {"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape), "data": pixels.ravel().tolist()}
        ]
    }


def service_url(demo: Demo, name: str = "classifier") -> str:
    spec = demo.get(f"service/{name}")["spec"]
    port = next(p["port"] for p in spec["ports"] if p["name"] == "http")
    return f"http://{spec['clusterIP']}:{port}/v2/models/{name}/infer"


def post(url: str, body: dict[str, Any], timeout: float = 10) -> tuple[int, dict[str, Any] | str]:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError as e:
        return 0, f"{type(e).__name__}: {e}"


def test_one_apply_trains_compresses_promotes_and_serves_through_an_operator_restart(served: Demo):
    demo = served
    tj, mc, md = demo.status("tj/classifier"), demo.status("mc/classifier-int8"), demo.status("md/classifier")
    # The operator's pod was replaced mid-pipeline; the new one finished the work and made nothing twice.
    new = operator_pod(demo.cluster)
    assert new is not None
    assert new["metadata"]["uid"] != demo.facts["old_operator"]
    assert tj["phase"] == "Succeeded"
    assert tj["attempt"] == 1
    assert tj["restarts"] == {"infrastructure": 0, "user": 0}
    assert [j["metadata"]["name"] for j in demo.items("jobs", "kiln.dev/trainingjob=classifier")] == ["classifier-1"]
    assert len(demo.items("jobs", "kiln.dev/modelcompression=classifier-int8")) == 1
    assert len(demo.items("deployments", "app.kubernetes.io/instance=classifier")) == 1
    versions = demo.store / "kiln-store/artifacts/registry/models/classifier-int8/versions"
    records = [json.loads(p.read_text()) for p in versions.iterdir()]
    assert [r["version"] for r in records if r["digest"] == md["current"]["digest"]] == [mc["promoted"]["version"]]
    assert tj["progress"]["step"] == tj["progress"]["totalSteps"] == 6000
    assert 0 < demo.facts["progress_seen"]["step"] <= 6000  # progress was visible while it ran
    # The compressor pod's measurements, in status.
    report = mc["report"]
    assert 0 < report["sizeRatio"] < 1, report
    assert report["speedup"] > 0, report
    assert report["accuracyDrop"] <= 0.01, report
    assert mc["phase"] == "Promoted"
    # Lineage: served digest <- promoted candidate <- trained model <- the published dataset.
    served_digest = md["current"]["digest"]
    candidate = demo.load(mc["promoted"]["uri"])
    assert candidate.digest == mc["promoted"]["digest"] == served_digest
    trained = demo.load(tj["artifact"]["uri"])
    assert trained.digest == tj["artifact"]["digest"] == mc["sourceArtifact"]["digest"]
    assert trained.digest in candidate.manifest.lineage.parents
    producer = candidate.manifest.lineage.producer
    assert (producer.kind, producer.namespace, producer.name) == ("ModelCompression", demo.ns, "classifier-int8")
    producer = trained.manifest.lineage.producer
    assert (producer.kind, producer.namespace, producer.name) == ("TrainingJob", demo.ns, "classifier")
    assert producer.uid == demo.get("tj/classifier")["metadata"]["uid"]
    dataset = demo.load(DATASET)
    assert trained.manifest.lineage.dataset.revision == dataset.digest
    assert candidate.manifest.lineage.dataset.revision == dataset.digest
    assert trained.manifest.lineage.parents == ()  # no base model: the sample's CNN starts from scratch
    assert dataset.manifest.lineage.source.startswith("pypi:scikit-learn==")
    # The served answers are the promoted ONNX model's, run here on the same inputs.
    images, labels = samples.load_idx_dataset(dataset.root, "test")
    body = request_for(images[:16])
    code, answer = post(service_url(demo), body)
    assert code == 200, answer
    out = next(o for o in answer["outputs"] if o["name"] == "logits")
    logits = np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])
    import onnxruntime as ort

    (model,) = sorted(candidate.root.glob("*.onnx"))
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.asarray(body["inputs"][0]["data"], dtype=np.float32).reshape(body["inputs"][0]["shape"])
    (direct,) = session.run(["logits"], {"pixel_values": x})
    np.testing.assert_allclose(logits, direct, rtol=1e-4, atol=1e-4)
    assert (logits.argmax(1) == labels[:16]).mean() >= 0.8
    for pod in demo.items("pods", "kiln.dev/modeldeployment=classifier"):
        assert pod["spec"]["nodeName"] == REAL_NODE


def test_the_served_model_is_watched_against_its_training_reference(served: Demo, tmp_path: Path):
    """Digits like the evaluation set keep Drifting False; inverted digits turn it True within one window, with the
    numbers in its message, an Event, and the shipped drift alert active in a real Prometheus that evaluates the
    shipped rules on the real pods; the payload log's batches load as verified dataset artifacts whose records are
    what was sent."""
    require_prometheus()
    demo = served
    current = demo.status("md/classifier")["current"]
    images, _ = samples.load_idx_dataset(demo.load(DATASET).root, "test")
    url = service_url(demo)
    sent: dict[str, dict[str, Any]] = {}

    def send(batch: np.ndarray, tag: str) -> None:
        for i in range(0, len(batch), 8):
            body = {**request_for(batch[i : i + 8]), "id": f"{tag}-{i}"}
            code, answer = post(url, body)
            assert code == 200, answer
            sent[body["id"]] = body

    def drifting(status: str) -> Callable[[], dict[str, Any] | None]:
        def probe() -> dict[str, Any] | None:
            st = demo.status("md/classifier")
            return st if condition(st, "Drifting").get("status") == status else None

        return probe

    discovery = {"job_name": "kiln-server", "file_sd_configs": [{"files": [str(tmp_path / "pods.json")]}]}
    with (
        PodTargets(demo, tmp_path / "pods.json"),
        run_prometheus(
            tmp_path, [], discovery=discovery, expected=2, rule_files=[write_rule_file(tmp_path / "rules.yml")]
        ) as prom,
    ):
        # The evaluation split (359 digits) the compressor profiled, twice over: traffic like the reference.
        traffic = np.concatenate([images, images])
        send(traffic[:640], "calm")
        st = demo.wait(drifting("False"), what="Drifting False on digits like the evaluation set", timeout=120)
        mon = st["monitoring"]
        assert mon["reference"] == "artifact", mon  # the compressor's profile of its evaluation set
        assert mon["revision"] == current["revision"]
        assert mon["samples"] >= 2 * 100, mon
        assert {s["name"] for s in mon["signals"]} >= {"prediction", "confidence", "channel0_mean", "channel0_std"}
        assert not [s for s in mon["signals"] if s["drifting"]], mon
        calm = {s["name"]: s["score"] for s in mon["signals"]}

        started = time.monotonic()
        send(255 - traffic[:720], "shifted")  # the same digits inverted: another domain for the same model
        st = demo.wait(drifting("True"), what="Drifting True on inverted digits", timeout=120)
        demo.facts["drift_detected_seconds"] = round(time.monotonic() - started, 1)
        drift = condition(st, "Drifting")
        assert drift["reason"] == "DriftDetected"
        assert "channel0_mean" in drift["message"], drift
        assert "samples" in drift["message"], drift
        shifted = {s["name"]: s for s in st["monitoring"]["signals"]}
        assert shifted["channel0_mean"]["drifting"], shifted
        assert shifted["channel0_mean"]["score"] > 0.5, shifted
        assert shifted["channel0_mean"]["score"] > 3 * calm["channel0_mean"]
        assert condition(st, "Ready")["status"] == "True"  # drift never takes a model out of service
        events = demo.cluster.get("events", "-n", demo.ns, "--field-selector", "involvedObject.name=classifier")
        assert any(e["reason"] == "DriftDetected" for e in events["items"]), [e["reason"] for e in events["items"]]

        def alert() -> dict[str, Any] | None:
            query = f'ALERTS{{alertname="{DRIFT_ALERT}",namespace="{demo.ns}"}}'
            doc = json.loads(urllib.request.urlopen(f"{prom}/api/v1/query?" + urlencode({"query": query})).read())
            return doc["data"]["result"][0]["metric"] if doc["data"]["result"] else None

        active = demo.wait(alert, what=f"{DRIFT_ALERT} pending or firing in Prometheus", timeout=120)
        assert active["alertstate"] in ("pending", "firing"), active
        demo.facts["drift_alert"] = active["alertstate"]
    check_payload_log(demo, current["digest"], sent)


def check_payload_log(demo: Demo, digest: str, sent: dict[str, dict[str, Any]]) -> None:
    """The serving pods' payload log: verified dataset artifacts in the shared store, each record one of the
    requests sent, with its inputs as sent and the model that answered."""
    prefix = f"pvc://kiln-store/payloads/{demo.ns}"

    def batches() -> list[ka.ArtifactInfo] | None:
        with pytest.MonkeyPatch.context() as m:
            m.setenv("KILN_PVC_ROOT", str(demo.store))
            found = ka.list_artifacts(prefix)
        # rate 0.5 of ~140 requests in batches of 50 records or 5 s: several batches once the last one is due
        return found if len(found) >= 2 else None

    infos = demo.wait(batches, what="payload-log batches in the store", timeout=60)
    logged = []
    for info in infos:
        art = demo.load(info.uri)  # verified against its manifest's digests
        assert (art.manifest.kind, art.manifest.format) == ("dataset", "jsonl")
        assert art.manifest.lineage.parents == (digest,)
        logged += [json.loads(line) for line in art.read_bytes("records.jsonl").decode().splitlines()]
    assert len({r["request_id"] for r in logged}) == len(logged)  # no record twice
    ours = [r for r in logged if r["request_id"] in sent]  # the other tests' requests are logged too
    assert len(ours) >= 20, len(ours)
    for record in ours:
        body = sent[record["request_id"]]
        assert record["model_digest"] == digest
        tensor = body["inputs"][0]
        pixels = np.asarray(record["inputs"]["pixel_values"], dtype=np.float32)
        np.testing.assert_array_equal(pixels.ravel(), np.asarray(tensor["data"], dtype=np.float32))
        assert list(pixels.shape) == tensor["shape"]
    demo.facts["payload_log"] = {"batches": len(infos), "records": len(logged), "ours": len(ours), "sent": len(sent)}


def https(host: str, port: int, path: str, *, ca: Path, token: str | None, body: dict[str, Any] | None = None):
    """(status, headers, JSON) of a request over TLS, the server's chain verified against `ca` only."""
    context = ssl.create_default_context(cafile=str(ca))
    conn = http.client.HTTPSConnection(host, port, context=context, timeout=15)
    try:
        headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {})}
        conn.request("POST" if body else "GET", path, json.dumps(body).encode() if body else None, headers)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), json.loads(r.read() or b"null")
    finally:
        conn.close()


def grpc_call(address: str, ca: Path, token: str | None, model: str, x: np.ndarray) -> np.ndarray:
    client = tg.InferenceServerClient(address, ssl=True, root_certificates=str(ca))
    try:
        pixels = tg.InferInput("pixel_values", list(x.shape), "FP32")
        pixels.set_data_from_numpy(x)
        headers = {"authorization": f"Bearer {token}"} if token else None
        return client.infer(model, [pixels], headers=headers, client_timeout=30).as_numpy("logits")
    finally:
        client.close()


def grpc_refused(address: str, ca: Path, token: str | None, model: str, x: np.ndarray) -> str:
    with pytest.raises(InferenceServerException) as e:
        grpc_call(address, ca, token, model, x)
    return str(e.value.status())


def test_a_signed_model_is_served_over_tls_to_authorised_callers_only(served: Demo, tmp_path: Path):
    """Signed artifacts, TLS and the cluster's own authorisation, on real pods: an unsigned source refused by a
    verifying compression; a signed compression promoted with its signer recorded; a deployment that verifies
    it, serves it over TLS only to a ServiceAccount RBAC allows (REST and gRPC), follows a revoked RoleBinding
    and a renewed certificate without a restart, and refuses a tampered copy while the stable revision serves."""
    demo, ns = served, served.ns
    signer, retired = Signer.generate(), Signer.generate()
    cluster = demo.cluster
    cluster.kubectl(
        "create", "secret", "generic", "kiln-signing", "-n", ns, "--from-file=private-key.pem=/dev/stdin",
        stdin=signer.private_pem().decode(),
    )  # fmt: skip
    trusted = {"retired.pem": retired.public_pem().decode(), "current.pem": signer.public_pem().decode()}
    demo.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "kiln-trusted-keys"}, "data": trusted})
    compression = next(d for d in demo.samples if d["kind"] == "ModelCompression")

    # A compression asked to verify its (unsigned) source refuses it before any work.
    verifying = copy.deepcopy(compression)
    verifying["metadata"]["name"] = "classifier-verified"
    verifying["spec"]["verification"] = {"trustedKeysConfigMap": "kiln-trusted-keys"}
    signing = copy.deepcopy(compression)
    signing["metadata"]["name"] = "classifier-signed"
    signing["spec"]["signing"] = {"secretName": "kiln-signing"}
    demo.apply(verifying, signing)
    st = demo.wait(
        lambda: (s := demo.status("mc/classifier-verified")).get("phase") == "Failed" and s,
        what="the unverified source refused",
        timeout=300,
    )
    assert st["failure"]["class"] == "Untrusted", st["failure"]
    assert "unsigned" in condition(st, "Compressed")["message"], st
    promoted = demo.wait(
        lambda: demo.status("mc/classifier-signed").get("promoted"), what="the signed model promoted", timeout=420
    )
    assert promoted["signedBy"] == [signer.key_id]
    candidate = demo.load(promoted["uri"])
    raw = (candidate.root / "kiln-manifest.json").read_bytes()
    assert verify_manifest(raw, TrustedKeys.from_pem(signer.public_pem()), where=promoted["uri"]) == signer.key_id

    # Served with every protection on: the certificate names the Service's address, so it is made once it has one.
    md = copy.deepcopy(next(d for d in demo.samples if d["kind"] == "ModelDeployment"))
    md["metadata"]["name"] = "secure"
    md["spec"].update(
        source={"modelCompressionRef": {"name": "classifier-signed"}},
        replicas=1,
        service={"auth": "Kubernetes", "tls": {"secretName": "secure-tls"}},
        verification={"trustedKeysConfigMap": "kiln-trusted-keys"},
    )
    md["spec"].pop("monitoring", None)
    demo.apply(md)
    svc = demo.wait(lambda: demo.get("service/secure")["spec"], what="the Service", timeout=60)
    ip, ports = svc["clusterIP"], {p["name"]: p["port"] for p in svc["ports"]}
    names = [f"secure.{ns}.svc", f"secure.{ns}.svc.cluster.local"]

    def tls_secret(leaf: Any) -> dict[str, Any]:
        data = {"tls.crt": leaf.cert_pem, "tls.key": leaf.key_pem}
        return {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "kubernetes.io/tls",
            "metadata": {"name": "secure-tls"},
            "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
        }

    ca = make_ca("kiln-e2e")
    ca_file = ca.write(tmp_path / "ca.pem")
    demo.apply(tls_secret(make_leaf(ca, dns=names, ips=[ip])))
    st = demo.wait(
        lambda: (s := demo.status("md/secure")).get("phase") == "Ready" and s,
        what="the secure model Ready",
        timeout=300,
    )
    assert st["url"] == f"https://secure.{ns}.svc.cluster.local:{ports['http']}"
    assert st["current"]["digest"] == promoted["digest"]

    # Two callers: one RBAC lets create modeldeployments/predict on this deployment, one it does not.
    role = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": {"name": "secure-caller"},
        "rules": [
            {
                "apiGroups": ["kiln.dev"],
                "resources": ["modeldeployments/predict"],
                "resourceNames": ["secure"],
                "verbs": ["create"],
            }
        ],
    }
    grant = {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {"name": "secure-caller"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "secure-caller"},
        "subjects": [{"kind": "ServiceAccount", "name": "caller", "namespace": ns}],
    }
    for account in ("caller", "stranger"):
        demo.apply({"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": account}})
    demo.apply(role, grant)
    token = {
        a: cluster.kubectl("create", "token", a, "-n", ns, "--duration=1h").stdout.strip()
        for a in ("caller", "stranger")
    }
    dataset = demo.load(DATASET)
    images, _ = samples.load_idx_dataset(dataset.root, "test")
    body = request_for(images[:8])
    x = np.asarray(body["inputs"][0]["data"], dtype=np.float32).reshape(body["inputs"][0]["shape"])
    import onnxruntime as ort

    (model,) = sorted(candidate.root.glob("*.onnx"))
    (expected,) = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"]).run(
        ["logits"], {"pixel_values": x}
    )
    infer = "/v2/models/secure/infer"
    code, headers, doc = https(ip, ports["http"], infer, ca=ca_file, token=None, body=body)
    assert (code, headers.get("WWW-Authenticate", "").startswith("Bearer")) == (401, True), (code, headers, doc)
    assert "outputs" not in doc
    code, _, doc = https(ip, ports["http"], infer, ca=ca_file, token=token["stranger"], body=body)
    assert code == 403, doc
    assert f"system:serviceaccount:{ns}:stranger" in doc["error"]
    code, _, doc = demo.wait(
        lambda: (r := https(ip, ports["http"], infer, ca=ca_file, token=token["caller"], body=body))[0] == 200 and r,
        what="the authorised caller answered",
        timeout=30,
    )
    out = next(o for o in doc["outputs"] if o["name"] == "logits")
    np.testing.assert_allclose(np.asarray(out["data"]).reshape(out["shape"]), expected, rtol=1e-4, atol=1e-4)
    # Health stays open to anyone (the kubelet has no token), still over TLS only.
    assert https(ip, ports["http"], "/v2/health/ready", ca=ca_file, token=None)[0] == 200
    assert post(f"http://{ip}:{ports['http']}/v2/health/ready", {})[0] in (0, 400)  # plain HTTP gets no answer
    address = f"{ip}:{ports['grpc']}"
    assert grpc_refused(address, ca_file, None, "secure", x) == "StatusCode.UNAUTHENTICATED"
    assert grpc_refused(address, ca_file, token["stranger"], "secure", x) == "StatusCode.PERMISSION_DENIED"
    np.testing.assert_allclose(grpc_call(address, ca_file, token["caller"], "secure", x), expected, atol=1e-4)
    # A client that trusts another CA does not get past the handshake.
    with pytest.raises(ssl.SSLCertVerificationError):
        https(ip, ports["http"], infer, ca=make_ca("other").write(tmp_path / "other.pem"), token=None, body=body)

    # The grant revoked: refused within the servers' cache lifetime (10 s), with no restart.
    cluster.kubectl("delete", "rolebinding", "secure-caller", "-n", ns)
    demo.wait(
        lambda: https(ip, ports["http"], infer, ca=ca_file, token=token["caller"], body=body)[0] == 403,
        what="the revoked caller refused",
        timeout=30,
    )
    demo.apply(grant)

    # The certificate renewed from another CA (as cert-manager would): served once the kubelet updates the volume.
    renewed = make_ca("kiln-e2e-renewed")
    renewed_file = renewed.write(tmp_path / "renewed.pem")
    demo.apply(tls_secret(make_leaf(renewed, dns=names, ips=[ip])))

    def renewed_served() -> bool:
        try:
            return https(ip, ports["http"], "/v2/health/ready", ca=renewed_file, token=None)[0] == 200
        except ssl.SSLCertVerificationError:
            return False  # still the old certificate

    demo.wait(renewed_served, what="the renewed certificate served", timeout=180)
    with pytest.raises(ssl.SSLCertVerificationError):
        https(ip, ports["http"], "/v2/health/ready", ca=ca_file, token=None)
    np.testing.assert_allclose(grpc_call(address, renewed_file, token["caller"], "secure", x), expected, atol=1e-4)
    before = demo.get("md/secure")["status"]["current"]["deployment"]
    pods = demo.items("pods", f"kiln.dev/revision={before.rsplit('-', 1)[-1]}")
    assert all(c["restartCount"] == 0 for p in pods for c in p["status"]["containerStatuses"])

    # A copy whose lineage was edited after signing: refused by the server before it serves, rolled back, and the
    # signed revision keeps serving the caller.
    tampered = demo.store / f"kiln-store/uploads/{ns}/tampered"
    shutil.copytree(demo.store / promoted["uri"].removeprefix("pvc://"), tampered)
    doc = json.loads((tampered / "kiln-manifest.json").read_text())
    doc["lineage"]["producer"]["name"] = "someone-else"
    (tampered / "kiln-manifest.json").write_text(json.dumps(doc))
    source = {"modelCompressionRef": None, "uri": f"pvc://kiln-store/uploads/{ns}/tampered"}
    cluster.kubectl("patch", "-n", ns, "md/secure", "--type=merge", "-p", json.dumps({"spec": {"source": source}}))
    st = demo.wait(
        lambda: condition(s := demo.status("md/secure"), "RolledBack").get("status") == "True" and s,
        what="the tampered artifact rolled back",
        timeout=300,
    )
    rolled = condition(st, "RolledBack")
    assert rolled["reason"] == "ArtifactUntrusted", rolled
    assert "signature" in rolled["message"], rolled
    assert st["current"]["digest"] == promoted["digest"]
    code, _, doc = https(ip, ports["http"], infer, ca=renewed_file, token=token["caller"], body=body)
    assert code == 200, doc


def test_a_trainer_pod_deleted_mid_run_checkpoints_and_the_next_attempt_resumes(served: Demo):
    demo = served
    tj = copy.deepcopy(next(d for d in demo.samples if d["kind"] == "TrainingJob"))
    tj["metadata"]["name"] = "resumed"
    demo.apply(tj)

    def checkpointed() -> dict[str, Any] | None:
        st = demo.status("tj/resumed")
        ck = (st.get("lastCheckpoint") or {}).get("step") or 0
        return st if st.get("phase") == "Running" and ck >= 1000 and st["progress"]["step"] < 5000 else None

    seen = demo.wait(checkpointed, what="a checkpoint of the running job", timeout=300)
    (pod,) = [p for p in demo.items("pods", "kiln.dev/trainingjob=resumed") if p["status"].get("phase") == "Running"]
    demo.cluster.kubectl("delete", "pod", "-n", demo.ns, pod["metadata"]["name"], "--wait=false")  # SIGTERM

    def finished() -> dict[str, Any] | None:
        st = demo.status("tj/resumed")
        return st if st.get("phase") in ("Succeeded", "Failed") else None

    st = demo.wait(finished, what="the resumed job finished", timeout=420)
    assert st["phase"] == "Succeeded", demo.explain()
    assert st["attempt"] == 2, st
    jobs = {j["metadata"]["name"]: j for j in demo.items("jobs", "kiln.dev/trainingjob=resumed")}
    assert sorted(jobs) == ["resumed-2"]  # the replaced attempt's Job is deleted
    # The first attempt's pod checkpointed on SIGTERM, at or after the step seen before it was deleted (the last
    # periodic checkpoint is older), and the second attempt resumed from that checkpoint.
    resume_from = jobs["resumed-2"]["metadata"]["annotations"]["kiln.dev/resume-from"]
    step = int(resume_from.rsplit("step-", 1)[1])
    assert step >= seen["progress"]["step"], (resume_from, seen)
    assert st["progress"]["resumedFromStep"] == step, st["progress"]
    events = demo.cluster.get("events", "-n", demo.ns, "--field-selector", "involvedObject.name=resumed")["items"]
    assert any(resume_from in e.get("message", "") for e in events), [e.get("message") for e in events]
    # The same number of steps as the uninterrupted run.
    assert st["progress"]["step"] == st["progress"]["totalSteps"] == 6000
    trained = demo.load(st["artifact"]["uri"])
    uninterrupted = demo.load(demo.status("tj/classifier")["artifact"]["uri"])
    assert trained.manifest.metrics["steps"] == uninterrupted.manifest.metrics["steps"] == 6000
    assert trained.manifest.metrics["eval_accuracy"] > 0.9


class Background:
    """A thread calling ``tick`` every ``every`` seconds (0: back to back) while the ``with`` block runs."""

    every = 0.0

    def tick(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop.wait(self.every):
            self.tick()

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        self.thread.join(timeout=30)


class Load(Background):
    """Requests sent one after another through the Service from a thread; every outcome counted."""

    def __init__(self, url: str, body: dict[str, Any]) -> None:
        self.url, self.body = url, body
        self.codes: Counter[int] = Counter()
        self.errors: list[str] = []

    def tick(self) -> None:
        code, answer = post(self.url, self.body, timeout=5)
        self.codes[code] += 1
        if code != 200:
            self.errors.append(f"{code}: {str(answer)[:200]}")


def test_the_service_keeps_answering_when_a_serving_pod_is_deleted_and_its_budget_refuses_a_second(served: Demo):
    demo = served
    dataset = demo.load(DATASET)
    images, _ = samples.load_idx_dataset(dataset.root, "test")
    selector = "kiln.dev/modeldeployment=classifier"
    before = {p["metadata"]["name"] for p in demo.items("pods", selector)}
    assert len(before) == 2
    with Load(service_url(demo), request_for(images[:4])) as load:
        demo.wait(lambda: load.codes[200] >= 50, what="50 answers", timeout=60)
        victim = sorted(before)[0]
        demo.cluster.kubectl("delete", "pod", "-n", demo.ns, victim, "--wait=false")

        def replaced() -> bool:
            pods = demo.items("pods", selector)
            ready = [
                p
                for p in pods
                if not p["metadata"].get("deletionTimestamp")
                and any(c.get("ready") for c in p["status"].get("containerStatuses", []))
            ]
            return len(ready) == 2 and victim not in {p["metadata"]["name"] for p in pods}

        demo.wait(replaced, what="the deleted replica replaced and gone", timeout=180)
        served_before = load.codes[200]
        demo.wait(lambda: load.codes[200] >= served_before + 50, what="50 more answers", timeout=60)
    assert load.codes[200] >= 100
    assert not load.errors, (load.codes, load.errors[:10])
    # The PodDisruptionBudget (maxUnavailable 1): an eviction is granted, and a second one, while the first
    # replica's replacement is not ready yet, is refused.
    pdb = demo.get("pdb/classifier")
    assert pdb["spec"]["maxUnavailable"] == 1
    pods = sorted(p["metadata"]["name"] for p in demo.items("pods", selector))
    first = evict(demo, pods[0])
    second = evict(demo, pods[1])
    assert first.returncode == 0, first.stderr
    assert second.returncode != 0
    assert "disruption budget" in second.stderr, second.stderr


def evict(demo: Demo, pod: str) -> subprocess.CompletedProcess:
    body = {"apiVersion": "policy/v1", "kind": "Eviction", "metadata": {"name": pod, "namespace": demo.ns}}
    return demo.cluster.kubectl(
        "create",
        "--raw",
        f"/api/v1/namespaces/{demo.ns}/pods/{pod}/eviction",
        "-f",
        "-",
        stdin=json.dumps(body),
        check=False,
    )


class PodTargets(Background):
    """Prometheus' targets for the serving pods, as a PodMonitor on their `metrics` port would give them: written
    to a file_sd file from the API server's pod list every second (Debian's Prometheus is built without the
    Kubernetes discovery), with the target labels the operator's queries select on."""

    def __init__(self, demo: Demo, path: Path, operator: bool = False) -> None:
        self.demo, self.path, self.operator = demo, path, operator
        self.tick()

    every = 1.0

    def tick(self) -> None:
        targets = []
        if self.operator and (pod := operator_pod(self.demo.cluster)) and pod["status"].get("podIP"):
            # No namespace target label: the operator's series carry their objects' namespaces.
            targets.append({"targets": [f"{pod['status']['podIP']}:9090"], "labels": {"pod": pod["metadata"]["name"]}})
        for pod in self.demo.items("pods", "kiln.dev/modeldeployment=classifier"):
            ip, labels = pod["status"].get("podIP"), pod["metadata"]["labels"]
            if pod["status"].get("phase") != "Running" or not ip or pod["metadata"].get("deletionTimestamp"):
                continue
            meta = {
                "namespace": self.demo.ns,
                "kiln_dev_modeldeployment": labels["kiln.dev/modeldeployment"],
                "kiln_dev_revision": labels["kiln.dev/revision"],
                "pod": pod["metadata"]["name"],
            }
            targets.append({"targets": [f"{ip}:9090"], "labels": meta})
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(targets))
        tmp.replace(self.path)  # whole files only: Prometheus never reads a half-written list


class Capacity(Background):
    """Ready replicas of each of the ModelDeployment's revisions (Deployments), sampled every half second."""

    def __init__(self, demo: Demo) -> None:
        self.demo = demo
        self.samples: list[dict[str, int]] = []

    every = 0.5

    def tick(self) -> None:
        found = self.demo.items("deployments", "app.kubernetes.io/instance=classifier")
        self.samples.append({d["metadata"]["name"]: d["status"].get("readyReplicas") or 0 for d in found})

    def lowest(self, deployment: str | None = None) -> int:
        """The fewest ready replicas seen: of one revision, or of all together (what the Service can route to)."""
        return min(s.get(deployment, 0) if deployment else sum(s.values()) for s in self.samples)


def test_a_new_training_run_is_canaried_on_prometheus_and_a_broken_candidate_rolled_back(served: Demo, tmp_path: Path):
    """Under steady load through the Service, with the analysis on a real Prometheus scraping the real pods: a
    second training run's model is promoted as a canary with no failed request; then an artifact that fails at
    inference is rolled back, the stable revision at full capacity throughout."""
    require_prometheus()
    demo = served
    demo.wait(lambda: demo.status("md/classifier").get("readyReplicas") == 2, what="2 replicas ready", timeout=180)
    gateway = "10.244.0.1"  # the real node's bridge on this machine: the operator's pod reaches Prometheus there
    discovery = {"job_name": "kiln-server", "file_sd_configs": [{"files": [str(tmp_path / "pods.json")]}]}
    rules = write_rule_file(tmp_path / "rules.yml")
    with (
        PodTargets(demo, tmp_path / "pods.json", operator=True),
        run_prometheus(tmp_path, [], discovery=discovery, expected=3, listen=gateway, rule_files=[rules]) as prom,
    ):
        demo.cluster.kubectl(
            "set", "env", "-n", "kiln-system", "deployment/kiln-operator", f"KILN_PROMETHEUS_URL={prom}"
        )
        demo.cluster.kubectl("rollout", "status", "-n", "kiln-system", "deployment/kiln-operator", "--timeout=180s")
        interval = 10
        rollout = {
            "strategy": "Canary",
            "steps": [{"weight": 50, "pauseSeconds": 20}, {"weight": 100, "pauseSeconds": 0}],
            "analysis": {"intervalSeconds": interval, "minRequests": 20, "maxErrorRate": 0.01},
        }
        patch = {"spec": {"rollout": rollout}}
        demo.cluster.kubectl("patch", "-n", demo.ns, "md/classifier", "--type=merge", "-p", json.dumps(patch))
        v1 = demo.status("md/classifier")["current"]
        dataset = demo.load(DATASET)
        images, _ = samples.load_idx_dataset(dataset.root, "test")
        with Load(service_url(demo), request_for(images[:4])) as load:
            # A second training run (another seed), compressed by the same recipe: spec.source is immutable, so
            # the ModelCompression the deployment follows is made anew from it.
            tj = copy.deepcopy(next(d for d in demo.samples if d["kind"] == "TrainingJob"))
            tj["metadata"]["name"] = "classifier-v2"
            tj["spec"]["hyperparameters"].update(seed=7, maxSteps=3000)
            mc = copy.deepcopy(next(d for d in demo.samples if d["kind"] == "ModelCompression"))
            mc["spec"]["source"] = {"trainingJobRef": {"name": "classifier-v2"}}
            demo.apply(tj)
            demo.cluster.kubectl("delete", "-n", demo.ns, "mc/classifier-int8", "--wait=true")
            demo.apply(mc)
            promoted = demo.wait(
                lambda: (demo.status("mc/classifier-int8").get("promoted") or {}).get("digest"),
                what="the second model promoted by the compression",
                timeout=420,
            )
            assert promoted != v1["digest"]
            with Capacity(demo) as capacity:
                demo.wait(
                    lambda: (demo.status("md/classifier").get("candidate") or {}).get("digest") == promoted,
                    what="the canary of the second model",
                    timeout=120,
                )
                started = time.monotonic()
                st = demo.wait(
                    lambda: (s := demo.status("md/classifier"))["current"]["digest"] == promoted and s,
                    what="the canary promoted",
                    timeout=300,
                )
                demo.facts["canary_seconds"] = time.monotonic() - started
            assert capacity.lowest() >= 2, capacity.samples  # never fewer ready replicas than desired
            assert st["history"][-2]["outcome"] == "Promoted", st["history"]
            assert st["analysis"]["verdict"] == "Pass", st["analysis"]
            assert st["analysis"]["candidate"]["requests"] >= 20, st["analysis"]
            assert st["analysis"]["candidate"]["errorRate"] == 0, st["analysis"]
            assert not load.errors, (load.codes, load.errors[:10])
            demo.facts["canary_requests"] = load.codes[200]
            # An artifact that loads and warms up but fails at inference, published to the store by its user and
            # set as the source: a canary, judged on Prometheus' 5xx counts, rolled back.
            with pytest.MonkeyPatch.context() as m:
                m.setenv("KILN_PVC_ROOT", str(demo.store))
                onnx_artifact_of(str(demo.store / f"kiln-store/uploads/{demo.ns}/broken"), Broken.build())
                broken = ka.load(f"pvc://kiln-store/uploads/{demo.ns}/broken/image-model")
            v2 = st["current"]
            before = dict(load.codes)
            source = {"modelCompressionRef": None, "uri": broken.uri, "digest": broken.digest}
            demo.cluster.kubectl(
                "patch", "-n", demo.ns, "md/classifier", "--type=merge", "-p", json.dumps({"spec": {"source": source}})
            )
            with Capacity(demo) as capacity:
                demo.wait(
                    lambda: (
                        (s := demo.status("md/classifier")).get("canaryWeight")
                        or condition(s, "RolledBack").get("status") == "True"
                    ),
                    what="the canary of the broken artifact in service",
                    timeout=120,
                )
                started = time.monotonic()
                st = demo.wait(
                    lambda: condition(s := demo.status("md/classifier"), "RolledBack").get("status") == "True" and s,
                    what="the broken canary rolled back",
                    timeout=300,
                )
                demo.facts["rollback_seconds"] = time.monotonic() - started
            assert capacity.lowest(v2["deployment"]) == 2, capacity.samples  # the stable revision, throughout
        # Judged within an analysis interval of its pods taking traffic, plus a scrape and a reconcile pass.
        assert demo.facts["rollback_seconds"] < 2 * interval, demo.facts
        rolled = condition(st, "RolledBack")
        assert rolled["reason"] == "AnalysisFailed", rolled
        assert st["current"]["digest"] == v2["digest"]
        assert broken.digest in [r["digest"] for r in st["rejected"]]
        # Only requests the Service routed to the candidate failed, and they failed as the model did (500), never
        # as a lost connection; Prometheus saw 5xx on the candidate's revision only.
        failed_now = {code: n - before.get(code, 0) for code, n in load.codes.items() if n != before.get(code, 0)}
        assert set(failed_now) <= {200, 500}, (failed_now, load.errors[-5:])
        demo.facts["rollback_failed_requests"] = failed_now.get(500, 0)
        query = f'sum by (kiln_dev_revision) (kiln_server_requests_total{{namespace="{demo.ns}",code=~"5.."}})'
        result = json.loads(urllib.request.urlopen(f"{prom}/api/v1/query?" + urlencode({"query": query})).read())
        errors = {r["metric"].get("kiln_dev_revision"): float(r["value"][1]) for r in result["data"]["result"]}
        assert set(errors) <= {broken.digest[7:17]}, errors
        # Every panel of the shipped dashboards answers on what Prometheus scraped of the real operator and servers
        # after a whole pipeline, canary and rollback: no panel ships broken.
        queries = panel_queries()
        assert len(queries) > 40
        failures = check_queries(prom, queries)
        assert not failures, failures
        demo.facts["dashboard_queries"] = len(queries)
    print(f"\npipeline figures: {json.dumps(demo.facts)}")


def condition(st: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in st.get("conditions", []) if c["type"] == type_), {})
