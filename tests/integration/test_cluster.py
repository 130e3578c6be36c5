"""The local control plane is real and has what the other tests run against: GPU and CPU nodes,
scheduling by extended resources and taints, Jobs that run to completion, and injectable pod failures."""

import asyncio
import ipaddress
import json
import subprocess
import time
from typing import Any

import kr8s
import pytest
from kr8s.objects import Pod, object_from_spec
from support.cluster import REPO, SIMULATED_TAINT, Cluster
from support.waiting import wait_for

from kiln_operator.analysis import AnalysisUnavailable, scrape

GPU_TOLERATION = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}


def pod_spec(name: str, ns: str, *, gpus: int = 0, annotations: dict[str, str] | None = None) -> dict[str, Any]:
    resources = {"limits": {"nvidia.com/gpu": str(gpus)}} if gpus else {}
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "annotations": annotations or {}},
        "spec": {
            "containers": [{"name": "main", "image": "example.invalid/busybox:1", "resources": resources}],
            "tolerations": [GPU_TOLERATION] if gpus else [],
        },
    }


def job_spec(name: str, ns: str, *, completions: int = 1, annotations: dict[str, str] | None = None) -> dict:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "completions": completions,
            "parallelism": completions,
            "completionMode": "Indexed",
            "backoffLimit": 0,
            "template": {
                "metadata": {"annotations": annotations or {}},
                "spec": {
                    "restartPolicy": "Never",
                    "containers": [{"name": "main", "image": "example.invalid/trainer:1"}],
                },
            },
        },
    }


def create(api: kr8s.Api, spec: dict) -> Any:
    obj = object_from_spec(spec, api=api)
    obj.create()
    return obj


def fresh(obj: Any) -> dict:
    obj.refresh()
    return obj.raw


def phase(pod: Pod) -> str | None:
    return fresh(pod).get("status", {}).get("phase")


def terminated(pod: Pod) -> dict:
    statuses = fresh(pod).get("status", {}).get("containerStatuses") or [{}]
    return statuses[0].get("state", {}).get("terminated") or {}


def condition(obj: dict, type_: str) -> dict:
    return next((c for c in obj.get("status", {}).get("conditions", []) if c["type"] == type_), {})


def test_versions_are_the_pinned_ones(cluster: Cluster):
    pins = dict(line.split("=", 1) for line in (REPO / "hack/versions.env").read_text().splitlines() if "=" in line)
    assert json.loads(cluster.kubectl("get", "--raw", "/version").stdout)["gitVersion"] == f"v{pins['K8S_VERSION']}"


