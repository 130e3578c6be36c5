"""The sample pipeline as hack/up.sh shows it: wait for it with progress, then ask the served model.

    pipeline.py wait NAMESPACE [--timeout S]   until the ModelDeployment serves what the ModelCompression promoted;
                                               on a failure, the failing object's conditions and its pods' logs
    pipeline.py predict NAMESPACE              an Open Inference Protocol request through the Service, printed with
                                               the answer, and a curl command to send one yourself

Names are those of manifests/overlays/local-samples (TrainingJob and ModelDeployment `classifier`, ModelCompression
`classifier-int8`, dataset pvc://kiln-store/datasets/digits). Uses kubectl (KUBECONFIG) and, for predict, the
dataset on the shared store as this machine sees it ($KILN_PVC_ROOT/kiln-store).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import urllib.request
from typing import Any

TJ, MC, MD = "trainingjob/classifier", "modelcompression/classifier-int8", "modeldeployment/classifier"
DATASET = "pvc://kiln-store/datasets/digits"
LABELS = {TJ: "kiln.dev/trainingjob=classifier", MC: "kiln.dev/modelcompression=classifier-int8"}
LABELS[MD] = "kiln.dev/modeldeployment=classifier"


def log(msg: str) -> None:
    print(f"[up {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def kubectl(*args: str, check: bool = True) -> str:
    out = subprocess.run(["kubectl", *args], capture_output=True, text=True, timeout=60)
    if check and out.returncode:
        raise RuntimeError(f"kubectl {' '.join(args)}: {out.stderr.strip()}")
    return out.stdout


def get(ns: str, ref: str) -> dict[str, Any]:
    out = kubectl("get", "-n", ns, ref, "-o", "json", check=False)
    return json.loads(out) if out else {}


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == type_), {})


def describe(ns: str, ref: str, obj: dict[str, Any]) -> str:
    st = obj.get("status") or {}
    phase = st.get("phase") or "(not reconciled yet)"
    if ref == TJ:
        p = st.get("progress") or {}
        parts = [phase]
        if p.get("step") is not None:
            parts.append(f"step {p['step']}/{p.get('totalSteps', '?')}")
        if p.get("loss") is not None:
            parts.append(f"loss {p['loss']:.4f}")
        if (st.get("lastCheckpoint") or {}).get("step"):
            parts.append(f"checkpoint at step {st['lastCheckpoint']['step']}")
        if (st.get("artifact") or {}).get("digest"):
            parts.append(f"artifact {st['artifact']['digest']}")
        return ", ".join(parts)
    if ref == MC:
        r = st.get("report") or {}
        parts = [phase]
        if r:
            parts.append(
                f"size ratio {r.get('sizeRatio')}, speed-up {r.get('speedup')}, accuracy drop {r.get('accuracyDrop')}"
            )
        if (st.get("promoted") or {}).get("digest"):
            parts.append(f"promoted {st['promoted']['digest']}")
        return ", ".join(parts)
    ready = condition(obj, "Ready")
    return (
        f"{phase}, {st.get('readyReplicas', 0)}/{(obj.get('spec') or {}).get('replicas')} ready"
        + (f", serving {st['current']['digest']}" if (st.get("current") or {}).get("digest") else "")
        + (f" ({ready.get('reason')}: {ready.get('message')})" if ready.get("status") == "False" else "")
    )


def failed(ref: str, obj: dict[str, Any]) -> bool:
    phase = (obj.get("status") or {}).get("phase")
    if ref == TJ:
        return phase == "Failed"
    if ref == MC:
        return phase in ("Rejected", "Failed")
    return phase == "Failed" or condition(obj, "Stalled").get("status") == "True"


def explain(ns: str, ref: str, obj: dict[str, Any]) -> None:
    """What a person needs to see a failure: the object's conditions and the logs of its pods."""
    log(f"{ref}: {describe(ns, ref, obj)}")
    for c in (obj.get("status") or {}).get("conditions") or []:
        log(f"  condition {c.get('type')}={c.get('status')} {c.get('reason')}: {c.get('message')}")
    failure = (obj.get("status") or {}).get("failure")
    if failure:
        log(f"  failure: {json.dumps(failure)[:2000]}")
    pods = json.loads(kubectl("get", "pods", "-n", ns, "-l", LABELS[ref], "-o", "json", check=False) or "{}")
    for pod in (pods.get("items") or [])[-3:]:
        name = pod["metadata"]["name"]
        log(f"  pod {name}: {pod['status'].get('phase')}; last lines of its log:")
        print(kubectl("logs", "-n", ns, name, "--all-containers", "--tail=30", check=False), file=sys.stderr)
    if ref == TJ:
        job = get(ns, "job/publish-digits")
        if not (job.get("status") or {}).get("succeeded"):
            log("  the dataset Job publish-digits has not succeeded; its log:")
            print(kubectl("logs", "-n", ns, "job/publish-digits", "--tail=30", check=False), file=sys.stderr)


