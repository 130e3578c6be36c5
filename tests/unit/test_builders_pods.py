"""What every workload pod gets from builders/pods.py whatever its spec says about resources: requests (never
BestEffort), an ephemeral-storage request, and bounded scratch space."""

from pathlib import Path
from typing import Any

import pytest
import yaml

from kiln_operator.builders import modelcompression as mcb
from kiln_operator.builders import modeldeployment as mdb
from kiln_operator.builders import trainingjob as tjb
from kiln_operator.builders.pods import COMPRESSOR, SERVER, TRAINER

SAMPLES = Path(__file__).resolve().parents[2] / "manifests" / "samples"


def sample(name: str) -> dict[str, Any]:
    body = yaml.safe_load((SAMPLES / name).read_text())
    body["metadata"] |= {"namespace": "team-a", "uid": "u"}
    return body


def built(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """The pod spec of what the builder makes of `body`."""
    if kind == "TrainingJob":
        obj = tjb.indexed_job(body, 1)
    elif kind == "ModelCompression":
        obj = mcb.compressor_job(body, {"uri": "file:///src"}, 1, "file:///out", image_default="kiln/c:1")
    else:
        obj = mdb.deployment(body, "k", uri="file:///m", digest=None, number=1, role="stable", replicas=1, created=0)
    return obj["spec"]["template"]["spec"]


def volume_at(pod: dict[str, Any], path: str) -> dict[str, Any]:
    (mount,) = [m for c in pod["containers"][:1] for m in c["volumeMounts"] if m["mountPath"] == path]
    (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    return volume


@pytest.mark.parametrize(
    ("path", "kind", "sizing"),
    [
        ("features/trainingjob-kueue.yaml", "TrainingJob", TRAINER),
        ("features/modelcompression-gpu-fp16.yaml", "ModelCompression", COMPRESSOR),
    ],
)
def test_a_spec_that_names_only_gpus_still_requests_cpu_memory_and_storage(path, kind, sizing):
    body = sample(path)
    assert set(body["spec"]["resources"]) == {"gpus"}  # the samples as shipped
    pod = built(kind, body)
    resources = pod["containers"][0]["resources"]
    assert resources["requests"] == {"cpu": sizing.cpu, "memory": sizing.memory, "ephemeral-storage": sizing.ephemeral}
    assert set(resources["limits"]) == {"nvidia.com/gpu"}  # defaults are requests: a larger model may still fit
    assert volume_at(pod, "/tmp")["emptyDir"] == {"sizeLimit": sizing.tmp}


def test_named_cpu_and_memory_are_request_and_limit():
    body = sample("features/trainingjob-kueue.yaml")
    body["spec"]["resources"] = {"cpu": "3", "memory": "12Gi", "gpus": 0}
    pod = built("TrainingJob", body)
    resources = pod["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": "3", "memory": "12Gi", "ephemeral-storage": TRAINER.ephemeral},
        "limits": {"cpu": "3", "memory": "12Gi"},
    }
    # /dev/shm is memory: bounded by the container's memory, never by more than the pod may use.
    assert volume_at(pod, "/dev/shm")["emptyDir"] == {"medium": "Memory", "sizeLimit": "12Gi"}
    body["spec"]["resources"] = {"cpu": "3"}  # memory defaulted: a request, and the bound of /dev/shm
    pod = built("TrainingJob", body)
    assert pod["containers"][0]["resources"]["requests"]["memory"] == TRAINER.memory
    assert "memory" not in pod["containers"][0]["resources"]["limits"]
    assert volume_at(pod, "/dev/shm")["emptyDir"]["sizeLimit"] == TRAINER.memory


def test_the_server_gets_requests_and_a_bounded_tmp():
    body = {
        "metadata": {"name": "m", "namespace": "team-a", "uid": "u"},
        "spec": {"source": {"uri": "file:///m"}, "runtime": {"image": "kiln/server:1"}},
    }
    pod = built("ModelDeployment", body)
    resources = pod["containers"][0]["resources"]
    assert resources == {
        "requests": {"cpu": SERVER.cpu, "memory": SERVER.memory, "ephemeral-storage": SERVER.ephemeral}
    }
    assert volume_at(pod, "/tmp")["emptyDir"] == {"sizeLimit": SERVER.tmp}
