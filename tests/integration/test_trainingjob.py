"""The TrainingJob controller on the real control plane: kwok plays the kubelet (pods run, succeed, fail, get
evicted or stay unschedulable, via the kwok.kiln.dev/* hooks in hack/kwok/kwokctl.yaml), the real scheduler
places pods on the kwok GPU nodes, and the real Job controller runs the Indexed Jobs."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support.cluster import OPERATOR_KUBECONFIG_ENV, Cluster, Operator, free_port
from support.waiting import wait_for

DIGEST = "sha256:" + "5e" * 32


@pytest.fixture(autouse=True)
def fast_progress_poll(monkeypatch):
    monkeypatch.setenv("KILN_PROGRESS_POLL_SECONDS", "1")


def trainingjob(name: str, **spec) -> dict:
    annotations = spec.pop("pod_annotations", None)
    body = {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": name},
        "spec": {"image": "kiln/trainer:test", "dataset": {"uri": "file:///data/digits"}, **spec},
    }
    # kwok honours the grace period: with the trainer's 300 s, pods deleted by a test would hold their GPUs for
    # 5 minutes and starve the next test's pods.
    body["spec"]["podTemplate"] = {"spec": {"terminationGracePeriodSeconds": 1}}
    if annotations:
        body["spec"]["podTemplate"]["metadata"] = {"annotations": annotations}
    return body


def apply(cluster: Cluster, ns: str, *bodies: dict) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump_all(bodies))


def status(cluster: Cluster, ns: str, name: str) -> dict:
    return cluster.get("trainingjob", name, "-n", ns).get("status") or {}


def phase_is(cluster: Cluster, ns: str, name: str, *phases: str):
    return lambda: (s := status(cluster, ns, name)).get("phase") in phases and s


def condition(st: dict, type_: str) -> dict:
    return next(c for c in st["conditions"] if c["type"] == type_)


def jobs(cluster: Cluster, ns: str, name: str) -> list[dict]:
    return cluster.get("jobs", "-n", ns, "-l", f"kiln.dev/trainingjob={name}")["items"]


def pods(cluster: Cluster, ns: str, name: str, attempt: int) -> list[dict]:
    items = cluster.get("pods", "-n", ns, "-l", f"kiln.dev/trainingjob={name},kiln.dev/attempt={attempt}")["items"]
    return sorted(items, key=lambda p: p["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"])


def events(cluster: Cluster, ns: str, name: str) -> list[str]:
    items = cluster.get("events", "-n", ns, "--field-selector", f"involvedObject.name={name}")["items"]
    return [e["reason"] for e in items]


def env_of(pod_or_job: dict) -> dict:
    spec = pod_or_job["spec"].get("template", {}).get("spec") or pod_or_job["spec"]
    return {e["name"]: e.get("value") for e in spec["containers"][0]["env"]}


def test_single_node_succeeds_with_its_artifact(cluster: Cluster, namespace: str, operator: Operator):
    report = {
        "exitCode": 0,
        "reason": "Succeeded",
        "step": 120,
        "totalSteps": 120,
        "metrics": {"eval_accuracy": 0.97},
        "artifact": {"uri": "s3://models/team/run", "digest": DIGEST},
    }
    body = trainingjob(
        "single",
        resources={"gpus": 2, "cpu": "4", "memory": "8Gi"},
        pod_annotations={"kwok.kiln.dev/run-for": "2s", "kwok.kiln.dev/message": json.dumps(report)},
    )
    apply(cluster, namespace, body)
    st = wait_for(phase_is(cluster, namespace, "single", "Succeeded", "Failed"), what="single finished", timeout=60)
    assert st["phase"] == "Succeeded", st
    assert st["artifact"] == {
        "uri": "s3://models/team/run",
        "digest": DIGEST,
        "shortDigest": "5e" * 6,
        "format": "hf-transformers",
        "metrics": {"eval_accuracy": 0.97},
    }
    assert condition(st, "ModelReady")["status"] == "True"
    assert condition(st, "Ready")["status"] == "True"
    assert st["attempt"] == 1
    assert st["restarts"] == {"infrastructure": 0, "user": 0}
    assert st["observedGeneration"] == 1
    assert st["gpuSeconds"] >= 2  # 2 GPUs for at least the pod's run time (kwok rounds to seconds)
    (job,) = jobs(cluster, namespace, "single")
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["limits"] == {"cpu": "4", "memory": "8Gi", "nvidia.com/gpu": "2"}
    env = env_of(job)
    assert env["MASTER_ADDR"] == "127.0.0.1"
    assert env["WORLD_SIZE"] == "2"
    assert env["PET_NPROC_PER_NODE"] == "2"
    assert job["metadata"]["ownerReferences"][0]["kind"] == "TrainingJob"
    (pod,) = pods(cluster, namespace, "single", 1)
    assert pod["spec"]["nodeName"].startswith("kiln-gpu-")  # toleration added, scheduled on a GPU node
    reasons = wait_for(lambda: (r := events(cluster, namespace, "single")) and "Succeeded" in r and r, what="events")
    assert "Succeeded" in reasons
    assert not cluster.get("services", "-n", namespace)["items"]  # one node needs no rendezvous Service


def test_multi_node_gets_the_torchrun_environment(cluster: Cluster, namespace: str, operator: Operator):
    body = trainingjob("multi", nodes=2, resources={"gpus": 8}, pod_annotations={"kwok.kiln.dev/run-for": "2s"})
    apply(cluster, namespace, body)
    st = wait_for(phase_is(cluster, namespace, "multi", "Succeeded", "Failed"), what="multi finished", timeout=60)
    assert st["phase"] == "Succeeded", st
    # No artifact reported (the trainer wrote no message): the model is not ready, and says why.
    assert condition(st, "ModelReady")["reason"] == "NoArtifact"
    ranks = pods(cluster, namespace, "multi", 1)
    assert len(ranks) == 2
    assert {p["spec"]["nodeName"] for p in ranks} == {"kiln-gpu-0", "kiln-gpu-1"}  # 8 GPUs each: one per node
    for p in ranks:
        env = env_of(p)
        assert env["MASTER_ADDR"] == env["PET_MASTER_ADDR"] == "multi-1-0.multi-svc"
        assert env["PET_NNODES"] == "2"
        assert env["WORLD_SIZE"] == "16"
        assert p["spec"]["subdomain"] == "multi-svc"
    svc = cluster.get("service", "multi-svc", "-n", namespace)
    assert svc["spec"]["clusterIP"] == "None"


def test_insufficient_gpus_is_pending_with_the_schedulers_reason(cluster: Cluster, namespace: str, operator: Operator):
    apply(cluster, namespace, trainingjob("greedy", resources={"gpus": 16}))
    st = wait_for(
        lambda: (
            (s := status(cluster, namespace, "greedy")).get("conditions")
            and condition(s, "Ready")["reason"] == "Unschedulable"
            and s
        ),
        what="greedy Unschedulable",
    )
    assert st["phase"] == "Pending"
    assert "Insufficient nvidia.com/gpu" in condition(st, "Ready")["message"]
    assert "Unschedulable" in events(cluster, namespace, "greedy")


def test_a_failed_rank_restarts_the_whole_group_from_the_checkpoint(
    cluster: Cluster, namespace: str, operator: Operator
):
    apply(
        cluster,
        namespace,
        trainingjob("rank", nodes=2, resources={"gpus": 4}, pod_annotations={"kwok.kiln.dev/run-for": "600s"}),
    )
    wait_for(phase_is(cluster, namespace, "rank", "Running"), what="rank Running")
    checkpoint = {"step": 300, "uri": "s3://ckpt/rank/step-00000300", "time": "2026-11-22T08:00:00Z"}
    message = {"exitCode": 4, "reason": "Infrastructure", "message": "NCCL timeout", "lastCheckpoint": checkpoint}
    failing = pods(cluster, namespace, "rank", 1)[1]["metadata"]["name"]
    cluster.kubectl(
        "annotate",
        "-n",
        namespace,
        "pod",
        failing,
        "kwok.kiln.dev/exit-code=4",
        f"kwok.kiln.dev/message={json.dumps(message)}",
    )
    st = wait_for(
        lambda: (s := status(cluster, namespace, "rank")).get("attempt") == 2 and s.get("phase") == "Running" and s,
        what="attempt 2 running",
    )
    assert st["restarts"] == {"infrastructure": 1, "user": 0}
    assert st["failure"]["class"] == "Infrastructure"
    assert "NCCL timeout" in st["failure"]["message"]
    assert st["failure"]["pod"] == failing
    assert st["lastCheckpoint"]["uri"] == checkpoint["uri"]
    # The whole first attempt is gone, not just the failed rank; the new one knows where to resume.
    wait_for(
        lambda: [j["metadata"]["name"] for j in jobs(cluster, namespace, "rank")] == ["rank-2"], what="rank-1 gone"
    )
    (job,) = jobs(cluster, namespace, "rank")
    assert job["metadata"]["annotations"]["kiln.dev/resume-from"] == checkpoint["uri"]
    assert len(pods(cluster, namespace, "rank", 2)) == 2
    assert "Restarting" in events(cluster, namespace, "rank")


def test_preemption_restarts_without_spending_the_budget(cluster: Cluster, namespace: str, operator: Operator):
    body = trainingjob(
        "preempted",
        resources={"gpus": 1},
        runPolicy={"maxInfraRetries": 0, "maxUserRetries": 0},
        pod_annotations={"kwok.kiln.dev/run-for": "600s"},
    )
    apply(cluster, namespace, body)
    for attempt in (1, 2):
        wait_for(
            lambda a=attempt: (
                (s := status(cluster, namespace, "preempted")).get("attempt") == a and s.get("phase") == "Running"
            ),
            what=f"attempt {attempt} running",
        )
        (victim,) = pods(cluster, namespace, "preempted", attempt)
        cluster.kubectl(
            "annotate", "-n", namespace, "pod", victim["metadata"]["name"], "kwok.kiln.dev/evict=PreemptionByScheduler"
        )
    st = wait_for(
        lambda: (s := status(cluster, namespace, "preempted")).get("attempt") == 3 and s,
        what="attempt 3 after two preemptions",
    )
    assert st["phase"] in ("Restarting", "Running")
    assert st["preemptions"] == 2
    assert st["restarts"] == {"infrastructure": 0, "user": 0}  # both budgets are 0: a counted failure would fail it
    assert st["failure"]["class"] == "Preemption"
    assert st["failure"]["reason"] == "PreemptionByScheduler"


@pytest.mark.parametrize(
    ("annotations", "cls", "needle"),
    [
        (
            {
                "kwok.kiln.dev/exit-code": "2",
                "kwok.kiln.dev/message": json.dumps(
                    {"exitCode": 2, "reason": "UserError", "message": "dataset.uri: no train split in file:///data"}
                ),
            },
            "UserError",
            "dataset.uri: no train split",
        ),
        (
            {"kwok.kiln.dev/exit-code": "137", "kwok.kiln.dev/reason": "OOMKilled"},
            "OutOfMemory",
            "raise resources.memory",
        ),
        (
            {
                "kwok.kiln.dev/exit-code": "1",
                "kwok.kiln.dev/message": "Traceback (most recent call last):\nKeyError: 'x'",
            },
            "Unknown",
            "exited with code 1",
        ),
    ],
    ids=["user-error", "oom", "crash-with-log-tail"],
)
def test_user_failures_fail_fast_with_the_message(
    cluster: Cluster, namespace: str, operator: Operator, annotations, cls, needle
):
    body = trainingjob(
        "broken", resources={"memory": "2Gi"}, runPolicy={"maxUserRetries": 1}, pod_annotations=annotations
    )
    apply(cluster, namespace, body)
    st = wait_for(phase_is(cluster, namespace, "broken", "Failed"), what="broken Failed", timeout=90)
    assert st["failure"]["class"] == cls
    assert needle in st["failure"]["message"]
    assert "maxUserRetries=1 used up" in st["failure"]["message"]
    assert st["attempt"] == 2
    assert st["restarts"]["user"] == 1
    assert condition(st, "Stalled")["status"] == "True"
    assert condition(st, "Failed")["reason"] == st["failure"]["reason"]
    if cls == "Unknown":
        assert "KeyError: 'x'" in st["failure"]["logTail"]
    assert {"Restarting", "Failed"} <= set(events(cluster, namespace, "broken"))


def test_startup_deadline_fails_a_job_whose_image_never_pulls(cluster: Cluster, namespace: str, operator: Operator):
    body = trainingjob(
        "nopull",
        runPolicy={"startupDeadlineSeconds": 30},
        pod_annotations={"kwok.kiln.dev/waiting-reason": "ImagePullBackOff"},
    )
    apply(cluster, namespace, body)
    st = wait_for(
        lambda: (
            (s := status(cluster, namespace, "nopull")).get("conditions")
            and condition(s, "Ready")["reason"] == "ImagePullBackOff"
            and s
        ),
        what="ImagePullBackOff reported",
    )
    assert st["phase"] == "Pending"
    st = wait_for(phase_is(cluster, namespace, "nopull", "Failed"), what="startup deadline", timeout=90)
    assert st["failure"]["reason"] == "StartupDeadlineExceeded"
    assert "ImagePullBackOff" in st["failure"]["message"]
    wait_for(lambda: not jobs(cluster, namespace, "nopull"), what="the stuck attempt deleted")


def test_progress_reaches_status_and_a_silent_trainer_is_restarted(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path
):
    checkpoints = tmp_path / "ckpt"
    checkpoints.mkdir()
    body = trainingjob(
        "quiet",
        checkpoint={"uri": f"file://{checkpoints}"},
        runPolicy={"progressDeadlineSeconds": 60},
        pod_annotations={"kwok.kiln.dev/run-for": "600s"},
    )
    apply(cluster, namespace, body)
    wait_for(phase_is(cluster, namespace, "quiet", "Running"), what="quiet Running")
    beat = time.time()
    progress = {
        "phase": "Running",
        "step": 40,
        "totalSteps": 400,
        "loss": 0.75,
        "samplesPerSecond": 1200.5,
        "etaSeconds": 60,
        "heartbeat": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(beat)),
        "lastCheckpoint": {"step": 40, "uri": f"file://{checkpoints}/step-00000040", "time": "2026-11-22T08:00:00Z"},
    }
    (checkpoints / "progress.json").write_text(json.dumps(progress))
    st = wait_for(
        lambda: (s := status(cluster, namespace, "quiet")).get("progress", {}).get("step") == 40 and s,
        what="progress in status",
        timeout=30,
    )
    assert time.time() - beat < 30  # the promised bound: progress reaches status within 30 s of being reported
    assert st["progress"]["percent"] == 10
    assert st["progress"]["loss"] == 0.75
    assert st["lastCheckpoint"]["step"] == 40
    # No further heartbeat: after the 60 s deadline the attempt is replaced (infrastructure budget).
    st = wait_for(
        lambda: (s := status(cluster, namespace, "quiet")).get("attempt") == 2 and s, what="restart", timeout=120
    )
    assert st["failure"]["reason"] == "ProgressDeadlineExceeded"
    assert st["restarts"]["infrastructure"] == 1


def test_suspend_and_resume(cluster: Cluster, namespace: str, operator: Operator):
    apply(cluster, namespace, trainingjob("pausable", pod_annotations={"kwok.kiln.dev/run-for": "600s"}))
    wait_for(phase_is(cluster, namespace, "pausable", "Running"), what="Running")
    cluster.kubectl("patch", "-n", namespace, "trainingjob/pausable", "--type=merge", "-p", '{"spec":{"suspend":true}}')
    st = wait_for(phase_is(cluster, namespace, "pausable", "Suspended"), what="Suspended")
    assert condition(st, "Suspended")["status"] == "True"
    (job,) = jobs(cluster, namespace, "pausable")
    assert job["spec"]["suspend"] is True
    wait_for(lambda: not pods(cluster, namespace, "pausable", 1), what="pods stopped")
    cluster.kubectl(
        "patch", "-n", namespace, "trainingjob/pausable", "--type=merge", "-p", '{"spec":{"suspend":false}}'
    )
    st = wait_for(phase_is(cluster, namespace, "pausable", "Running"), what="Running again")
    assert st["attempt"] == 1
    assert st["restarts"] == {"infrastructure": 0, "user": 0}


def test_ttl_deletes_children_then_the_trainingjob(cluster: Cluster, namespace: str, operator: Operator):
    body = trainingjob(
        "shortlived",
        nodes=2,
        runPolicy={"childrenTtlSecondsAfterFinished": 0, "ttlSecondsAfterFinished": 8},
        pod_annotations={"kwok.kiln.dev/run-for": "1s"},
    )
    apply(cluster, namespace, body)
    wait_for(phase_is(cluster, namespace, "shortlived", "Succeeded"), what="Succeeded")
    wait_for(lambda: not jobs(cluster, namespace, "shortlived"), what="Jobs deleted")
    wait_for(
        lambda: cluster.kubectl("get", "service", "shortlived-svc", "-n", namespace, check=False).returncode != 0,
        what="Service deleted",
    )
    assert status(cluster, namespace, "shortlived")["phase"] == "Succeeded"  # the record outlives its children
    wait_for(
        lambda: cluster.kubectl("get", "trainingjob", "shortlived", "-n", namespace, check=False).returncode != 0,
        what="TrainingJob deleted",
        timeout=60,
    )


def start_operator_process(namespace: str, log: Path) -> subprocess.Popen:
    env = {
        **os.environ,
        "KUBECONFIG": os.environ[OPERATOR_KUBECONFIG_ENV],
    }
    liveness = f"--liveness=http://127.0.0.1:{free_port()}/healthz"
    cmd = [sys.executable, "-m", "kiln_operator", "--namespace", namespace, "--metrics=127.0.0.1:0", liveness]
    return subprocess.Popen(cmd, env=env, stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def test_sigkilled_operator_never_duplicates_and_converges(
    cluster: Cluster, crds: None, namespace: str, tmp_path: Path
):
    """A burst of jobs (half of them fail once and restart) while the operator is SIGKILLed at random moments."""
    rng = random.Random(int(os.environ.get("KILN_CHAOS_SEED", "7")))
    log = tmp_path / "operator.log"
    names = [f"burst-{i:02d}" for i in range(24)]
    bodies = []
    for i, name in enumerate(names):
        annotations = {"kwok.kiln.dev/run-for": f"{rng.randint(1, 6)}s"}
        if i % 2:  # the first attempt of every odd job fails (infrastructure), the retry then succeeds
            annotations = {"kwok.kiln.dev/exit-code": "4", "kwok.kiln.dev/fail-after": f"{rng.randint(1, 4)}s"}
        nodes = 2 if i % 2 else 1  # the failing ones run 2 ranks: a whole group is replaced, and they get a Service
        bodies.append(trainingjob(name, nodes=nodes, runPolicy={"maxInfraRetries": 3}, pod_annotations=annotations))
    proc = start_operator_process(namespace, log)
    healed = False
    try:
        apply(cluster, namespace, *bodies)
        for _ in range(4):
            deadline = time.monotonic() + rng.uniform(1.5, 5.0)
            wait_for(
                lambda d=deadline, p=proc: time.monotonic() >= d or p.poll() is not None,
                what="chaos tick",
                interval=0.05,
            )
            assert proc.poll() is None, log.read_text()[-4000:]
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
            if not healed:  # later attempts of the failing jobs run a healthy template (a spec change, applied
                healed = True  # to the next attempt)
                hook = {
                    "kwok.kiln.dev/exit-code": None,
                    "kwok.kiln.dev/fail-after": None,
                    "kwok.kiln.dev/run-for": "2s",
                }
                patch = json.dumps({"spec": {"podTemplate": {"metadata": {"annotations": hook}}}})
                for name in names[1::2]:
                    cluster.kubectl("patch", "-n", namespace, f"trainingjob/{name}", "--type=merge", "-p", patch)
            proc = start_operator_process(namespace, log)

        def converged():
            items = cluster.get("trainingjobs", "-n", namespace)["items"]
            done = [t for t in items if (t.get("status") or {}).get("phase") == "Succeeded"]
            return len(done) == len(names) and items

        items = wait_for(converged, what="every job Succeeded", timeout=180)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=30)
    all_jobs = cluster.get("jobs", "-n", namespace)["items"]
    by_owner: dict[str, list[str]] = {}
    for job in all_jobs:
        by_owner.setdefault(job["metadata"]["labels"]["kiln.dev/trainingjob"], []).append(job["metadata"]["name"])
    for t in items:
        name, st = t["metadata"]["name"], t["status"]
        owned = by_owner.get(name, [])
        # One Job per live attempt, named by attempt: never a duplicate, never an orphan of an older attempt.
        assert owned == [f"{name}-{st['attempt']}"], (name, owned, st)
        assert st["restarts"]["user"] == 0
        assert st["attempt"] == 1 + st["restarts"]["infrastructure"]
        if int(name.split("-")[1]) % 2 == 0:
            assert st["attempt"] == 1, (name, st)
    services = cluster.get("services", "-n", namespace)["items"]
    assert sorted(s["metadata"]["name"] for s in services) == sorted(f"{n}-svc" for n in names[1::2])
