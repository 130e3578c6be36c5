"""ModelDeployment controller, against the real local control plane (kwok plays the serving pods), in one run:

    .venv/bin/python -m bench.modeldeployments

Run from the repository root: the cluster, Prometheus and the servers come from the tests' helpers (tests/support/).

1. create -> Ready: --sequential ModelDeployments one after the other (children created, kwok pods ready, status
   Ready with the right replicas), then --burst of them created at once; p50/p99/max;
2. new promoted artifact -> canary's first step: a ModelDeployment follows a ModelCompression; the compression is
   made anew from another model (kwok plays the compressor and reports the candidate), and we time from the moment
   its status.promoted names the new digest to the moment the candidate revision's Deployment exists; --promotions
   times;
3. a rollout of --burst ModelDeployments at once (a new artifact for all): time until every one serves it alone;
4. real inference servers on loopback (one per artifact) under steady load, a real Prometheus scraping them (the
   labels a PodMonitor gives each revision's pods) and the operator's analysis reading it: a full canary promotion,
   then a forced rollback (a p95 limit the candidate cannot meet). The load generator routes each request like
   the Service would, to the revisions whose pods are ready, in proportion to their ready replicas. Records
   requests, failed requests, and how long the rollback took after the first analysis was due.

Uses KILN_TEST_KUBECONFIG when set, else starts its own cluster (hack/cluster.sh) and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

import kiln_artifacts as ka
from kiln_operator.builders import modeldeployment as b
from kiln_operator.kube import Client
from tests.support.cluster import Cluster, bench_cluster
from tests.support.net import free_port
from tests.support.prometheus import prometheus_binary, run_prometheus
from tests.support.server import ServerProcess, image_request, onnx_artifact_of

REPO = Path(__file__).resolve().parents[1]

NS = "bench-md"


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def summary(values: list[float]) -> str:
    return f"p50 {pct(values, 50):.2f}s p99 {pct(values, 99):.2f}s max {max(values):.2f}s (n={len(values)})"


def md_body(name: str, uri: str, digest: str, **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "source": {"uri": uri, "digest": digest},
            "replicas": 2,
            "runtime": {"image": "kiln/server:bench"},
            # Small requests: the kwok nodes' capacity must not be what is measured.
            "resources": {"cpu": "50m", "memory": "64Mi"},
            "podTemplate": {"spec": {"terminationGracePeriodSeconds": 1}},
            **spec,
        },
    }


class Api:
    """Polling reads through the operator's own HTTP client (admin credentials here)."""

    def __init__(self, client: Client) -> None:
        self.client = client

    async def list(self, path: str) -> list[dict[str, Any]]:
        return (await self.client.get(path, path.rsplit("/", 1)[-1]))["items"]

    async def get(self, path: str) -> dict[str, Any] | None:
        try:
            return await self.client.get(path, "get")
        except Exception:
            return None

    async def mds(self) -> dict[str, dict[str, Any]]:
        return {
            m["metadata"]["name"]: m
            for m in await self.list(f"/apis/kiln.dev/v1alpha1/namespaces/{NS}/modeldeployments")
        }

    async def deployments(self) -> list[dict[str, Any]]:
        return await self.list(f"/apis/apps/v1/namespaces/{NS}/deployments")


def ready(md: dict[str, Any], digest: str) -> bool:
    st = md.get("status") or {}
    return (
        st.get("phase") == "Ready"
        and (st.get("current") or {}).get("digest") == digest
        and "candidate" not in st
        and st.get("observedGeneration") == md["metadata"].get("generation")
    )


async def until(what: str, probe: Any, limit: float = 300, every: float = 0.05) -> Any:
    start = time.monotonic()
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() - start > limit:
            raise SystemExit(f"timed out after {limit}s: {what}")
        await asyncio.sleep(every)  # polling the API for the state being timed


def digest_of(i: int) -> str:
    return "sha256:" + hashlib.sha256(str(i).encode()).hexdigest()


