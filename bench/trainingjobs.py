"""TrainingJob controller at scale, against the real local control plane (kwok nodes), in one run:

    .venv/bin/python -m bench.trainingjobs --jobs 1000 --churn-seconds 600

Run from the repository root: the cluster comes from the tests' helpers (tests/support/cluster.py).

1. raw limit: the same number of batch/v1 Jobs (the builder's, suspended so they start no pods) created directly
   with one async client (the same concurrency) -> Jobs/s; and N TrainingJobs created with no operator watching
   -> the ceiling 1 / (1/TJ rate + 1/Job rate): no operator can create Jobs faster than their TrainingJobs plus
   the Jobs can be written;
2. the operator (a subprocess, logged in as its ServiceAccount): (a) N suspended TrainingJobs (their Jobs start
   no pods, like the raw ones): create -> Job p50/p99 and Jobs/s against the raw limit; (b) N more, running
   (kwok starts their pods): from watch events, per job, create -> Job created and create -> Running in status;
   total time to converge; Jobs/s against the raw limit; operator RSS with 2N live TrainingJobs; API requests per
   reconcile (operator metrics);
3. churn: delete and create jobs in a loop for --churn-seconds with N live, each round waiting for the garbage
   collector to remove the deleted ones' Jobs; RSS growth from after the warm-up.

Uses KILN_TEST_KUBECONFIG when set, else starts its own cluster (hack/cluster.sh) and deletes it afterwards.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from kiln_operator.builders import trainingjob as b
from kiln_operator.kube import Client
from tests.support.cluster import Cluster, bench_cluster
from tests.support.net import free_port

REPO = Path(__file__).resolve().parents[1]

RUN_FOREVER = {"kwok.kiln.dev/run-for": "86400s"}


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def tj_body(name: str, ns: str, *, suspend: bool = False) -> dict[str, Any]:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "image": "kiln/trainer:bench",
            "dataset": {"uri": "file:///data/digits"},
            "podTemplate": {"metadata": {"annotations": RUN_FOREVER}},
            "suspend": suspend,
        },
    }


def bench_nodes(count: int) -> str:
    docs = []
    for i in range(count):
        docs.append(
            {
                "apiVersion": "v1",
                "kind": "Node",
                "metadata": {
                    "name": f"kiln-bench-{i}",
                    "annotations": {"kwok.x-k8s.io/node": "fake"},
                    "labels": {"type": "kwok", "kubernetes.io/hostname": f"kiln-bench-{i}"},
                },
                "spec": {},
                "status": {
                    "allocatable": {"cpu": "1000", "memory": "4Ti", "pods": "250"},
                    "capacity": {"cpu": "1000", "memory": "4Ti", "pods": "250"},
                },
            }
        )
    return yaml.safe_dump_all(docs)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


PROCESSES = ("operator", "bench", "kube-apiserver", "etcd", "kube-controller", "kube-scheduler", "kwok-controller")


def cpu_seconds(operator: int) -> dict[str, float]:
    """CPU time (user + system) so far of the control plane's processes, the operator and this load generator."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, float] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        comm = stat[stat.index("(") + 1 : stat.rindex(")")]
        pid = int(proc.name)
        name = "operator" if pid == operator else "bench" if pid == os.getpid() else comm
        if name in PROCESSES:
            fields = stat[stat.rindex(")") + 2 :].split()
            out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


def cpu_per_job(before: dict[str, float], after: dict[str, float], jobs: int) -> dict[str, float]:
    """Milliseconds of CPU per TrainingJob, by process: where the two cores went."""
    return {k: round(1000 * (after[k] - before.get(k, 0.0)) / jobs, 2) for k in sorted(after)}


