"""The TrainingJob builders: the samples, defaulted the way the API server defaults them, in; Job and Service out."""

import copy
import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln_operator import labels
from kiln_operator.api.trainingjob import SPEC
from kiln_operator.builders import trainingjob as b
from kiln_operator.builders.pods import merge

REPO = Path(__file__).resolve().parents[2]
SAMPLES = REPO / "manifests" / "samples"
SINGLE, MULTI, KUEUE = "trainingjob.yaml", "features/trainingjob-multinode.yaml", "features/trainingjob-kueue.yaml"
LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")


def defaulted(value: Any, schema: dict[str, Any]) -> Any:
    """Structural-schema defaulting as the API server does it: absent fields get their default, recursively."""
    if schema.get("type") == "object" and isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = defaulted(value[key], sub)
    return value


def load(sample: str, namespace: str = "team-a") -> dict[str, Any]:
    body = yaml.safe_load((SAMPLES / sample).read_text())
    body["metadata"] |= {"namespace": namespace, "uid": "0b4c1d2e-0000-4000-8000-000000000001"}
    body["spec"] = defaulted(body["spec"], SPEC)
    return body


def pod(job: dict[str, Any]) -> dict[str, Any]:
    return job["spec"]["template"]["spec"]


def trainer(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = [c for c in pod(job)["containers"] if c["name"] == "trainer"]
    return c


def env(job: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {e["name"]: e for e in trainer(job)["env"]}


def value(job: dict[str, Any], name: str) -> str:
    return env(job)[name]["value"]


def nulls(node: Any, path: str = "") -> Any:
    """Paths of None values: a builder must omit a field rather than send null."""
    if node is None:
        yield path
    elif isinstance(node, dict):
        for k, v in node.items():
            yield from nulls(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from nulls(v, f"{path}[{i}]")


def check_structure(obj: dict[str, Any]) -> None:
    """What the API server would reject, checked without one."""
    meta = obj["metadata"]
    assert meta["namespace"]
    assert "ownerReferences" not in meta
    assert len(meta["name"]) <= 63
    assert DNS1035.match(meta["name"])
    for k, v in meta["labels"].items():
        assert len(k.split("/")[-1]) <= 63, k
        assert len(v) <= 63, v
        assert LABEL_VALUE.match(v), v
    assert not list(nulls(obj))
    if obj["kind"] == "Service":
        return
    spec = pod(obj)
    volumes = [v["name"] for v in spec["volumes"]]
    assert len(volumes) == len(set(volumes))
    assert all(LABEL.match(v) and len(v) <= 63 for v in volumes)
    for c in spec["containers"]:
        names = [e["name"] for e in c.get("env", [])]
        assert len(names) == len(set(names)), names
        assert all(("value" in e) != ("valueFrom" in e) for e in c.get("env", []))
        assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes)
        paths = [m["mountPath"] for m in c.get("volumeMounts", [])]
        assert len(paths) == len(set(paths))
    # The hostname of the last pod (<job>-<index>) must be a DNS label too.
    assert len(f"{obj['metadata']['name']}-{obj['spec']['completions'] - 1}") <= 63
    assert (
        obj["spec"]["template"]["metadata"]["labels"][labels.TRAININGJOB]
        == obj["metadata"]["labels"][labels.TRAININGJOB]
    )


@pytest.mark.parametrize("sample", [SINGLE, MULTI, KUEUE])
def test_samples_build_valid_children(sample):
    body = load(sample)
    svc, job = b.headless_service(body), b.indexed_job(body, 1)
    check_structure(svc)
    check_structure(job)
    assert svc["spec"]["selector"] == {labels.TRAININGJOB: body["metadata"]["name"]}
    assert svc["spec"]["selector"].items() <= job["spec"]["template"]["metadata"]["labels"].items()


def test_names_are_deterministic_dns_labels_and_short():
    assert b.job_name("bert", 1) == b.job_name("bert", 1) == "bert-1"
    assert b.job_name("bert", 2) != b.job_name("bert", 1)
    assert b.service_name("bert") == "bert-svc"
    longest = "a" * 48
    assert len(b.job_name(longest, b.MAX_ATTEMPT)) + len("-1023") == 63
    # Subdomain-style or digit-first names are valid TrainingJob names but not valid Service names or hostnames.
    for odd in ("v1.2-run", "1st-run", "x." + "y" * 46):
        for name in (b.job_name(odd, 3), b.service_name(odd)):
            assert DNS1035.match(name), name
            assert len(name) <= 63, name
    assert b.service_name("a.b") != b.service_name("a-b")
    with pytest.raises(ValueError, match="attempt"):
        b.job_name("bert", 0)


def test_indexed_job_shape():
    body = load(MULTI)
    job = b.indexed_job(body, 3)
    spec = job["spec"]
    assert job["apiVersion"] == "batch/v1"
    assert job["kind"] == "Job"
    assert job["metadata"] == {
        "name": "llm-sft-multinode-3",
        "namespace": "team-a",
        "labels": b.child_labels("llm-sft-multinode", 3),
        "annotations": {},
    }
    # A disruption fails the Job by a rule, so its Failed condition names it after the pod is gone.
    assert spec["podFailurePolicy"]["rules"] == [
        {"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}
    ]
    assert job["metadata"]["labels"]["kiln.dev/attempt"] == "3"
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0
    assert spec["suspend"] is False
    assert "activeDeadlineSeconds" not in spec
    assert pod(job)["subdomain"] == b.service_name("llm-sft-multinode")
    assert pod(job)["restartPolicy"] == "Never"
    assert pod(job)["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}


def test_headless_service():
    svc = b.headless_service(load(MULTI))
    assert svc["metadata"]["name"] == "llm-sft-multinode-svc"
    assert svc["metadata"]["namespace"] == "team-a"
    assert svc["spec"]["clusterIP"] == "None"
    assert svc["spec"]["publishNotReadyAddresses"] is True


def test_torchrun_env_and_pet_equivalents_multinode():
    job = b.indexed_job(load(MULTI), 1)
    e = env(job)
    master = "llm-sft-multinode-1-0.llm-sft-multinode-svc"
    assert value(job, "MASTER_ADDR") == value(job, "PET_MASTER_ADDR") == master
    assert value(job, "MASTER_PORT") == value(job, "PET_MASTER_PORT") == "29500"
    assert value(job, "NNODES") == value(job, "PET_NNODES") == "2"
    assert value(job, "NPROC_PER_NODE") == value(job, "PET_NPROC_PER_NODE") == "8"
    assert value(job, "WORLD_SIZE") == "16"
    index = {"fieldRef": {"fieldPath": "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}
    assert e["PET_NODE_RANK"]["valueFrom"] == e["NODE_RANK"]["valueFrom"] == index
    assert "RANK" not in e
    assert "LOCAL_RANK" not in e
    # Several processes per pod: torchrun as the trainer's README spells it; $(PET_NODE_RANK) is expanded by k8s.
    assert trainer(job)["command"] == [
        "torchrun",
        "--nnodes=2",
        "--nproc-per-node=8",
        "--node-rank=$(PET_NODE_RANK)",
        f"--master-addr={master}",
        "--master-port=29500",
        "-m",
        "kiln_trainer",
    ]
    assert trainer(job)["args"] == ["--task", "text-classification"]


def test_one_process_per_pod_runs_the_trainer_directly_with_rank_from_the_index():
    body = load(SINGLE)
    job = b.indexed_job(body, 1)
    e = env(job)
    assert trainer(job)["command"] == ["python", "-m", "kiln_trainer"]
    assert value(job, "WORLD_SIZE") == value(job, "PET_NPROC_PER_NODE") == "1"
    assert e["RANK"]["valueFrom"] == e["PET_NODE_RANK"]["valueFrom"]
    assert value(job, "LOCAL_RANK") == "0"
    # processesPerNode defaults to resources.gpus, or 1 without GPUs.
    body["spec"]["resources"]["gpus"] = 4
    assert value(b.indexed_job(body, 1), "PET_NPROC_PER_NODE") == "4"


def test_trainer_contract_env():
    body = load(SINGLE)
    job = b.indexed_job(body, 1)
    spec = json.loads(value(job, "KILN_TRAINING_SPEC"))
    assert set(spec) == {"model", "dataset", "hyperparameters", "checkpoint", "resume", "output"}
    assert spec["hyperparameters"]["epochs"] == 3
    assert spec["model"]["uri"].startswith("hf://")
    assert value(job, "KILN_JOB_NAMESPACE") == "team-a"
    assert value(job, "KILN_JOB_NAME") == "classifier"
    assert value(job, "KILN_JOB_UID") == body["metadata"]["uid"]
    assert value(job, "KILN_IMAGE") == trainer(job)["image"] == "kiln/trainer:0.1.0"


def test_trainer_accepts_the_training_spec():
    config = pytest.importorskip("kiln_trainer.config")
    for sample in (SINGLE, MULTI, KUEUE):
        job = b.indexed_job(load(sample), 1)
        cfg = config.parse_config([], {"KILN_TRAINING_SPEC": value(job, "KILN_TRAINING_SPEC")})
        assert cfg.dataset_uri == load(sample)["spec"]["dataset"]["uri"]


def test_gpu_limits_and_toleration_only_with_gpus():
    body = load(SINGLE)
    c = trainer(b.indexed_job(body, 1))
    assert c["resources"] == {
        "requests": {"cpu": "8", "memory": "32Gi", "ephemeral-storage": "1Gi"},
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": 1},
    }
    toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert pod(b.indexed_job(body, 1))["tolerations"] == [toleration]
    body["spec"]["resources"] = {"gpus": 0}
    body["spec"]["hyperparameters"]["precision"] = "fp32"
    job = b.indexed_job(body, 1)
    # Nothing named: the defaults, as requests only (Burstable, never BestEffort).
    assert trainer(job)["resources"] == {"requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "1Gi"}}
    assert "tolerations" not in pod(job)
    # A user toleration stays, the GPU one is not duplicated.
    body["spec"]["resources"]["gpus"] = 2
    body["spec"]["scheduling"]["tolerations"] = [toleration, {"key": "spot", "operator": "Exists"}]
    assert pod(b.indexed_job(body, 1))["tolerations"] == [toleration, {"key": "spot", "operator": "Exists"}]


def test_kueue_label_and_suspend():
    job = b.indexed_job(load(KUEUE), 1)
    assert job["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a-gpus"
    assert job["spec"]["suspend"] is True
    single = b.indexed_job(load(SINGLE), 1)
    assert "kueue.x-k8s.io/queue-name" not in single["metadata"]["labels"]
    assert single["spec"]["suspend"] is False


def test_spec_suspend_suspends():
    body = load(SINGLE)
    body["spec"]["suspend"] = True
    assert b.indexed_job(body, 1)["spec"]["suspend"] is True


def test_scheduling_copied():
    body = load(SINGLE)
    affinity = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": []}}}
    body["spec"]["scheduling"] |= {"priorityClassName": "high", "affinity": affinity, "nodeSelector": {"a": "b"}}
    spec = pod(b.indexed_job(body, 1))
    assert spec["priorityClassName"] == "high"
    assert spec["affinity"] == affinity
    assert spec["nodeSelector"] == {"a": "b"}


def test_pvc_claims_mounted_once_read_write_if_any_use_writes():
    body = load(MULTI)  # dataset on pvc://datasets
    body["spec"]["output"] = {"uri": "pvc://models/sft/out"}
    body["spec"]["checkpoint"]["uri"] = "pvc://models/sft/ckpt"
    body["spec"]["model"] = {"uri": "pvc://datasets/base/model"}
    job = b.indexed_job(body, 1)
    claims = [v for v in pod(job)["volumes"] if "persistentVolumeClaim" in v]
    assert sorted(v["persistentVolumeClaim"]["claimName"] for v in claims) == ["datasets", "models"]
    ro = {v["persistentVolumeClaim"]["claimName"]: v["persistentVolumeClaim"]["readOnly"] for v in claims}
    assert ro == {"datasets": True, "models": False}
    mounts = {m["mountPath"]: m for m in trainer(job)["volumeMounts"]}
    assert mounts["/mnt/kiln/pvc/datasets"]["readOnly"] is True
    assert mounts["/mnt/kiln/pvc/models"]["readOnly"] is False
    assert value(job, "KILN_PVC_ROOT") == "/mnt/kiln/pvc"
    # No pvc:// URI, no claim and no KILN_PVC_ROOT.
    single = b.indexed_job(load(SINGLE), 1)
    assert not [v for v in pod(single)["volumes"] if "persistentVolumeClaim" in v]
    assert "KILN_PVC_ROOT" not in env(single)


def test_hardening():
    job = b.indexed_job(load(SINGLE), 1)
    sc = pod(job)["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] == 65532
    assert sc["seccompProfile"] == {"type": "RuntimeDefault"}
    c = trainer(job)
    assert c["securityContext"] == {
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
    }
    assert c["terminationMessagePolicy"] == "FallbackToLogsOnError"
    volumes = {v["name"]: v for v in pod(job)["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in c["volumeMounts"]}
    # Both bounded: /tmp on the node's disk, /dev/shm in memory by the container's memory (here spec.resources').
    assert volumes[mounts["/tmp"]]["emptyDir"] == {"sizeLimit": "20Gi"}
    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}


def test_user_env_and_artifact_env_cannot_override_kiln_env():
    body = load(SINGLE)
    body["spec"]["env"] = [{"name": "FOO", "value": "1"}, {"name": "MASTER_ADDR", "value": "evil"}]
    s3 = [{"name": "AWS_REGION", "value": "eu-west-1"}, {"name": "AWS_ACCESS_KEY_ID", "valueFrom": {}}]
    job = b.indexed_job(body, 1, artifact_env=[*s3, {"name": "FOO", "value": "0"}])
    assert value(job, "FOO") == "1"
    assert value(job, "AWS_REGION") == "eu-west-1"
    assert value(job, "MASTER_ADDR") == "127.0.0.1"  # one node: no DNS needed


def test_user_command_runs_under_torchrun_with_several_processes():
    body = load(KUEUE)
    body["spec"]["command"] = ["python", "/app/my_train.py"]
    cmd = trainer(b.indexed_job(body, 1))["command"]
    assert cmd[0] == "torchrun"
    assert cmd[-3:] == ["--no-python", "python", "/app/my_train.py"]
    body["spec"]["processesPerNode"] = 1
    assert trainer(b.indexed_job(body, 1))["command"] == ["python", "/app/my_train.py"]


def test_pod_template_merges_but_cannot_replace_what_kiln_owns():
    body = load(SINGLE)
    plain = b.indexed_job(body, 1)
    body["spec"]["podTemplate"] = {
        "metadata": {"labels": {"team": "nlp", labels.TRAININGJOB: "other"}, "annotations": {"a": "b"}},
        "spec": {
            "terminationGracePeriodSeconds": 900,
            "restartPolicy": "OnFailure",
            "containers": [
                {
                    "name": "trainer",
                    "command": ["sh", "-c", "evil"],
                    "args": ["x"],
                    "env": [{"name": "KILN_TRAINING_SPEC", "value": "{}"}, {"name": "EXTRA", "value": "1"}],
                    "volumeMounts": [{"name": "cache", "mountPath": "/cache"}],
                    "resources": {"limits": {"ephemeral-storage": "10Gi"}},
                },
                {"name": "sidecar", "image": "busybox"},
            ],
            "volumes": [{"name": "cache", "emptyDir": {}}, {"name": "tmp", "hostPath": {"path": "/"}}],
        },
    }
    job = b.indexed_job(body, 1)
    check_structure(job)
    meta = job["spec"]["template"]["metadata"]
    assert meta["labels"]["team"] == "nlp"
    assert meta["labels"][labels.TRAININGJOB] == "classifier"
    assert meta["annotations"] == {"a": "b"}
    spec, c = pod(job), trainer(job)
    assert spec["terminationGracePeriodSeconds"] == 900
    assert spec["restartPolicy"] == "Never"
    assert [x["name"] for x in spec["containers"]] == ["trainer", "sidecar"]
    assert c["command"] == trainer(plain)["command"]
    assert c["args"] == trainer(plain)["args"]
    assert value(job, "KILN_TRAINING_SPEC") == value(plain, "KILN_TRAINING_SPEC")
    assert value(job, "EXTRA") == "1"
    assert c["resources"]["limits"]["ephemeral-storage"] == "10Gi"
    assert c["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert c["securityContext"] == trainer(plain)["securityContext"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["cache"] == {"name": "cache", "emptyDir": {}}
    assert volumes["tmp"] == {"name": "tmp", "emptyDir": {"sizeLimit": "20Gi"}}
    assert {"name": "cache", "mountPath": "/cache"} in c["volumeMounts"]


def test_merge():
    base = {"a": {"b": 1, "c": [1, 2]}, "l": [{"name": "x", "v": 1}, {"name": "y", "v": 2}], "d": 1}
    over = {"a": {"c": [3]}, "l": [{"name": "y", "w": 3}, {"name": "z"}], "d": None}
    before = copy.deepcopy((base, over))
    assert merge(base, over) == {
        "a": {"b": 1, "c": [3]},
        "l": [{"name": "x", "v": 1}, {"name": "y", "v": 2, "w": 3}, {"name": "z"}],
    }
    assert (base, over) == before


@pytest.mark.parametrize("sample", [SINGLE, MULTI, KUEUE])
def test_builders_are_pure(sample):
    body = load(sample)
    body["spec"]["podTemplate"] = {"spec": {"containers": [{"name": "trainer", "env": [{"name": "E", "value": "1"}]}]}}
    body["spec"]["env"] = [{"name": "F", "value": "2"}]
    before = copy.deepcopy(body)
    job, svc = b.indexed_job(body, 2), b.headless_service(body)
    assert job == b.indexed_job(body, 2)
    assert svc == b.headless_service(body)
    assert body == before
    # The output shares nothing with the input: editing it (kopf.adopt does) leaves the body alone.
    trainer(job)["env"][0]["value"] = "changed"
    pod(job)["nodeSelector"] = {"x": "y"}
    job["metadata"]["labels"]["z"] = "1"
    assert body == before
    # Nor do its fields share objects with one another.
    env(job)["PET_NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] = "x"
    assert env(job)["NODE_RANK"]["valueFrom"]["fieldRef"]["fieldPath"] != "x"


def test_image_default():
    body = load(SINGLE)
    body["spec"]["image"] = ""
    assert trainer(b.indexed_job(body, 1, image_default="kiln/trainer:9"))["image"] == "kiln/trainer:9"
    with pytest.raises(ValueError, match="image"):
        b.indexed_job(body, 1)


@pytest.mark.parametrize(
    ("resources", "per_node", "user_env", "expected"),
    [
        ({"cpu": "3", "memory": "4Gi"}, 1, [], "3"),
        ({"cpu": "3", "memory": "4Gi"}, 2, [], "1"),
        ({"cpu": "500m", "memory": "1Gi"}, 1, [], "1"),
        ({"cpu": "4", "memory": "4Gi"}, 1, [{"name": "OMP_NUM_THREADS", "value": "7"}], "7"),
        ({"cpu": "8", "memory": "32Gi", "gpus": 1}, 1, [], None),
        ({}, 1, [], None),
    ],
    ids=["cpu-limit", "shared-by-processes", "below-one-core", "user-env-wins", "gpu", "no-limit"],
)
def test_cpu_training_gets_as_many_threads_as_its_cpu_limit(resources, per_node, user_env, expected):
    body = load(SINGLE)
    body["spec"]["resources"] = resources
    body["spec"]["processesPerNode"] = per_node
    body["spec"]["env"] = user_env
    job = b.indexed_job(body, 1)
    assert env(job).get("OMP_NUM_THREADS", {}).get("value") == expected