def test_nodes_one_cpu_and_two_gpu_pools(cluster: Cluster):
    all_nodes = cluster.get("nodes")["items"]
    real = [n for n in all_nodes if n["metadata"].get("labels", {}).get("kiln.dev/node-kind") == "real"]
    nodes = {n["metadata"]["name"]: n for n in all_nodes if n["metadata"].get("labels", {}).get("type") == "kwok"}
    gpu = {name: n for name, n in nodes.items() if n["status"]["allocatable"].get("nvidia.com/gpu")}
    cpu = {name: n for name, n in nodes.items() if name not in gpu}
    assert len(gpu) >= 2
    assert len(cpu) >= 1
    for n in nodes.values():
        assert condition(n, "Ready")["status"] == "True"
    for n in gpu.values():
        assert n["status"]["allocatable"]["nvidia.com/gpu"] == "8"
        assert n["metadata"]["labels"]["nvidia.com/gpu.product"]
        assert int(n["metadata"]["labels"]["nvidia.com/gpu.memory"]) > 0
        assert {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"} in n["spec"]["taints"]
    # Beside a real node, the simulated CPU node takes only the pods that ask for it (SIMULATED_NAMESPACE_ANNOTATIONS).
    expected = [{"key": SIMULATED_TAINT, "value": "fake", "effect": "NoSchedule"}] if real else []
    for n in cpu.values():
        assert n["spec"].get("taints", []) == expected


def test_gpu_pod_runs_on_a_gpu_node_and_cpu_pod_on_the_cpu_node(api: kr8s.Api, namespace: str):
    gpu_pod = create(api, pod_spec("gpu", namespace, gpus=2))
    cpu_pod = create(api, pod_spec("cpu", namespace))
    for pod in (gpu_pod, cpu_pod):
        wait_for(lambda pod=pod: phase(pod) == "Running", what=f"pod {pod.name} Running")
        assert condition(pod.raw, "Ready")["status"] == "True"
        assert pod.raw["status"]["podIP"]
    assert gpu_pod.raw["spec"]["nodeName"].startswith("kiln-gpu-")
    assert cpu_pod.raw["spec"]["nodeName"].startswith("kiln-cpu-")  # GPU nodes are tainted


def test_too_many_gpus_stay_unschedulable_with_the_schedulers_reason(api: kr8s.Api, namespace: str):
    pod = create(api, pod_spec("greedy", namespace, gpus=16))
    scheduled = wait_for(
        lambda: (
            condition(fresh(pod), "PodScheduled").get("reason") == "Unschedulable"
            and condition(pod.raw, "PodScheduled")
        ),
        what="PodScheduled=False/Unschedulable",
    )
    assert scheduled["status"] == "False"
    assert "Insufficient nvidia.com/gpu" in scheduled["message"]
    assert phase(pod) == "Pending"


def test_indexed_job_runs_and_completes(api: kr8s.Api, namespace: str):
    job = create(api, job_spec("ok", namespace, completions=2))
    done = wait_for(lambda: condition(fresh(job), "Complete").get("status") == "True", what="Job Complete")
    assert done
    assert job.raw["status"]["succeeded"] == 2
    pods = list(api.get("pods", namespace=namespace, label_selector="batch.kubernetes.io/job-name=ok"))
    assert sorted(p.raw["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] for p in pods) == [
        "0",
        "1",
    ]
    for p in pods:
        assert p.raw["status"]["phase"] == "Succeeded"
        assert terminated(p)["exitCode"] == 0


@pytest.mark.parametrize(
    ("annotations", "exit_code", "reason"),
    [
        ({"kwok.kiln.dev/exit-code": "3"}, 3, "Error"),
        ({"kwok.kiln.dev/exit-code": "137", "kwok.kiln.dev/reason": "OOMKilled"}, 137, "OOMKilled"),
    ],
    ids=["exit-code", "oom-killed"],
)
def test_job_pod_fails_with_the_chosen_exit_code(api: kr8s.Api, namespace: str, annotations, exit_code, reason):
    job = create(api, job_spec("bad", namespace, annotations=annotations))
    failed = wait_for(lambda: condition(fresh(job), "Failed").get("status") == "True" and job.raw, what="Job Failed")
    assert condition(failed, "Failed")["reason"] == "BackoffLimitExceeded"
    (pod,) = api.get("pods", namespace=namespace, label_selector="batch.kubernetes.io/job-name=bad")
    assert pod.raw["status"]["phase"] == "Failed"
    state = terminated(pod)
    assert (state["exitCode"], state["reason"]) == (exit_code, reason)


def test_a_chosen_running_pod_fails_while_its_peer_keeps_running(api: kr8s.Api, namespace: str):
    create(api, job_spec("pair", namespace, completions=2, annotations={"kwok.kiln.dev/run-for": "1h"}))

    def running_pods() -> dict[str, Pod]:
        pods = api.get("pods", namespace=namespace, label_selector="batch.kubernetes.io/job-name=pair")
        by_index = {p.raw["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"]: p for p in pods}
        return by_index if len(by_index) == 2 and all(p.raw["status"].get("phase") == "Running" for p in pods) else {}

    pods = wait_for(running_pods, what="both pods Running")
    pods["1"].annotate({"kwok.kiln.dev/exit-code": "42"})
    wait_for(lambda: phase(pods["1"]) == "Failed", what="pod 1 Failed")
    assert terminated(pods["1"])["exitCode"] == 42
    assert phase(pods["0"]) == "Running"


def test_eviction_leaves_a_disruption_target_condition(api: kr8s.Api, namespace: str):
    pod = create(api, pod_spec("victim", namespace))
    wait_for(lambda: phase(pod) == "Running", what="pod Running")
    pod.annotate({"kwok.kiln.dev/evict": "TerminationByKubelet"})
    wait_for(lambda: phase(pod) == "Failed", what="pod Failed")
    assert pod.raw["status"]["reason"] == "Evicted"
    disruption = condition(pod.raw, "DisruptionTarget")
    assert (disruption["status"], disruption["reason"]) == ("True", "TerminationByKubelet")


@pytest.mark.parametrize(
    ("reason", "expected_phase"), [("ImagePullBackOff", "Pending"), ("CrashLoopBackOff", "Running")]
)
def test_pod_that_never_starts_waits_with_the_reason(api: kr8s.Api, namespace: str, reason, expected_phase):
    pod = create(api, pod_spec("stuck", namespace, annotations={"kwok.kiln.dev/waiting-reason": reason}))

    def waiting() -> dict:
        statuses = fresh(pod).get("status", {}).get("containerStatuses") or [{}]
        return statuses[0].get("state", {}).get("waiting") or {}

    assert wait_for(waiting, what=f"container waiting ({reason})")["reason"] == reason
    assert phase(pod) == expected_phase
    assert condition(pod.raw, "Ready")["status"] == "False"


def test_deleted_pods_go_away(api: kr8s.Api, namespace: str):
    pod = create(api, pod_spec("short", namespace))
    wait_for(lambda: phase(pod) == "Running", what="pod Running")
    pod.delete()
    wait_for(lambda: not pod.exists(), what="pod gone")


SIMULATED_POD_CIDR = ipaddress.ip_network("10.245.0.0/16")  # kwok-controller's --cidr (hack/kwok/kwokctl.yaml)
SERVICE_CIDR = ipaddress.ip_network("10.0.0.0/24")  # the API server's Service range


def route_to(address: str) -> str:
    """What this machine does with a packet for `address`: `ip route get`'s answer, or its error."""
    done = subprocess.run(["ip", "route", "get", address], capture_output=True, text=True, check=False)
    return (done.stdout + done.stderr).strip()


def test_simulated_pod_and_service_ips_never_leave_this_machine(cluster: Cluster, api: kr8s.Api, namespace: str):
    pod = create(api, pod_spec("addressed", namespace))
    wait_for(lambda: phase(pod) == "Running", what="pod Running")
    pod_ip = pod.raw["status"]["podIP"]
    assert ipaddress.ip_address(pod_ip) in SIMULATED_POD_CIDR
    svc = create(
        api,
        {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": "addressed", "namespace": namespace},
            "spec": {"selector": {"app": "none"}, "ports": [{"port": 80}]},
        },
    )
    cluster_ips = [
        svc.raw["spec"]["clusterIP"],
        cluster.get("service", "kubernetes", "-n", "default")["spec"]["clusterIP"],
    ]
    gateway = subprocess.run(["ip", "route", "show", "default"], capture_output=True, text=True, check=True).stdout
    for address in [pod_ip, *cluster_ips]:
        route = route_to(address)
        # Either unreachable here (an error at once) or a local device (the real node's bridge); never a gateway.
        assert " via " not in route, f"{address} would leave this machine: {route} (default: {gateway.strip()})"
    assert all(ipaddress.ip_address(ip) in SERVICE_CIDR for ip in cluster_ips)
    assert "unreachable" in route_to(pod_ip) or "No route to host" in route_to(pod_ip)


def test_direct_scrape_of_a_simulated_pod_fails_at_once(api: kr8s.Api, namespace: str):
    """The canary analysis without Prometheus scrapes pods' /metrics: a simulated pod's IP is refused here, at once,
    with the reason (not after the request timeout, and not by a host somewhere else)."""
    pod = create(api, pod_spec("scraped", namespace))
    wait_for(lambda: phase(pod) == "Running", what="pod Running")
    url = f"http://{pod.raw['status']['podIP']}:9090/metrics"
    start = time.monotonic()
    with pytest.raises(AnalysisUnavailable, match="No route to host") as failed:
        asyncio.run(scrape([url], timeout=30))
    assert time.monotonic() - start < 10, "failed by the timeout, not by the local route"
    assert url in str(failed.value)