async def control_plane(
    args: argparse.Namespace, cluster: Cluster, api: Api, client: Client, tmp: Path
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    # ---- 1. create -> Ready
    seq = []
    for i in range(args.sequential):
        d = digest_of(1000 + i)
        t0 = time.monotonic()
        await client.create_or_get(md_body(f"seq-{i}", f"file:///models/seq-{i}", d))
        await until(f"seq-{i} Ready", lambda i=i, d=d: api_ready(api, f"seq-{i}", d))
        seq.append(time.monotonic() - t0)
    say(f"create -> Ready, one at a time: {summary(seq)}")
    out["create_to_ready_sequential_s"] = {"p50": pct(seq, 50), "p99": pct(seq, 99), "max": max(seq)}

    # Baseline: the same Deployments (the builder's), created directly: what the control plane and kwok take
    # alone to run ready pods; the operator's figure below is against it.
    raw_names = [f"raw-{i}" for i in range(args.burst)]
    raw_objs = [
        b.deployment(
            md_body(n, f"file:///models/{n}", digest_of(2000)),
            "raw",
            uri="file:///m",
            digest=None,
            number=1,
            role="stable",
            replicas=2,
            created=0,
        )
        for n in raw_names
    ]
    t0 = time.monotonic()
    await asyncio.gather(*(client.create_or_get(o) for o in raw_objs))
    raw_done: dict[str, float] = {}

    async def raw_ready() -> bool:
        for d in await api.deployments():
            n = d["metadata"]["name"]
            if n.startswith("raw-") and n not in raw_done and (d.get("status") or {}).get("readyReplicas") == 2:
                raw_done[n] = time.monotonic() - t0
        return len(raw_done) == len(raw_names)

    await until("raw Deployments ready", raw_ready)
    raw = list(raw_done.values())
    say(f"baseline: {args.burst} Deployments created directly -> 2/2 ready: {summary(raw)}")
    out["raw_deployments_ready_s"] = {"p50": pct(raw, 50), "p99": pct(raw, 99), "max": max(raw)}
    await asyncio.gather(*(client.delete("apps/v1", "Deployment", NS, o["metadata"]["name"]) for o in raw_objs))

    names = [f"burst-{i}" for i in range(args.burst)]
    t0 = time.monotonic()
    await asyncio.gather(*(client.create_or_get(md_body(n, f"file:///models/{n}", digest_of(2000))) for n in names))
    done: dict[str, float] = {}

    async def all_ready(digest: str) -> bool:
        mds = await api.mds()
        for n in names:
            if n not in done and n in mds and ready(mds[n], digest):
                done[n] = time.monotonic() - t0
        return len(done) == len(names)

    await until("burst Ready", lambda: all_ready(digest_of(2000)))
    burst = list(done.values())
    say(f"create -> Ready, {args.burst} at once: {summary(burst)}")
    say(f"  ratio to the baseline: p50 {pct(burst, 50) / pct(raw, 50):.2f}x, max {max(burst) / max(raw):.2f}x")
    out["create_to_ready_burst_s"] = {
        "p50": pct(burst, 50),
        "p99": pct(burst, 99),
        "max": max(burst),
        "p50_vs_raw": pct(burst, 50) / pct(raw, 50),
        "max_vs_raw": max(burst) / max(raw),
    }

    # ---- 3. a rollout of all of them at once (RollingUpdate: surge, then the old revision goes)
    patch = {"spec": {"source": {"uri": "file:///models/v2", "digest": digest_of(3000)}}}
    done.clear()
    t0 = time.monotonic()
    await asyncio.gather(*(client.patch("kiln.dev/v1alpha1", "ModelDeployment", NS, n, patch) for n in names))
    await until("rollout of the burst", lambda: all_ready(digest_of(3000)))
    roll = list(done.values())
    say(f"rollout of {args.burst} at once, new artifact -> serving it alone: {summary(roll)}")
    out["rollout_burst_s"] = {"p50": pct(roll, 50), "p99": pct(roll, 99), "max": max(roll), "all": max(roll)}

    # ---- 2. new promoted artifact -> the canary's first step
    arts = []
    for i in range(args.promotions + 1):
        folder = tmp / f"cand-{i}"
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"candidate %d" % i * 64)
        arts.append(ka.publish(folder, f"file://{tmp}/candidates/{i}", format="onnx"))
    src = tmp / "src"
    src.mkdir()
    (src / "model.bin").write_bytes(b"weights")
    source = ka.publish(src, f"file://{tmp}/source", format="hf-transformers")
    canary = {
        "strategy": "Canary",
        "steps": [{"weight": 50}, {"weight": 100}],  # held at step 0 (no pause: a person would approve)
        "analysis": {"intervalSeconds": 60, "minRequests": 0},
    }
    follower = md_body("follower", "", "", rollout=canary)
    follower["spec"]["source"] = {"modelCompressionRef": {"name": "compress"}}
    await client.create_or_get(compression(source, arts[0]))
    await client.create_or_get(follower)
    await until("follower serving the first promotion", lambda: api_ready(api, "follower", arts[0].digest), limit=120)
    lat = []
    for i in range(1, args.promotions + 1):
        await client.delete("kiln.dev/v1alpha1", "ModelCompression", NS, "compress")
        await until("compression gone", lambda: gone(api, "modelcompressions", "compress"))
        await client.create_or_get(compression(source, arts[i]))
        key = arts[i].digest[7:17]

        async def promoted(d: str = arts[i].digest) -> float | None:
            mc = await api.get(f"/apis/kiln.dev/v1alpha1/namespaces/{NS}/modelcompressions/compress")
            return (
                time.monotonic() if mc and ((mc.get("status") or {}).get("promoted") or {}).get("digest") == d else None
            )

        async def first_step(k: str = key) -> float | None:
            deps = await api.deployments()
            return time.monotonic() if any(d["metadata"]["name"] == f"follower-{k}" for d in deps) else None

        # Both polled together: the gap between the two moments is what the controller adds.
        t_promoted, t_step = None, None
        start = time.monotonic()
        while t_step is None or t_promoted is None:
            p, s = await asyncio.gather(promoted(), first_step())
            t_promoted = t_promoted or p
            t_step = t_step or s
            if time.monotonic() - start > 120:
                raise SystemExit("timed out: promotion -> canary")
            await asyncio.sleep(0.02)
        lat.append(max(0.0, t_step - t_promoted))
        say(f"promotion {i}: promoted -> canary Deployment {lat[-1]:.2f}s")
    say(f"new promoted artifact -> canary's first step: {summary(lat)}")
    out["promotion_to_first_step_s"] = {"p50": pct(lat, 50), "max": max(lat), "n": len(lat)}
    return out


