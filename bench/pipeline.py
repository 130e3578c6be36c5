"""The sample pipeline on the cluster against the same work run directly as processes here, in the same run.

    hack/up.sh                              # once: the cluster, its real node, the operator with its store
    .venv/bin/python -m bench.pipeline      # about 3 minutes on the 2-core development machine

Cluster side: manifests/overlays/local-samples applied into a fresh namespace (the store shared with it by
`hack/real-node.sh share`), its progress polled every 0.2 s, then Open Inference Protocol requests through the
Service until the first answer. Parts: dataset (the publish Job), training (TrainingJob applied -> Succeeded),
compression and promotion (-> ModelCompression Promoted), serving start (-> ModelDeployment Ready), first answer.

Direct side: the very commands and environment of the trainer's and the compressor's Jobs (read back from the
cluster), run as processes here with the store in a temporary folder, then `python -m kiln_server` on loopback
with the promoted model, until its first answer. The difference is what Kubernetes and Kiln add: scheduling, pod
and image start, volume setup, the operator's reaction times.

Also: a serving pod, created -> Ready (as seen through the API), against onnxruntime.InferenceSession creation
plus a first run of the same model here.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import numpy as np

from kiln_artifacts import samples

REPO = Path(__file__).resolve().parents[1]

DATASET = "pvc://kiln-store/datasets/digits"


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kubectl(*args: str, stdin: str | None = None) -> str:
    out = subprocess.run(["kubectl", *args], input=stdin, capture_output=True, text=True, timeout=120)
    if out.returncode:
        raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def get(ns: str, ref: str) -> dict[str, Any]:
    return json.loads(kubectl("get", "-n", ns, ref, "-o", "json"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def request_body() -> tuple[bytes, list[int]]:
    x, y = samples.read_digits()
    images = np.frombuffer(b"".join(x[:4]), dtype=np.uint8).reshape(4, 8, 8)
    pixels = (images.astype(np.float32) / 127.5 - 1).reshape(4, 1, 8, 8)
    doc = {
        "inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": [4, 1, 8, 8], "data": pixels.ravel().tolist()}]
    }
    return json.dumps(doc).encode(), y[:4]


def post(url: str, body: bytes) -> int:
    try:
        req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            r.read()
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return 0


def cluster_side(ns: str, body: bytes) -> dict[str, float]:
    """Seconds from `kubectl apply` to each milestone, polled every 0.2 s."""
    import yaml

    rendered = [
        d for d in yaml.safe_load_all(kubectl("kustomize", str(REPO / "manifests/overlays/local-samples"))) if d
    ]
    rendered = [d for d in rendered if d["kind"] != "Namespace"]
    for d in rendered:
        d["metadata"]["namespace"] = ns
    t0 = time.monotonic()
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(rendered))
    marks: dict[str, float] = {}
    pods_seen: dict[str, float] = {}
    pods_ready: dict[str, float] = {}
    url = None
    while time.monotonic() - t0 < 900:
        now = time.monotonic() - t0
        if "dataset" not in marks and (get(ns, "job/publish-digits").get("status") or {}).get("succeeded"):
            marks["dataset"] = now
        if "training" not in marks:
            st = get(ns, "tj/classifier").get("status") or {}
            if st.get("phase") == "Failed":
                raise RuntimeError(f"TrainingJob failed: {st.get('conditions')}")
            if st.get("phase") == "Succeeded":
                marks["training"] = now
        if "promotion" not in marks:
            st = get(ns, "mc/classifier-int8").get("status") or {}
            if st.get("phase") in ("Rejected", "Failed"):
                raise RuntimeError(f"ModelCompression {st['phase']}: {st.get('conditions')}")
            if st.get("phase") == "Promoted":
                marks["promotion"] = now
        if "promotion" in marks:
            pods = json.loads(
                kubectl("get", "pods", "-n", ns, "-l", "kiln.dev/modeldeployment=classifier", "-o", "json")
            )
            for p in pods["items"]:
                name = p["metadata"]["name"]
                pods_seen.setdefault(name, now)
                if any(c.get("ready") for c in p["status"].get("containerStatuses") or []):
                    pods_ready.setdefault(name, now)
        if "serving" not in marks and "promotion" in marks:
            st = get(ns, "md/classifier").get("status") or {}
            if st.get("phase") == "Ready":
                marks["serving"] = now
                spec = get(ns, "service/classifier")["spec"]
                port = next(p["port"] for p in spec["ports"] if p["name"] == "http")
                url = f"http://{spec['clusterIP']}:{port}/v2/models/classifier/infer"
        if url and post(url, body) == 200:
            marks["answer"] = time.monotonic() - t0
            break
        time.sleep(0.2)
    else:
        raise RuntimeError(f"the pipeline did not answer within 900 s: {marks}")
    marks["pod_ready"] = min(pods_ready[n] - pods_seen[n] for n in pods_ready)
    return marks


def job_command(ns: str, selector: str) -> tuple[list[str], dict[str, str]]:
    (job,) = json.loads(kubectl("get", "jobs", "-n", ns, "-l", selector, "-o", "json"))["items"]
    c = job["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["value"] for e in c.get("env") or [] if "value" in e}
    command = [
        sys.executable if c["command"][0] == "python" else c["command"][0],
        *c["command"][1:],
        *(c.get("args") or []),
    ]
    return command, env


def run(command: list[str], env: dict[str, str], root: Path, what: str) -> float:
    full = {**os.environ, **env, "KILN_PVC_ROOT": str(root), "KILN_TERMINATION_LOG": str(root / f"{what}.termination")}
    t = time.monotonic()
    out = subprocess.run(command, env=full, capture_output=True, text=True, timeout=900)
    if out.returncode:
        raise RuntimeError(f"{what} exited {out.returncode}: {out.stderr[-2000:]}")
    return time.monotonic() - t


def direct_side(ns: str, body: bytes, root: Path) -> dict[str, float]:
    """The same work as processes here: the Jobs' own commands and environment, the store in `root`."""
    (root / "kiln-store").mkdir(parents=True)
    marks: dict[str, float] = {}
    t0 = time.monotonic()
    run([sys.executable, "-m", "kiln_artifacts.samples", "digits", DATASET], {}, root, "dataset")
    marks["dataset"] = time.monotonic() - t0
    command, env = job_command(ns, "kiln.dev/trainingjob=classifier")
    run(command, env, root, "trainer")
    marks["training"] = time.monotonic() - t0
    command, env = job_command(ns, "kiln.dev/modelcompression=classifier-int8")
    run(command, env, root, "compressor")
    marks["promotion"] = time.monotonic() - t0  # the operator's registry write is a file: negligible here
    report = json.loads((root / "compressor.termination").read_text())
    model_uri = report["artifact"]["uri"]
    port = free_port()
    args = [sys.executable, "-m", "kiln_server", "--model-uri", model_uri, "--model-name", "classifier"]
    args += ["--host", "127.0.0.1", "--port", str(port), "--grpc-port", str(free_port())]
    args += ["--metrics-port", str(free_port()), "--termination-log", str(root / "server.termination")]
    env = {**os.environ, "KILN_PVC_ROOT": str(root)}
    server = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}/v2/models/classifier/infer"
        ready = f"http://127.0.0.1:{port}/v2/health/ready"
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"kiln_server exited {server.returncode}")
            if "serving" not in marks:
                try:
                    with urllib.request.urlopen(ready, timeout=2) as r:
                        if r.status == 200:
                            marks["serving"] = time.monotonic() - t0
                except OSError:
                    pass
            if "serving" in marks and post(url, body) == 200:
                marks["answer"] = time.monotonic() - t0
                break
            time.sleep(0.05)
    finally:
        server.terminate()
        server.wait(30)
    # A session of the same model, created and run once, in this process.
    import onnxruntime as ort

    with_env = os.environ.get("KILN_PVC_ROOT")
    os.environ["KILN_PVC_ROOT"] = str(root)
    try:
        import kiln_artifacts as ka

        (model,) = sorted(ka.load(model_uri).root.glob("*.onnx"))
    finally:
        if with_env is None:
            os.environ.pop("KILN_PVC_ROOT")
        else:
            os.environ["KILN_PVC_ROOT"] = with_env
    t = time.monotonic()
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    x = np.asarray(json.loads(body)["inputs"][0]["data"], dtype=np.float32).reshape(4, 1, 8, 8)
    session.run(None, {"pixel_values": x})
    marks["session"] = time.monotonic() - t
    return marks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", action="store_true", help="keep the benchmark's namespace")
    args = parser.parse_args()
    kubectl("get", "-n", "kiln-system", "deployment/kiln-operator")  # fails clearly without hack/up.sh
    body, _ = request_body()
    ns = f"bench-{uuid.uuid4().hex[:6]}"
    kubectl("create", "namespace", ns)
    kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=restricted")
    try:
        subprocess.run([str(REPO / "hack/real-node.sh"), "share", "kiln-store", ns], check=True)
        log(f"cluster: applying the local samples into {ns}")
        c = cluster_side(ns, body)
        log(f"cluster: first answer after {c['answer']:.1f} s")
        with tempfile.TemporaryDirectory(prefix="kiln-bench-") as tmp:
            log("direct: the same commands as processes here")
            d = direct_side(ns, body, Path(tmp))
        log(f"direct: first answer after {d['answer']:.1f} s")
    finally:
        if not args.keep:
            kubectl("delete", "namespace", ns, "--wait=false")
    parts = [
        ("dataset published", "dataset", None),
        ("training done", "training", "dataset"),
        ("compressed and promoted", "promotion", "training"),
        ("serving Ready", "serving", "promotion"),
        ("first answer", "answer", "serving"),
    ]
    print(f"{'milestone (s since start)':28} {'cluster':>9} {'direct':>9} {'ratio':>7}   {'part':>7} {'part':>7}")
    for label, key, prev in parts:
        cp = c[key] - (c[prev] if prev else 0)
        dp = d[key] - (d[prev] if prev else 0)
        print(f"{label:28} {c[key]:9.1f} {d[key]:9.1f} {c[key] / d[key]:7.2f}   {cp:7.1f} {dp:7.1f}")
    ready, session = c["pod_ready"], d["session"]
    print(f"serving pod created -> Ready: {ready:.2f} s; InferenceSession + first run here: {session:.3f} s", end="")
    print(f" (ratio {ready / session:.0f}x)")
    print(json.dumps({"cluster": c, "direct": d}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