def wait(ns: str, timeout: float) -> int:
    start = time.monotonic()
    shown: dict[str, str] = {}
    while True:
        objs = {ref: get(ns, ref) for ref in (TJ, MC, MD)}
        for ref, obj in objs.items():
            line = describe(ns, ref, obj) if obj else "(absent)"
            if shown.get(ref) != line:
                log(f"{ref}: {line}  [{time.monotonic() - start:.0f} s]")
                shown[ref] = line
        for ref, obj in objs.items():
            if obj and failed(ref, obj):
                log(f"FAILED: {ref}")
                explain(ns, ref, obj)
                return 1
        promoted = ((objs[MC].get("status") or {}).get("promoted") or {}).get("digest")
        md = objs[MD].get("status") or {}
        if promoted and md.get("phase") == "Ready" and (md.get("current") or {}).get("digest") == promoted:
            log(f"pipeline done in {time.monotonic() - start:.0f} s: {MD} serves {promoted}")
            return 0
        if time.monotonic() - start > timeout:
            log(f"FAILED: the pipeline did not finish within {timeout:.0f} s")
            for ref, obj in objs.items():
                explain(ns, ref, obj)
            return 1
        time.sleep(2)


def predict(ns: str) -> int:
    import numpy as np

    import kiln_artifacts as ka
    from kiln_artifacts import samples

    service = get(ns, "service/classifier")["spec"]
    port = next(p["port"] for p in service["ports"] if p["name"] == "http")
    url = f"http://{service['clusterIP']}:{port}/v2/models/classifier/infer"
    dataset = ka.load(DATASET)
    images, labels = samples.load_idx_dataset(dataset.root, "test")
    n = 8
    # The trainer's input scaling: uint8 pixels to [-1, 1], one channel.
    pixels = (images[:n].astype(np.float32) / 127.5 - 1).reshape(n, 1, *images.shape[1:])
    request = {"inputs": [{"name": "pixel_values", "datatype": "FP32", "shape": list(pixels.shape)}]}
    request["inputs"][0]["data"] = [round(float(v), 4) for v in pixels.ravel()]
    body = json.dumps(request).encode()
    log(f"POST {url} ({n} test images of the digits dataset {dataset.digest[:19]}...)")
    answer = json.loads(
        urllib.request.urlopen(urllib.request.Request(url, body, {"Content-Type": "application/json"}), timeout=30)
        .read()
        .decode()
    )
    out = next(o for o in answer["outputs"] if o["name"] == "logits")
    predicted = np.asarray(out["data"]).reshape(out["shape"]).argmax(1)
    log(f"answer from model {answer.get('model_name')} version {answer.get('model_version')}:")
    log(f"  predicted digits: {predicted.tolist()}")
    log(f"  true digits:      {labels[:n].tolist()}")
    first = {**request["inputs"][0], "shape": [1, *pixels.shape[1:]], "data": request["inputs"][0]["data"][:64]}
    curl = f"curl -s -H 'Content-Type: application/json' {url} -d '{json.dumps({'inputs': [first]})}'"
    print(f"[up] ask it yourself (one image, a {int(labels[0])}):\n  {curl}", file=sys.stderr)
    return 0 if (predicted == labels[:n]).sum() >= n // 2 else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait")
    w.add_argument("namespace")
    w.add_argument("--timeout", type=float, default=900)
    p = sub.add_parser("predict")
    p.add_argument("namespace")
    args = parser.parse_args()
    return wait(args.namespace, args.timeout) if args.command == "wait" else predict(args.namespace)


if __name__ == "__main__":
    sys.exit(main())