async def api_ready(api: Api, name: str, digest: str) -> bool:
    md = await api.get(f"/apis/kiln.dev/v1alpha1/namespaces/{NS}/modeldeployments/{name}")
    return bool(md and ready(md, digest))


async def gone(api: Api, plural: str, name: str) -> bool:
    return await api.get(f"/apis/kiln.dev/v1alpha1/namespaces/{NS}/{plural}/{name}") is None


def compression(source: ka.Artifact, candidate: ka.Artifact) -> dict[str, Any]:
    gate = {"name": "maxAccuracyDrop", "passed": True, "value": 0.0, "threshold": 0.01}
    message = {
        "exitCode": 0,
        "reason": "Succeeded",
        "artifact": {"uri": candidate.uri, "digest": candidate.digest},
        "gatesPassed": True,
        "report": {"sizeRatio": 0.3, "accuracyDrop": 0.0, "gates": [gate]},
    }
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelCompression",
        "metadata": {"name": "compress", "namespace": NS},
        "spec": {
            "image": "kiln/compressor:bench",
            "source": {"uri": source.uri, "digest": source.digest},
            "recipe": {"steps": [{"export": {}}, {"quantize": {"mode": "Dynamic"}}]},
            "evaluation": {"dataset": {"uri": "file:///data/digits"}},
            "podTemplate": {
                "metadata": {
                    "annotations": {"kwok.kiln.dev/run-for": "0s", "kwok.kiln.dev/message": json.dumps(message)}
                },
                "spec": {"terminationGracePeriodSeconds": 1},
            },
        },
    }


class Router:
    """The Service, for real servers: each request goes to a revision in proportion to its ready pods (kwok's),
    and to that revision's server process on loopback."""

    def __init__(self, servers: dict[str, ServerProcess], clients: int) -> None:
        self.servers = servers
        self.weights: dict[str, int] = {}
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.sent: dict[str, int] = {k: 0 for k in servers}
        self.failed: dict[str, int] = {k: 0 for k in servers}
        self.threads = [threading.Thread(target=self.run, args=(i,), daemon=True) for i in range(clients)]

    def run(self, i: int) -> None:
        rng = np.random.default_rng(i)
        pick = random.Random(i)
        while not self.stop.is_set():
            with self.lock:
                weights = dict(self.weights)
            if not weights:
                self.stop.wait(0.01)
                continue
            key = pick.choices(list(weights), list(weights.values()))[0]
            doc = image_request(rng.random((1, 1, 8, 8), dtype=np.float32))
            try:
                code = self.servers[key].infer(doc)[0]
            except OSError:
                code = -1
            with self.lock:
                self.sent[key] += 1
                if code != 200:
                    self.failed[key] += 1
            self.stop.wait(0.01)

    def start(self) -> Router:
        for t in self.threads:
            t.start()
        return self

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(10)


