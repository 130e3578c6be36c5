"""The API surface on the real API server: samples valid, bad specs rejected at admission with a message naming
the field and the rule, immutable fields, defaults, kubectl explain, the scale subresource, declared status."""

import copy
import json
from typing import Any

import pytest
import yaml
from support.cluster import REPO, Cluster

SAMPLES = REPO / "manifests/samples"
DELETE = object()  # marks a key to remove in a mutation


def sample(name: str) -> dict[str, Any]:
    return yaml.safe_load((SAMPLES / name).read_text())


def merged(base: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `change` into a copy of `base`; DELETE removes a key; lists are replaced whole."""
    out = copy.deepcopy(base)
    for key, value in change.items():
        if value is DELETE:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


TJ, MC, MD = "trainingjob.yaml", "modelcompression.yaml", "modeldeployment.yaml"
CANARY = "features/modeldeployment-canary.yaml"
GPU_MC = "features/modelcompression-gpu-fp16.yaml"

# (sample, change to it, substrings the API server's message must contain: the field, then the rule)
INVALID: dict[str, tuple[str, dict[str, Any], list[str]]] = {
    "tj-no-image": (TJ, {"spec": {"image": DELETE}}, ["spec.image", "Required value"]),
    "tj-no-dataset": (TJ, {"spec": {"dataset": DELETE}}, ["spec.dataset", "Required value"]),
    "tj-zero-nodes": (TJ, {"spec": {"nodes": 0}}, ["spec.nodes", "greater than or equal to 1"]),
    "tj-too-many-nodes": (TJ, {"spec": {"nodes": 2000}}, ["spec.nodes", "less than or equal to 1024"]),
    "tj-dataset-scheme": (TJ, {"spec": {"dataset": {"uri": "ftp://data/x"}}}, ["spec.dataset.uri", "should match"]),
    "tj-model-scheme": (TJ, {"spec": {"model": {"uri": "gs://bucket/m"}}}, ["spec.model.uri", "should match"]),
    "tj-output-readonly-hf": (TJ, {"spec": {"output": {"uri": "hf://org/m"}}}, ["spec.output.uri", "should match"]),
    "tj-epochs-and-steps": (
        TJ,
        {"spec": {"hyperparameters": {"maxSteps": 100}}},
        ["spec.hyperparameters", "set epochs or maxSteps, not both"],
    ),
    "tj-zero-lr": (
        TJ,
        {"spec": {"hyperparameters": {"learningRate": 0}}},
        ["spec.hyperparameters.learningRate", "greater than 0"],
    ),
    "tj-precision-enum": (
        TJ,
        {"spec": {"hyperparameters": {"precision": "int4"}}},
        ["spec.hyperparameters.precision", 'Unsupported value: "int4"'],
    ),
    "tj-fp16-on-cpu": (
        TJ,
        {"spec": {"resources": {"gpus": 0}, "hyperparameters": {"precision": "fp16"}}},
        ["spec.hyperparameters.precision", "fp16 needs GPUs"],
    ),
    "tj-procs-over-gpus": (
        TJ,
        {"spec": {"processesPerNode": 4}},
        ["spec.processesPerNode", "processesPerNode must not exceed resources.gpus"],
    ),
    "tj-too-many-gpus": (
        TJ,
        {"spec": {"resources": {"gpus": 17}}},
        ["spec.resources.gpus", "less than or equal to 16"],
    ),
    "tj-bad-quantity": (TJ, {"spec": {"resources": {"memory": "lots"}}}, ["spec.resources.memory", "should match"]),
    "tj-env-no-name": (TJ, {"spec": {"env": [{"value": "1"}]}}, ["spec.env[0].name", "Required value"]),
    "tj-env-both": (
        TJ,
        {"spec": {"env": [{"name": "A", "value": "1", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}]}},
        ["spec.env[0]", "set value or valueFrom, not both"],
    ),
    "tj-queue-name": (
        TJ,
        {"spec": {"scheduling": {"queueName": "Team_A"}}},
        ["spec.scheduling.queueName", "should match"],
    ),
    "tj-toleration-op": (
        TJ,
        {"spec": {"scheduling": {"tolerations": [{"key": "x", "operator": "Maybe"}]}}},
        ["spec.scheduling.tolerations[0].operator", 'Unsupported value: "Maybe"'],
    ),
    "tj-resume-never-from": (
        TJ,
        {"spec": {"resume": {"policy": "Never", "fromUri": "s3://ckpt/x"}}},
        ["spec.resume.fromUri", "fromUri needs policy Latest"],
    ),
    "tj-startup-deadline": (
        TJ,
        {"spec": {"runPolicy": {"startupDeadlineSeconds": 5}}},
        ["spec.runPolicy.startupDeadlineSeconds", "greater than or equal to 30"],
    ),
    "tj-keep-zero": (TJ, {"spec": {"checkpoint": {"keep": 0}}}, ["spec.checkpoint.keep", "greater than or equal to 1"]),
    "tj-long-name": (TJ, {"metadata": {"name": "x" * 49}}, ["metadata.name must be at most 48 characters"]),
    "tj-pull-policy": (TJ, {"spec": {"imagePullPolicy": "Sometimes"}}, ["spec.imagePullPolicy", "Unsupported value"]),
    "tj-model-digest": (
        TJ,
        {"spec": {"model": {"digest": "sha256:abc"}}},
        ["spec.model.digest", "should match"],
    ),
    "mc-two-sources": (
        MC,
        {"spec": {"source": {"uri": "s3://m/x"}}},
        ["spec.source", "set exactly one of trainingJobRef or uri"],
    ),
    "mc-no-source": (
        MC,
        {"spec": {"source": {"trainingJobRef": DELETE}}},
        ["spec.source", "set exactly one of trainingJobRef or uri"],
    ),
    "mc-steps-and-auto": (
        MC,
        {"spec": {"recipe": {"auto": {"objective": "Fastest"}}}},
        ["spec.recipe", "set exactly one of steps or auto"],
    ),
    "mc-step-two-kinds": (
        MC,
        {"spec": {"recipe": {"steps": [{"export": {}, "optimize": {}}]}}},
        ["spec.recipe.steps[0]", "a step sets exactly one of"],
    ),
    "mc-export-not-first": (
        MC,
        {"spec": {"recipe": {"steps": [{"optimize": {}}, {"export": {}}]}}},
        ["spec.recipe.steps", "export may appear once, as the first step"],
    ),
    "mc-static-no-calibration": (
        MC,
        {"spec": {"recipe": {"steps": [{"export": {}}, {"quantize": {"mode": "Static"}}]}}},
        ["spec.recipe.steps[1].quantize.calibration", "Static quantization needs calibration"],
    ),
    "mc-cpu-with-cuda": (
        MC,
        {"spec": {"target": {"executionProvider": "CUDAExecutionProvider"}}},
        ["spec.target.executionProvider", "must be CPUExecutionProvider exactly when target.device is cpu"],
    ),
    "mc-fp16-on-cpu": (
        MC,
        {"spec": {"target": {"precision": "fp16"}}},
        ["spec.target.precision", "fp16 needs target.device gpu"],
    ),
    "mc-int8-on-cuda": (
        GPU_MC,
        {"spec": {"target": {"precision": "int8"}}},
        ["spec.target.precision", "int8 does not run as int8 on CUDAExecutionProvider"],
    ),
    "mc-gpus-on-cpu-target": (
        MC,
        {"spec": {"resources": {"gpus": 1}}},
        ["spec.resources.gpus", "a GPU count only with a GPU-capable runtime"],
    ),
    "mc-gpu-target-no-gpus": (
        GPU_MC,
        {"spec": {"resources": {"gpus": 0}}},
        ["spec.resources.gpus", "target.device gpu needs resources.gpus >= 1"],
    ),
    "mc-sparsity": (
        MC,
        {"spec": {"recipe": {"steps": [{"prune": {"sparsity": 0.99}}]}}},
        ["spec.recipe.steps[0].prune.sparsity", "less than or equal to 0.95"],
    ),
    "mc-accuracy-drop": (
        MC,
        {"spec": {"gates": {"maxAccuracyDrop": 2}}},
        ["spec.gates.maxAccuracyDrop", "less than or equal to 1"],
    ),
    "mc-approval-automatic": (
        MC,
        {"spec": {"promotion": {"approvedDigest": "sha256:" + "a" * 64}}},
        ["spec.promotion.approvedDigest", "approvedDigest needs policy Manual"],
    ),
    "mc-empty-grid": (
        MC,
        {"spec": {"benchmark": {"batchSizes": []}}},
        ["spec.benchmark.batchSizes", "should have at least 1 items"],
    ),
    "mc-too-many-steps": (
        MC,
        {"spec": {"recipe": {"steps": [{"export": {}}] + [{"optimize": {}}] * 16}}},
        ["spec.recipe.steps", "must have at most 16 items"],
    ),
    "md-no-source": (
        MD,
        {"spec": {"source": {"modelCompressionRef": DELETE}}},
        ["spec.source", "set exactly one of modelCompressionRef, trainingJobRef or uri"],
    ),
    "md-max-below-min": (
        CANARY,
        {"spec": {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}},
        ["spec.autoscaling.maxReplicas", "maxReplicas must be >= minReplicas"],
    ),
    "md-weights-not-rising": (
        CANARY,
        {"spec": {"rollout": {"steps": [{"weight": 50}, {"weight": 10}, {"weight": 100}]}}},
        ["spec.rollout.steps", "canary weights must rise strictly"],
    ),
    "md-weights-repeat": (
        CANARY,
        {"spec": {"rollout": {"steps": [{"weight": 50}, {"weight": 50}, {"weight": 100}]}}},
        ["spec.rollout.steps", "canary weights must rise strictly"],
    ),
    "md-last-not-100": (
        CANARY,
        {"spec": {"rollout": {"steps": [{"weight": 10}, {"weight": 50}]}}},
        ["spec.rollout.steps", "the last canary step must have weight 100"],
    ),
    "md-canary-no-steps": (
        MD,
        {"spec": {"rollout": {"strategy": "Canary"}}},
        ["spec.rollout.steps", "strategy Canary needs steps"],
    ),
    "md-steps-rolling": (
        MD,
        {"spec": {"rollout": {"steps": [{"weight": 100}]}}},
        ["spec.rollout.steps", "steps need strategy Canary"],
    ),
    "md-gpus-cpu-provider": (
        MD,
        {"spec": {"resources": {"gpus": 1}}},
        ["spec.resources.gpus", "a GPU count only with a GPU-capable runtime"],
    ),
    "md-cuda-no-gpus": (
        CANARY,
        {"spec": {"resources": {"gpus": 0}}},
        ["spec.resources.gpus", "a GPU execution provider needs resources.gpus >= 1"],
    ),
    "md-port": (MD, {"spec": {"service": {"port": 70000}}}, ["spec.service.port", "less than or equal to 65535"]),
    "md-grpc-port-clash": (
        MD,
        {"spec": {"service": {"port": 8081}}},
        ["spec.service.grpcPort", "port and grpcPort must differ"],
    ),
    "md-no-runtime-image": (MD, {"spec": {"runtime": {"image": DELETE}}}, ["spec.runtime.image", "Required value"]),
    "md-negative-replicas": (MD, {"spec": {"replicas": -1}}, ["spec.replicas", "greater than or equal to 0"]),
    "md-zero-weight": (
        CANARY,
        {"spec": {"rollout": {"steps": [{"weight": 0}, {"weight": 100}]}}},
        ["spec.rollout.steps[0].weight", "greater than or equal to 1"],
    ),
    "md-error-rate": (
        CANARY,
        {"spec": {"rollout": {"analysis": {"maxErrorRate": 1.5}}}},
        ["spec.rollout.analysis.maxErrorRate", "less than or equal to 1"],
    ),
    "md-provider-enum": (
        MD,
        {"spec": {"runtime": {"executionProvider": "OpenVINOExecutionProvider"}}},
        ["spec.runtime.executionProvider", 'Unsupported value: "OpenVINOExecutionProvider"'],
    ),
}


def server_create(cluster: Cluster, doc: dict[str, Any]) -> str:
    """Create with --dry-run=server: full admission (schema, CEL), nothing stored. Returns the error, or ''."""
    out = cluster.kubectl("create", "-n", "default", "--dry-run=server", "-f", "-", stdin=json.dumps(doc), check=False)
    return out.stderr if out.returncode else ""


def test_there_are_at_least_thirty_invalid_specs():
    assert len(INVALID) >= 30


@pytest.mark.parametrize("name", [*INVALID])
def test_invalid_spec_is_rejected_naming_field_and_rule(cluster: Cluster, crds: None, name: str):
    base, change, expected = INVALID[name]
    error = server_create(cluster, merged(sample(base), change))
    assert error, f"{name}: accepted, expected a rejection"
    for text in expected:
        assert text in error, f"{name}: {text!r} not in {error!r}"


@pytest.mark.parametrize(
    "path", sorted(p.relative_to(SAMPLES).as_posix() for p in SAMPLES.rglob("*.yaml") if p.name != "kustomization.yaml")
)
def test_every_sample_is_valid(cluster: Cluster, crds: None, path: str):
    docs = [d for d in yaml.safe_load_all((SAMPLES / path).read_text()) if d]
    assert docs
    for doc in docs:
        assert server_create(cluster, doc) == "", doc["metadata"]["name"]


def test_samples_apply_unchanged(cluster: Cluster, crds: None, namespace: str):
    for kustomization in (SAMPLES, SAMPLES / "features"):
        cluster.kubectl("apply", "-n", namespace, "-k", str(kustomization))
    names = cluster.kubectl("get", "kiln", "-n", namespace, "-o", "name").stdout.split()
    assert len(names) == 8


@pytest.mark.parametrize(
    ("path", "change", "field"),
    [
        (TJ, {"spec": {"nodes": 2}}, "spec.nodes"),
        (TJ, {"spec": {"dataset": {"uri": "s3://other/data"}}}, "spec.dataset"),
        ("features/trainingjob-kueue.yaml", {"spec": {"model": {"uri": "s3://m/x"}}}, "spec.model"),
        (TJ, {"spec": {"model": {"uri": "s3://m/other"}}}, "spec.model"),
        (TJ, {"spec": {"output": {"uri": "s3://out/x"}}}, "spec.output"),
        (MC, {"spec": {"source": {"trainingJobRef": {"name": "other"}}}}, "spec.source"),
    ],
    ids=["tj-nodes", "tj-dataset", "tj-model-added", "tj-model-changed", "tj-output", "mc-source"],
)
def test_immutable_fields_refuse_changes(cluster: Cluster, crds: None, namespace: str, path, change, field):
    doc = sample(path)
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(doc))
    out = cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(merged(doc, change)), check=False)
    assert out.returncode != 0
    assert f"{field} is immutable" in out.stderr


def test_mutable_fields_change(cluster: Cluster, crds: None, namespace: str):
    doc = sample(TJ)
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(doc))
    changed = merged(doc, {"spec": {"suspend": True, "hyperparameters": {"learningRate": 1e-5}}})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", stdin=json.dumps(changed))
    spec = cluster.get("tj/classifier", "-n", namespace)["spec"]
    assert spec["suspend"] is True
    assert spec["hyperparameters"]["learningRate"] == 1e-5


MINIMAL = {
    "TrainingJob": {"image": "kiln/trainer:0.1.0", "dataset": {"uri": "file:///data"}},
    "ModelCompression": {
        "source": {"uri": "file:///models/m"},
        "image": "kiln/compressor:0.1.0",
        "recipe": {"steps": [{"export": {}}]},
        "evaluation": {"dataset": {"uri": "file:///data"}},
    },
    "ModelDeployment": {"source": {"uri": "file:///models/m"}, "runtime": {"image": "kiln/server:0.1.0"}},
}
DEFAULTS = {
    "TrainingJob": {
        ("imagePullPolicy",): "IfNotPresent",
        ("nodes",): 1,
        ("resources", "gpus"): 0,
        ("hyperparameters", "learningRate"): 5e-5,
        ("hyperparameters", "batchSize"): 16,
        ("hyperparameters", "precision"): "bf16",
        ("hyperparameters", "seed"): 42,
        ("checkpoint", "everyMinutes"): 30,
        ("checkpoint", "keep"): 3,
        ("resume", "policy"): "Latest",
        ("runPolicy", "maxInfraRetries"): 5,
        ("runPolicy", "maxUserRetries"): 1,
        ("runPolicy", "startupDeadlineSeconds"): 900,
        ("runPolicy", "progressDeadlineSeconds"): 1800,
        ("suspend",): False,
    },
    "ModelCompression": {
        ("target", "device"): "cpu",
        ("target", "executionProvider"): "CPUExecutionProvider",
        ("target", "precision"): "fp32",
        ("recipe", "steps", 0, "export", "opset"): 18,
        ("evaluation", "metric"): "accuracy",
        ("benchmark", "batchSizes"): [1, 8, 32],
        ("benchmark", "sequenceLengths"): [128],
        ("promotion", "policy"): "Automatic",
        ("resources", "gpus"): 0,
    },
    "ModelDeployment": {
        ("replicas",): 1,
        ("runtime", "executionProvider"): "CPUExecutionProvider",
        ("runtime", "maxBatchSize"): 32,
        ("runtime", "maxQueueDelayMs"): 5,
        ("runtime", "maxQueueSize"): 256,
        ("rollout", "strategy"): "RollingUpdate",
        ("rollout", "analysis", "maxErrorRate"): 0.01,
        ("service", "type"): "ClusterIP",
        ("service", "port"): 8080,
        ("service", "grpcPort"): 8081,
    },
}


@pytest.mark.parametrize("kind", [*MINIMAL])
def test_defaults_land_as_documented(cluster: Cluster, crds: None, namespace: str, kind: str):
    doc = {"apiVersion": "kiln.dev/v1alpha1", "kind": kind, "metadata": {"name": "minimal"}, "spec": MINIMAL[kind]}
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(doc))
    spec = cluster.get(kind.lower(), "minimal", "-n", namespace)["spec"]
    for path, expected in DEFAULTS[kind].items():
        value: Any = spec
        for key in path:
            value = value[key]
        assert value == expected, (path, value)


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        ("trainingjob.spec.nodes", "more than one runs multi-node torchrun"),
        ("trainingjob.spec.runPolicy.maxUserRetries", "user-code failures"),
        ("trainingjob.status.progress.heartbeatTime", "When the trainer last reported"),
        ("modelcompression.spec.recipe.steps.quantize", "int8 quantisation"),
        ("modelcompression.spec.gates.maxAccuracyDrop", "Largest allowed drop"),
        ("modeldeployment.spec.rollout.steps", "weights rise strictly and the last is 100"),
        ("modeldeployment.status.history.outcome", "How it ended"),
    ],
)
def test_kubectl_explain_prints_the_descriptions(cluster: Cluster, crds: None, field: str, expected: str):
    assert expected in " ".join(cluster.kubectl("explain", field).stdout.split())


def test_scale_subresource_drives_replicas(cluster: Cluster, crds: None, namespace: str):
    cluster.kubectl("apply", "-n", namespace, "-f", str(SAMPLES / MD))
    cluster.kubectl("scale", "-n", namespace, "md/classifier", "--replicas=5")
    assert cluster.get("md/classifier", "-n", namespace)["spec"]["replicas"] == 5
    status = {"status": {"replicas": 5, "readyReplicas": 4, "selector": "kiln.dev/deployment=classifier"}}
    cluster.kubectl(
        "patch", "-n", namespace, "md/classifier", "--subresource=status", "--type=merge", "-p", json.dumps(status)
    )
    raw = cluster.kubectl(
        "get", "--raw", f"/apis/kiln.dev/v1alpha1/namespaces/{namespace}/modeldeployments/classifier/scale"
    ).stdout
    scale = json.loads(raw)
    assert scale["kind"] == "Scale"
    assert scale["spec"]["replicas"] == 5
    assert scale["status"] == {"replicas": 5, "selector": "kiln.dev/deployment=classifier"}


CONDITION = {
    "type": "Ready",
    "status": "False",
    "reason": "Running",
    "message": "training",
    "lastTransitionTime": "2026-11-22T10:00:00Z",
    "observedGeneration": 1,
}
FULL_STATUS = {
    TJ: {
        "observedGeneration": 1,
        "conditions": [CONDITION],
        "phase": "Running",
        "startTime": "2026-11-22T10:00:00Z",
        "attempt": 2,
        "jobName": "classifier-a2",
        "restarts": {"infrastructure": 1, "user": 0},
        "preemptions": 1,
        "pods": {"pending": 0, "running": 1, "succeeded": 0, "failed": 0},
        "progress": {
            "step": 500,
            "totalSteps": 1000,
            "percent": 50,
            "epoch": 1.5,
            "loss": 0.25,
            "samplesPerSecond": 812.5,
            "heartbeatTime": "2026-11-22T10:05:00Z",
            "eta": "2026-11-22T10:10:00Z",
        },
        "artifact": {
            "uri": "pvc://kiln/a",
            "digest": "sha256:" + "b" * 64,
            "shortDigest": "b" * 12,
            "format": "hf-transformers",
            "metrics": {"eval_accuracy": 0.91},
        },
        "lastCheckpoint": {"uri": "pvc://kiln/c/500", "step": 500, "time": "2026-11-22T10:04:00Z"},
        "failure": {
            "class": "Infrastructure",
            "reason": "RendezvousTimeout",
            "message": "m",
            "exitCode": 76,
            "pod": "p",
            "logTail": "t",
            "time": "2026-11-22T10:01:00Z",
        },
        "gpuSeconds": 3600,
    },
    MC: {
        "observedGeneration": 1,
        "conditions": [CONDITION],
        "phase": "Promoted",
        "report": {
            "source": {
                "sizeBytes": 90,
                "parameters": 22,
                "metric": 0.91,
                "peakMemoryBytes": 5,
                "sessionStartSeconds": 0.2,
                "latency": [
                    {
                        "batchSize": 1,
                        "sequenceLength": 128,
                        "p50Ms": 1.0,
                        "p95Ms": 2.0,
                        "p99Ms": 3.0,
                        "throughput": 500.0,
                    }
                ],
            },
            "candidate": {"sizeBytes": 23, "parameters": 22, "metric": 0.905},
            "sizeRatio": 0.25,
            "speedup": 2.1,
            "p95Ms": 0.9,
            "accuracyDrop": 0.005,
            "agreement": 0.99,
            "maxLogitDiff": 0.03,
            "nodesByProvider": {"CPUExecutionProvider": 120},
            "cpuFallbackNodes": [],
            "recipe": ["export", "optimize", "quantize"],
            "gates": [{"name": "maxAccuracyDrop", "passed": True, "value": 0.005, "threshold": 0.01, "message": "ok"}],
        },
        "sourceArtifact": {"uri": "pvc://kiln/a", "digest": "sha256:" + "b" * 64},
        "candidate": {"uri": "pvc://kiln/c", "digest": "sha256:" + "c" * 64, "shortDigest": "c" * 12, "format": "onnx"},
        "promoted": {
            "uri": "pvc://kiln/models/s/versions/1",
            "digest": "sha256:" + "c" * 64,
            "shortDigest": "c" * 12,
            "modelName": "s",
            "version": 1,
        },
    },
    MD: {
        "observedGeneration": 1,
        "conditions": [CONDITION],
        "phase": "Progressing",
        "replicas": 3,
        "readyReplicas": 2,
        "selector": "kiln.dev/deployment=classifier",
        "url": "http://classifier.ns.svc.cluster.local:8080",
        "current": {"revision": 1, "uri": "u", "digest": "d", "shortDigest": "s", "deployment": "sentiment-r1"},
        "candidate": {"revision": 2, "uri": "u2", "digest": "d2", "shortDigest": "s2", "deployment": "sentiment-r2"},
        "canaryWeight": 10,
        "canaryStep": 0,
        "p95LatencyMs": 3.5,
        "history": [
            {
                "revision": 1,
                "digest": "d",
                "outcome": "Promoted",
                "reason": "r",
                "startTime": "2026-11-22T10:00:00Z",
                "endTime": "2026-11-22T10:10:00Z",
            }
        ],
    },
}


@pytest.mark.parametrize("path", [*FULL_STATUS])
def test_every_status_field_the_operator_writes_is_kept(cluster: Cluster, crds: None, namespace: str, path: str):
    doc = sample(path)
    ref = f"{doc['kind'].lower()}/{doc['metadata']['name']}"
    cluster.kubectl("create", "-n", namespace, "-f", "-", stdin=json.dumps(doc))
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        ref,
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": FULL_STATUS[path]}),
    )
    assert cluster.get(ref, "-n", namespace)["status"] == FULL_STATUS[path]  # nothing pruned


def test_printer_columns(cluster: Cluster, crds: None, namespace: str):
    cluster.kubectl("apply", "-n", namespace, "-f", str(SAMPLES / TJ))
    cluster.kubectl(
        "patch",
        "-n",
        namespace,
        "tj/classifier",
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": FULL_STATUS[TJ]}),
    )
    header, row = cluster.kubectl("get", "-n", namespace, "tj").stdout.splitlines()
    assert header.split() == ["NAME", "PHASE", "PROGRESS", "LOSS", "DIGEST", "AGE"]
    assert row.split()[:5] == ["classifier", "Running", "50", "0.25", "b" * 12]