def scrape(url: str) -> dict[str, float]:
    out: dict[str, float] = {}
    with urllib.request.urlopen(url, timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(("kiln_api_requests_total{", "kiln_reconciles_total{")):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
    return out


async def create_all(client: Client, objs: list[dict[str, Any]], concurrency: int) -> dict[str, float]:
    sem = asyncio.Semaphore(concurrency)
    done: dict[str, float] = {}

    async def one(obj: dict[str, Any]) -> None:
        async with sem:
            await client.create_or_get(obj)
            done[obj["metadata"]["name"]] = time.monotonic()

    await asyncio.gather(*(one(o) for o in objs))
    return done


async def watch(
    api: Any, path: str, seen: dict[str, float], running: dict[str, float] | None, gone: set[str] | None = None
) -> None:
    """A raw watch stream (JSON lines, no object model): the bench must not eat the CPU the operator needs."""
    base, _, rest = path.lstrip("/").partition("/")
    rv = ""
    while True:
        try:
            params = {"watch": "true", "allowWatchBookmarks": "true", "timeoutSeconds": "240"}
            if rv:
                params["resourceVersion"] = rv
            async with api.call_api(
                "GET", version="", base=f"/{base}", url=rest, params=params, stream=True, timeout=None
            ) as response:
                async for line in response.aiter_lines():
                    event = json.loads(line)
                    obj = event["object"]
                    rv = obj["metadata"].get("resourceVersion", rv)
                    name = obj["metadata"].get("name", "")
                    if event["type"] == "DELETED" and gone is not None:
                        gone.add(name)
                    if event["type"] not in ("ADDED", "MODIFIED"):
                        continue
                    seen.setdefault(name, time.monotonic())
                    if running is not None and (obj.get("status") or {}).get("phase") == "Running":
                        running.setdefault(name, time.monotonic())
        except asyncio.CancelledError:
            raise
        except Exception as e:  # the server closed the watch: reopen it where it stopped
            say(f"watch {path} reopened ({type(e).__name__})")


async def wait_gone(names: list[str], gone: set[str], limit: float) -> None:
    start = time.monotonic()
    while not gone.issuperset(names):
        if time.monotonic() - start > limit:
            raise SystemExit(f"timed out: {len(set(names) - gone)} Jobs of deleted TrainingJobs still there")
        await asyncio.sleep(0.2)  # polls a local set the watch fills, not the cluster


async def wait_count(what: str, d: dict[str, float], n: int, limit: float) -> None:
    start, last = time.monotonic(), -1
    while len(d) < n:
        if time.monotonic() - start > limit:
            raise SystemExit(f"timed out: {what}: {len(d)}/{n}")
        if len(d) // 100 != last // 100:
            say(f"{what}: {len(d)}/{n}")
            last = len(d)
        await asyncio.sleep(0.2)  # progress polling of a local dict, not a wait for cluster state


async def run(args: argparse.Namespace, cluster: Cluster, sa_kubeconfig: Path) -> None:
    import kr8s.asyncio

    client = await Client.connect()  # KUBECONFIG is the admin's here
    api = await kr8s.asyncio.api(kubeconfig=cluster.kubeconfig)
    n, c = args.jobs, args.concurrency

    # ---- 1. raw limit
    cluster.kubectl("create", "namespace", "bench-raw", check=False)
    raw_jobs = []
    for i in range(n):
        body = tj_body(f"raw-{i:04d}", "bench-raw") | {
            "metadata": {"name": f"raw-{i:04d}", "namespace": "bench-raw", "uid": "x"}
        }
        # Suspended: the same Job objects, but no pods, so they leave no work behind for the operator's phase
        # (a namespace of 1000 running Jobs takes minutes to delete); this is the API server's create limit.
        raw_jobs.append(b.indexed_job(body, 1, suspend=True))
    say(f"raw: creating {n} Jobs with one async client, concurrency {c}")
    cpu0 = cpu_seconds(0)
    t0 = time.monotonic()
    await create_all(client, raw_jobs, c)
    raw_seconds = time.monotonic() - t0
    raw_cpu = cpu_per_job(cpu0, cpu_seconds(0), n)
    raw_rate = n / raw_seconds
    say(f"raw: {n} Jobs in {raw_seconds:.1f}s = {raw_rate:.1f} Jobs/s (left in place: suspended, inert)")
    # The other half of the floor: the TrainingJobs themselves, created with no operator watching their namespace.
    # Every operator Job needs its TrainingJob created first on the same API server and cores, so no operator can
    # beat 1 / (1/TJ rate + 1/Job rate) Jobs/s here, status writes not even counted.
    cluster.kubectl("create", "namespace", "bench-raw-tj", check=False)
    cpu0 = cpu_seconds(0)
    t0 = time.monotonic()
    await create_all(client, [tj_body(f"raw-{i:04d}", "bench-raw-tj", suspend=True) for i in range(n)], c)
    tj_rate = n / (time.monotonic() - t0)
    say(f"raw: CPU ms per Job {raw_cpu}; per TrainingJob {cpu_per_job(cpu0, cpu_seconds(0), n)}")
    floor_rate = 1 / (1 / tj_rate + 1 / raw_rate)
    say(
        f"raw: {n} TrainingJobs alone at {tj_rate:.1f}/s; TrainingJob + its Job: at most {floor_rate:.1f} Jobs/s "
        f"= {floor_rate / raw_rate:.3f} of the Job rate"
    )

    # ---- 2. the operator
    ns = "bench-op"
    cluster.kubectl("create", "namespace", ns, check=False)
    cluster.kubectl("create", "namespace", "bench-suspended", check=False)
    metrics_port = free_port()
    log = open(args.log, "wb")  # noqa: SIM115, ASYNC230 - lives as long as the operator; setup, not hot path
    env = {
        **os.environ,
        "KUBECONFIG": str(sa_kubeconfig),
        "KILN_METRICS_ADDRESS": f"127.0.0.1:{metrics_port}",
    }
    op = subprocess.Popen(  # noqa: ASYNC220 - started once, before the measurement
        [
            sys.executable,
            "-m",
            "kiln_operator",
            "--namespace",
            ns,
            "--namespace",
            "bench-suspended",
            f"--metrics=127.0.0.1:{metrics_port}",
            f"--liveness=http://127.0.0.1:{free_port()}/healthz",
        ],
        env=env,
        stdout=log,
        stderr=log,
    )
    metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
    deadline = time.monotonic() + 60
    while True:
        try:
            scrape(metrics_url)
            break
        except OSError:
            if time.monotonic() > deadline or op.poll() is not None:
                raise SystemExit("operator did not start; see " + args.log) from None
            await asyncio.sleep(0.2)
    say(f"operator pid {op.pid} up, RSS {rss_mb(op.pid):.0f} MB idle")
    # ---- 2a. suspended TrainingJobs: the operator's own work against the raw limit, with no pods behind either
    susp_jobs: dict[str, float] = {}
    susp_watch = asyncio.create_task(watch(api, "/apis/batch/v1/namespaces/bench-suspended/jobs", susp_jobs, None))
    await asyncio.sleep(1)
    say(f"operator, suspended: creating {n} suspended TrainingJobs (their Jobs start no pods)")
    cpu0 = cpu_seconds(op.pid)
    t0 = time.monotonic()
    s_created = await create_all(client, [tj_body(f"s-{i:04d}", "bench-suspended", suspend=True) for i in range(n)], c)
    await wait_count("suspended Jobs created", susp_jobs, n, args.timeout)
    susp_watch.cancel()
    s_cpu = cpu_per_job(cpu0, cpu_seconds(op.pid), n)
    s_to_job = [susp_jobs[b.job_name(name, 1)] - s_created[name] for name in s_created]
    s_rate = n / (max(susp_jobs.values()) - t0)
    print(
        json.dumps(
            {
                "suspended_operator_jobs_per_s": round(s_rate, 1),
                "suspended_operator_vs_raw": round(s_rate / raw_rate, 3),
                "ceiling_tj_plus_job_per_s": round(floor_rate, 1),
                "ceiling_vs_raw": round(floor_rate / raw_rate, 3),
                "suspended_operator_vs_ceiling": round(s_rate / floor_rate, 3),
                "suspended_create_to_job_p50_s": round(statistics.median(s_to_job), 3),
                "suspended_create_to_job_p99_s": round(pct(s_to_job, 99), 3),
                "operator_rss_mb_after_suspended": round(rss_mb(op.pid), 1),
                "cpu_ms_per_trainingjob_suspended": s_cpu,
            },
            indent=1,
        ),
        flush=True,
    )

    # ---- 2b. running TrainingJobs: the full path, pods scheduled and started by kwok
    job_seen: dict[str, float] = {}
    job_gone: set[str] = set()
    tj_seen: dict[str, float] = {}
    running: dict[str, float] = {}
    watchers = [
        asyncio.create_task(watch(api, f"/apis/batch/v1/namespaces/{ns}/jobs", job_seen, None, job_gone)),
        asyncio.create_task(watch(api, f"/apis/kiln.dev/v1alpha1/namespaces/{ns}/trainingjobs", tj_seen, running)),
    ]
    try:
        await asyncio.sleep(1)  # let the watches open before the burst
        bodies = [tj_body(f"tj-{i:04d}", ns) for i in range(n)]
        say(f"operator: creating {n} TrainingJobs, concurrency {c}")
        t0 = time.monotonic()
        created = await create_all(client, bodies, c)
        create_seconds = time.monotonic() - t0
        await wait_count("Jobs created", job_seen, n, args.timeout)
        t_jobs = max(job_seen.values())
        await wait_count("Running in status", running, n, args.timeout)
        t_running = max(running.values())
        to_job = [job_seen[b.job_name(name, 1)] - created[name] for name in created]
        to_running = [running[name] - created[name] for name in created]
        op_rate = n / (t_jobs - t0)
        rss_live = rss_mb(op.pid)
        m = scrape(metrics_url)
        requests = sum(v for k, v in m.items() if k.startswith("kiln_api_requests_total"))
        passes = sum(v for k, v in m.items() if k.startswith("kiln_reconciles_total") and 'kind="TrainingJob"' in k)
        print(
            json.dumps(
                {
                    "jobs": n,
                    "concurrency": c,
                    "raw_jobs_per_s": round(raw_rate, 1),
                    "tj_create_burst_s": round(create_seconds, 1),
                    "operator_jobs_per_s": round(op_rate, 1),
                    "operator_vs_raw": round(op_rate / raw_rate, 3),
                    "raw_tj_create_per_s": round(tj_rate, 1),
                    "operator_vs_ceiling": round(op_rate / floor_rate, 3),
                    "create_to_job_p50_s": round(statistics.median(to_job), 3),
                    "create_to_job_p99_s": round(pct(to_job, 99), 3),
                    "create_to_running_p50_s": round(statistics.median(to_running), 3),
                    "create_to_running_p99_s": round(pct(to_running, 99), 3),
                    "converge_s": round(t_running - t0, 1),
                    "operator_rss_mb_with_2n_live": round(rss_live, 1),
                    # counters cover both bursts: 2n TrainingJobs
                    "api_requests": requests,
                    "reconcile_passes": passes,
                    "api_requests_per_reconcile": round(requests / max(passes, 1), 2),
                    "api_requests_per_trainingjob": round(requests / (2 * n), 2),
                    "reconcile_passes_per_trainingjob": round(passes / (2 * n), 2),
                },
                indent=1,
            ),
            flush=True,
        )

        # ---- 3. churn
        if args.churn_seconds > 0:
            say(f"churn: delete + create {args.churn_batch} jobs at a time for {args.churn_seconds}s, {n} live")
            live = sorted(created)
            serial = n
            samples: list[tuple[float, float]] = []
            start = time.monotonic()
            while time.monotonic() - start < args.churn_seconds:
                old, live = live[: args.churn_batch], live[args.churn_batch :]
                for name in old:
                    await client.delete("kiln.dev/v1alpha1", "TrainingJob", ns, name)
                # Wait for the garbage collector to remove their Jobs before the next round: a loop faster than the
                # control plane's GC piles up orphaned Jobs (and the pods the Job controller keeps making for them)
                # that every watcher caches, the operator included, so RSS would measure that backlog, not a leak.
                await wait_gone([b.job_name(name, 1) for name in old], job_gone, args.timeout)
                fresh = [tj_body(f"tj-{serial + i:04d}", ns) for i in range(args.churn_batch)]
                serial += args.churn_batch
                await create_all(client, fresh, c)
                live += [f["metadata"]["name"] for f in fresh]
                samples.append((time.monotonic() - start, rss_mb(op.pid)))
                if len(samples) % 10 == 0:
                    say(f"churn t={samples[-1][0]:.0f}s RSS {samples[-1][1]:.1f} MB, {serial} created in total")
            warm = [r for t, r in samples if t >= min(60.0, args.churn_seconds / 4)]
            base = statistics.median(warm[: max(1, len(warm) // 10)])
            end = statistics.median(warm[-max(1, len(warm) // 10) :])
            print(
                json.dumps(
                    {
                        "churn_seconds": args.churn_seconds,
                        "trainingjobs_created": serial,
                        "rss_mb_after_warmup": round(base, 1),
                        "rss_mb_at_end": round(end, 1),
                        "rss_growth_pct": round(100 * (end - base) / base, 2),
                        "rss_mb_max": round(max(r for _, r in samples), 1),
                    },
                    indent=1,
                ),
                flush=True,
            )
    finally:
        for w in watchers:
            w.cancel()
        op.terminate()
        op.wait(timeout=60)
        log.close()
        await client.close()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--churn-seconds", type=float, default=600)
    p.add_argument("--churn-batch", type=int, default=50)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--log", default=str(Path(tempfile.gettempdir()) / "kiln-bench-operator.log"))
    args = p.parse_args()
    with bench_cluster("kiln-bench") as (cluster, sa, _workdir):
        cluster.kubectl("apply", "-f", "-", stdin=bench_nodes(max(1, args.jobs // 200 + 1)))
        asyncio.run(run(args, cluster, sa))


if __name__ == "__main__":
    main()