async def real_servers(
    args: argparse.Namespace, cluster: Cluster, api: Api, client: Client, tmp: Path, start_operator: Any
) -> dict[str, Any]:
    import torch

    from kiln_artifacts.models import KilnCNN

    arts = []
    for i in range(3):
        root = tmp / f"real-{i}"
        root.mkdir()
        torch.manual_seed(i)
        uri, _ = onnx_artifact_of(str(root), KilnCNN(10).eval())
        arts.append(ka.load(uri))
    keys = [a.digest[7:17] for a in arts]
    servers = {k: ServerProcess(tmp, a.uri, name="digits").start() for k, a in zip(keys, arts, strict=True)}
    for s in servers.values():
        s.wait_ready()
    say("3 real servers ready on loopback")
    labels = {"namespace": NS, "kiln_dev_modeldeployment": "live"}
    targets = [(f"127.0.0.1:{s.metrics_port}", {**labels, "kiln_dev_revision": k}) for k, s in servers.items()]
    out: dict[str, Any] = {}
    router = Router(servers, args.clients)
    with run_prometheus(tmp, targets) as prometheus:
        op = start_operator({"KILN_PROMETHEUS_URL": prometheus})
        try:
            interval = args.interval
            analysis = {"intervalSeconds": interval, "minRequests": 50, "maxErrorRate": 0.01}
            rollout = {
                "strategy": "Canary",
                "steps": [{"weight": 50, "pauseSeconds": 0}, {"weight": 100, "pauseSeconds": 0}],
                "analysis": analysis,
            }
            body = md_body("live", arts[0].uri, arts[0].digest, rollout=rollout)
            await client.create_or_get(body)
            await until("live Ready", lambda: api_ready(api, "live", arts[0].digest), limit=120)
            router.start()

            async def route() -> None:
                while not router.stop.is_set():
                    deps = await api.deployments()
                    weights = {}
                    for d in deps:
                        k = d["metadata"]["labels"].get("kiln.dev/revision")
                        if d["metadata"]["labels"].get("app.kubernetes.io/instance") == "live" and k in servers:
                            n = (d.get("status") or {}).get("readyReplicas") or 0
                            if n and not d["metadata"].get("deletionTimestamp"):
                                weights[k] = n
                    with router.lock:
                        router.weights = weights
                    await asyncio.sleep(0.1)  # the endpoints controller's pace, roughly

            router_task = asyncio.create_task(route())
            await asyncio.sleep(3)  # steady load before the rollout starts
            # Full canary promotion.
            t0 = time.monotonic()
            patch = {"spec": {"source": {"uri": arts[1].uri, "digest": arts[1].digest}}}
            await client.patch("kiln.dev/v1alpha1", "ModelDeployment", NS, "live", patch)
            await until("canary promoted", lambda: api_ready(api, "live", arts[1].digest), limit=300)
            promo = time.monotonic() - t0
            st = (await api.get(f"/apis/kiln.dev/v1alpha1/namespaces/{NS}/modeldeployments/live"))["status"]
            with router.lock:
                sent_p, failed_p = dict(router.sent), dict(router.failed)
            say(f"canary promotion: {promo:.1f}s; requests {sum(sent_p.values())}, failed {sum(failed_p.values())}")
            out["promotion"] = {
                "seconds": promo,
                "requests": sum(sent_p.values()),
                "failed": sum(failed_p.values()),
                "by_revision": sent_p,
                "last_analysis": st.get("analysis"),
            }
            # Forced rollback: a p95 limit no server meets.
            strict = {**rollout, "analysis": {**analysis, "maxP95LatencyMs": 0.001}}
            patch = {"spec": {"rollout": strict, "source": {"uri": arts[2].uri, "digest": arts[2].digest}}}
            await client.patch("kiln.dev/v1alpha1", "ModelDeployment", NS, "live", patch)
            cand = f"live-{keys[2]}"

            async def step_started() -> float | None:
                for d in await api.deployments():
                    if d["metadata"]["name"] == cand:
                        when = (d["metadata"].get("annotations") or {}).get("kiln.dev/step-started")
                        return float(when) if when else None
                return None

            started = await until("rollback candidate at step 0", step_started, limit=120)

            async def rolled_back() -> dict[str, Any] | None:
                md = await api.get(f"/apis/kiln.dev/v1alpha1/namespaces/{NS}/modeldeployments/live")
                conds = {c["type"]: c for c in (md or {}).get("status", {}).get("conditions", [])}
                deps = [d["metadata"]["name"] for d in await api.deployments()]
                rb = conds.get("RolledBack", {})
                return md if rb.get("status") == "True" and cand not in deps else None

            md = await until("rolled back", rolled_back, limit=300)
            took = time.time() - started
            due = took - interval  # the first analysis is due one interval after the step's pods are ready
            with router.lock:
                sent_r = {k: router.sent[k] - sent_p[k] for k in router.sent}
                failed_r = {k: router.failed[k] - failed_p[k] for k in router.failed}
            rb = next(c for c in md["status"]["conditions"] if c["type"] == "RolledBack")
            say(
                f"forced rollback: {took:.1f}s after the step began ({due:.1f}s after the first analysis was due, "
                f"interval {interval}s); requests {sum(sent_r.values())}, failed {sum(failed_r.values())}"
            )
            say(f"  RolledBack: {rb['reason']}: {rb['message'][:200]}")
            out["rollback"] = {
                "seconds_after_step_began": took,
                "seconds_after_first_analysis_due": due,
                "interval": interval,
                "requests": sum(sent_r.values()),
                "failed": sum(failed_r.values()),
                "by_revision": sent_r,
                "reason": rb["reason"],
            }
            router.stop.set()
            router_task.cancel()
        finally:
            router.close()
            op.terminate()
            op.wait(60)
            for s in servers.values():
                s.kill()
    return out


