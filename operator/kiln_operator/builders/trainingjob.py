"""TrainingJob -> its children: one headless Service per TrainingJob and one Indexed Job per attempt.

The layout is JobSet's: an Indexed Job with one pod per node, whose pods get stable DNS names
(``<job>-<index>.<service>``) through a headless Service, so rank 0 is reachable before any pod is Ready.
The handler adopts every object returned here with ``kopf.adopt(obj, owner=body, strict=True)``; the builders
set the namespace and leave ownerReferences alone.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kiln_operator import labels
from kiln_operator.builders.pods import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    TMP_MOUNT,
    TRAINER,
    container_resources,
    dns_label,
    key_volumes,
    merge,
    placement,
    pvc_mounts,
    quantity,
    reassert,
    shm_volume,
    tmp_volume,
)

Obj = dict[str, Any]

CONTAINER = "trainer"
MASTER_PORT = 29500
COMPLETION_INDEX = f"metadata.annotations['{labels.COMPLETION_INDEX}']"
# The spec fields the trainer reads from KILN_TRAINING_SPEC; it rejects any other top-level field.
TRAINER_FIELDS = ("model", "dataset", "output", "hyperparameters", "checkpoint", "resume")
# (field, read-only) of every URI the trainer may open; a pvc:// one needs its claim mounted.
URI_FIELDS = (("model", True), ("dataset", True), ("resume.fromUri", True), ("output", False), ("checkpoint", False))
MAX_ATTEMPT = 999_999_999  # 48 (name) + "-" + 9 digits + "-1023" (pod index) = 63, a DNS label


def _base(tj_name: str) -> str:
    return dns_label(tj_name, "tj")


def job_name(tj_name: str, attempt: int) -> str:
    """``<tj>-<attempt>``: one Job per attempt, so a replaced attempt never reuses a name still being deleted."""
    if not 1 <= attempt <= MAX_ATTEMPT:
        raise ValueError(f"attempt must be in 1..{MAX_ATTEMPT}, got {attempt}")
    return f"{_base(tj_name)}-{attempt}"


def service_name(tj_name: str) -> str:
    """``<tj>-svc``: one headless Service per TrainingJob, shared by all its attempts."""
    return f"{_base(tj_name)}-svc"


def child_labels(tj_name: str, attempt: int | None = None) -> dict[str, str]:
    out = {**labels.recommended("kiln-trainer", tj_name, "training"), labels.TRAININGJOB: tj_name}
    if attempt is not None:
        out[labels.ATTEMPT] = str(attempt)
    return out


def headless_service(body: Mapping[str, Any]) -> Obj:
    """The headless Service that gives every pod of every attempt the DNS name ``<job>-<index>.<service>``."""
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service_name(name), "namespace": namespace, "labels": child_labels(name)},
        "spec": {
            "clusterIP": "None",
            # Ranks rendezvous before any pod is Ready (there is no readiness probe to pass).
            "publishNotReadyAddresses": True,
            "selector": {labels.TRAININGJOB: name},
            "ports": [{"name": "rendezvous", "port": MASTER_PORT, "targetPort": MASTER_PORT, "protocol": "TCP"}],
        },
    }


def _get(spec: Mapping[str, Any], path: str) -> Any:
    node: Any = spec
    for key in path.split("."):
        node = node.get(key) if isinstance(node, Mapping) else None
    return node


def resolve_locations(body: Mapping[str, Any], artifact_root: str | None) -> Obj:
    """The spec with output.uri and checkpoint.uri filled in: output defaults to
    ``<artifact_root>/<namespace>/<name>-<uid[:8]>/model`` (when the operator has a store), checkpoints to
    ``<output>-checkpoints``, so every attempt of this TrainingJob (and nothing else) resumes from there."""
    meta, spec = body["metadata"], copy.deepcopy(dict(body["spec"]))
    output = (spec.get("output") or {}).get("uri")
    if not output and artifact_root:
        output = f"{artifact_root.rstrip('/')}/{meta['namespace']}/{meta['name']}-{str(meta.get('uid', ''))[:8]}/model"
        spec["output"] = {**(spec.get("output") or {}), "uri": output}
    checkpoint = dict(spec.get("checkpoint") or {})
    if not checkpoint.get("uri") and output:
        checkpoint["uri"] = f"{output.rstrip('/')}-checkpoints"
        spec["checkpoint"] = checkpoint
    return spec


def processes_per_node(spec: Mapping[str, Any]) -> int:
    """spec.processesPerNode, else one process per GPU, else 1."""
    return int(spec.get("processesPerNode") or (spec.get("resources") or {}).get("gpus") or 1)


def uri_uses(spec: Mapping[str, Any]) -> list[tuple[str, str, bool]]:
    """(field, uri, read-only) of every URI the trainer may open."""
    uses = []
    for field, read_only in URI_FIELDS:
        value = _get(spec, field)
        uri = value.get("uri") if isinstance(value, Mapping) else value
        if uri:
            uses.append((f"spec.{field}", uri, read_only))
    return uses


def _launch(spec: Mapping[str, Any], nodes: int, nproc: int, master: str) -> list[str]:
    """The container command. One process per pod runs the program directly (its exit code is the container's);
    several run under torchrun, as docs/trainer.md prescribes. A spec.command replaces the per-process
    program (under ``torchrun --no-python`` when there are several processes)."""
    program = list(spec.get("command") or ["python", "-m", "kiln_trainer"])
    if nproc == 1:
        return program
    torchrun = [
        "torchrun",
        f"--nnodes={nodes}",
        f"--nproc-per-node={nproc}",
        # Kubernetes expands $(VAR) from the container env: the rank comes from the completion index.
        "--node-rank=$(PET_NODE_RANK)",
        f"--master-addr={master}",
        f"--master-port={MASTER_PORT}",
    ]
    if spec.get("command"):
        return [*torchrun, "--no-python", *program]
    return [*torchrun, "-m", "kiln_trainer"]


def _kiln_env(body: Mapping[str, Any], image: str, master: str, pvc_env: Sequence[Obj]) -> list[Obj]:
    """The env Kiln owns: the trainer contract and the torchrun / PET_* rendezvous (docs/trainer.md)."""
    spec, meta = body["spec"], body["metadata"]
    nodes, nproc = int(spec.get("nodes") or 1), processes_per_node(spec)
    trainer_spec = {k: spec[k] for k in TRAINER_FIELDS if k in spec}

    def rank(name: str) -> Obj:  # a fresh dict each time: no aliasing inside the output
        return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}}

    env: list[Obj] = [
        {"name": "KILN_TRAINING_SPEC", "value": json.dumps(trainer_spec, sort_keys=True, separators=(",", ":"))},
        {"name": "KILN_JOB_NAMESPACE", "value": meta["namespace"]},
        {"name": "KILN_JOB_NAME", "value": meta["name"]},
        {"name": "KILN_JOB_UID", "value": meta.get("uid", "")},
        {"name": "KILN_IMAGE", "value": image},
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(nodes)},
        {"name": "NPROC_PER_NODE", "value": str(nproc)},
        rank("NODE_RANK"),
        {"name": "WORLD_SIZE", "value": str(nodes * nproc)},  # total processes (docs/trainer.md)
        {"name": "PET_NNODES", "value": str(nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        rank("PET_NODE_RANK"),
        {"name": "PET_MASTER_ADDR", "value": master},
        {"name": "PET_MASTER_PORT", "value": str(MASTER_PORT)},
    ]
    if nproc == 1:
        # One process per pod: its rank is the node rank. Under torchrun, torchrun sets RANK/LOCAL_RANK per worker.
        env += [rank("RANK"), {"name": "LOCAL_RANK", "value": "0"}]
    return env + [dict(e) for e in pvc_env]  # KILN_PVC_ROOT: where the claims are mounted


def threads_env(spec: Mapping[str, Any], nproc: int) -> list[Obj]:
    """OMP_NUM_THREADS for CPU training: the pod's CPU limit shared by its processes. PyTorch otherwise starts a
    thread per core of the node, and a pod limited to fewer cores spends its quota on throttled threads. spec.env
    may set it otherwise."""
    res = spec.get("resources") or {}
    if res.get("gpus") or res.get("cpu") is None:
        return []
    return [{"name": "OMP_NUM_THREADS", "value": str(max(1, int(quantity(res["cpu"]) // nproc)))}]


def indexed_job(
    body: Mapping[str, Any],
    attempt: int,
    *,
    image_default: str | None = None,
    artifact_env: Sequence[Mapping[str, Any]] = (),
    suspend: bool | None = None,
    annotations: Mapping[str, str] | None = None,
) -> Obj:
    """The batch/v1 Indexed Job of one attempt: one pod per node, completion index = node rank.

    ``artifact_env`` is the operator's store configuration for the pod (e.g. ``kiln_artifacts.k8s.s3_env(secret)``
    and ``hf_env(secret)``); spec.env may override it, but not the env Kiln owns. ``image_default`` is used when
    the spec names no image. backoffLimit 0: one failed pod fails the attempt and the operator replaces the whole
    group; no activeDeadlineSeconds: deadlines span attempts, so the operator enforces them. ``suspend`` defaults
    to spec.suspend (or a queue name: Kueue unsuspends); ``annotations`` go on the Job (the ledger)."""
    meta, spec = body["metadata"], body["spec"]
    tj, namespace = meta["name"], meta["namespace"]
    image = spec.get("image") or image_default
    if not image:
        raise ValueError("spec.image is empty and no default image is configured")
    name, nodes, nproc = job_name(tj, attempt), int(spec.get("nodes") or 1), processes_per_node(spec)
    # Index 0's stable DNS name through the headless Service; one node needs no DNS (and no Service lookup).
    master = f"{name}-0.{service_name(tj)}" if nodes > 1 else "127.0.0.1"
    scheduling = spec.get("scheduling") or {}

    pvc_volumes, pvc_mounted, pvc_env = pvc_mounts(uri_uses(spec))
    volumes = [*pvc_volumes, tmp_volume(TRAINER), shm_volume(spec, TRAINER)]
    key_vols, key_mounts, signing_key, _ = key_volumes(spec)
    volumes += key_vols
    mounts = [*pvc_mounted, TMP_MOUNT, {"name": "dshm", "mountPath": "/dev/shm"}, *key_mounts]
    kiln_env = _kiln_env(body, image, master, pvc_env)
    if signing_key:
        kiln_env.append({"name": "KILN_SIGNING_KEY", "value": signing_key})
    kiln_names = {e["name"] for e in kiln_env}
    user_env = merge(
        [*threads_env(spec, nproc), *(copy.deepcopy(dict(e)) for e in artifact_env)],
        copy.deepcopy(spec.get("env") or []),
    )
    command = _launch(spec, nodes, nproc, master)
    args = list(spec.get("args") or [])

    container: Obj = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": spec.get("imagePullPolicy") or "IfNotPresent",
        "command": command,
        "args": args,
        "env": [e for e in user_env if e["name"] not in kiln_names] + kiln_env,
        "resources": container_resources(spec, TRAINER),
        "ports": [{"name": "rendezvous", "containerPort": MASTER_PORT, "protocol": "TCP"}],
        "volumeMounts": mounts,
        # The trainer writes its JSON result there; a crash before that still leaves the log tail.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "subdomain": service_name(tj),
        "enableServiceLinks": False,  # no env var per Service in the namespace (it can be thousands)
        # The trainer checkpoints on SIGTERM: one step plus one checkpoint write must fit (docs/trainer.md).
        "terminationGracePeriodSeconds": 300,
        "automountServiceAccountToken": False,  # the trainer never calls the API
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
    }
    pod_spec.update(placement(spec))
    pod_labels = child_labels(tj, attempt)
    pod_meta: Obj = {"labels": dict(pod_labels)}

    override = spec.get("podTemplate") or {}
    if override:
        pod_meta = merge(pod_meta, override.get("metadata") or {})
        pod_meta["labels"] = {**pod_meta.get("labels", {}), **pod_labels}  # the Service selects on these
        pod_spec = merge(pod_spec, override.get("spec") or {})
        # Re-assert what Kiln owns: restart semantics, DNS, the trainer's launch, env and artifact volumes.
        pod_spec.update(restartPolicy="Never", subdomain=service_name(tj))
        pod_spec["volumes"] = reassert(pod_spec.get("volumes") or [], volumes)
        trainer = next((c for c in pod_spec["containers"] if c.get("name") == CONTAINER), None)
        if trainer is None:  # a containers list without names replaced ours: put the trainer back first
            trainer = copy.deepcopy(container)
            pod_spec["containers"].insert(0, trainer)
        trainer.update(image=image, command=list(command), args=list(args))
        trainer["env"] = reassert(trainer.get("env") or [], kiln_env)
        trainer["volumeMounts"] = reassert(trainer.get("volumeMounts") or [], mounts)

    job_labels = child_labels(tj, attempt)
    queue = scheduling.get("queueName")
    if queue:
        job_labels[labels.QUEUE] = queue
    job_annotations = dict(annotations or {})
    job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": job_labels, "annotations": job_annotations},
        "spec": {
            "completionMode": "Indexed",
            "completions": nodes,
            "parallelism": nodes,
            "backoffLimit": 0,
            # The Job's Failed condition then names the disruption even after the evicted pod is gone.
            "podFailurePolicy": {
                "rules": [{"action": "FailJob", "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]}]
            },
            # Kueue admits a queued Job by flipping suspend; spec.suspend holds it as well.
            "suspend": (bool(queue) or bool(spec.get("suspend"))) if suspend is None else suspend,
            "template": {"metadata": pod_meta, "spec": pod_spec},
        },
    }
    return copy.deepcopy(job)  # nothing shared with the body or between fields: the handler may edit it freely