async def run(args: argparse.Namespace, cluster: Cluster, sa_kubeconfig: Path, tmp: Path) -> None:
    client = await Client.connect()
    api = Api(client)
    store = tmp / "store"
    store.mkdir()
    cluster.kubectl("create", "namespace", NS, check=False)
    log = open(args.log, "wb")  # noqa: SIM115, ASYNC230 - lives as long as the operators

    def start_operator(extra: dict[str, str]) -> subprocess.Popen[bytes]:
        env = {
            **os.environ,
            "KUBECONFIG": str(sa_kubeconfig),
            "KILN_ARTIFACT_ROOT": f"file://{store}",
            **extra,
        }
        return subprocess.Popen(
            [
                sys.executable,
                "-m",
                "kiln_operator",
                "--namespace",
                NS,
                f"--metrics=127.0.0.1:{free_port()}",
                f"--liveness=http://127.0.0.1:{free_port()}/healthz",
            ],
            env=env,
            stdout=log,
            stderr=log,
        )

    results: dict[str, Any] = {}
    try:
        op = start_operator({})
        try:
            results["control_plane"] = await control_plane(args, cluster, api, client, tmp)
        finally:
            op.terminate()
            op.wait(60)
        if prometheus_binary() is None:
            say("prometheus not installed (hack/prometheus.sh): skipping the real-server part")
        else:
            results["real_servers"] = await real_servers(args, cluster, api, client, tmp, start_operator)
        print(json.dumps(results, indent=1, default=str), flush=True)
    finally:
        log.close()
        await client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sequential", type=int, default=10)
    p.add_argument("--burst", type=int, default=20)
    p.add_argument("--promotions", type=int, default=5)
    p.add_argument("--clients", type=int, default=4, help="load generator threads (part 4)")
    p.add_argument("--interval", type=int, default=10, help="analysis interval in seconds (part 4)")
    p.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "kiln-bench-md-operator.log"))
    args = p.parse_args()
    with bench_cluster("kiln-bench-md") as (cluster, sa, workdir):
        cluster.kubectl("delete", "namespace", NS, "--wait=true", check=False)
        asyncio.run(run(args, cluster, sa, workdir))


if __name__ == "__main__":
    main()
