"""ModelCompression -> its compressor Job: one batch/v1 Job per (source artifact, attempt), running the compressor
program (images/compressor/) with the spec passed through and the source resolved. Pure; the handler adopts."""

from __future__ import annotations

import copy
import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any

from kiln_operator import labels
from kiln_operator.builders.pods import (
    COMPRESSOR,
    CONTAINER_SECURITY,
    POD_SECURITY,
    TMP_MOUNT,
    container_resources,
    key_volumes,
    merge,
    placement,
    pvc_mounts,
    reassert,
    tmp_volume,
)

Obj = dict[str, Any]
CONTAINER = "compressor"


def source_key(uri: str, digest: str | None) -> str:
    """10 hex digits naming a source artifact: its digest's, else the URI's hash."""
    if digest:
        return digest.split(":", 1)[1][:10]
    return hashlib.sha256(uri.encode()).hexdigest()[:10]


def job_name(mc: str, key: str, attempt: int) -> str:
    """``<mc>-<source>-<attempt>``: a new source artifact is a new compression; names stay within 63."""
    if not 1 <= attempt <= 99:
        raise ValueError(f"attempt must be in 1..99, got {attempt}")
    return f"{mc}-{key}-{attempt}"


def child_labels(mc: str, key: str | None = None, attempt: int | None = None) -> dict[str, str]:
    out = {**labels.recommended("kiln-compressor", mc, "compression"), labels.MODELCOMPRESSION: mc}
    if key is not None:
        out[labels.SOURCE] = key
    if attempt is not None:
        out[labels.ATTEMPT] = str(attempt)
    return out


def _uris(node: Any, path: str = "spec") -> list[tuple[str, str]]:
    """Every ``uri`` in the spec (source, evaluation, calibration, distillation data and student), with its path."""
    found: list[tuple[str, str]] = []
    if isinstance(node, Mapping):
        for k, v in node.items():
            if k in ("uri", "fromUri") and isinstance(v, str):
                found.append((f"{path}.{k}", v))
            else:
                found += _uris(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            found += _uris(v, f"{path}[{i}]")
    return found


def compressor_job(
    body: Mapping[str, Any],
    source: Mapping[str, Any],
    attempt: int,
    output_uri: str,
    *,
    image_default: str | None = None,
    artifact_env: Sequence[Mapping[str, Any]] = (),
) -> Obj:
    """The Job that compresses ``source`` ({uri, digest}) into ``output_uri``. GPU targets get their GPUs and the
    GPU toleration, so the benchmark runs on the provider the artifact is for."""
    meta, spec = body["metadata"], body["spec"]
    mc, namespace = meta["name"], meta["namespace"]
    image = spec.get("image") or image_default
    if not image:
        raise ValueError("spec.image is empty and no default image is configured")
    key = source_key(source["uri"], source.get("digest"))
    resolved = copy.deepcopy(dict(spec))
    resolved["source"] = {k: v for k, v in (("uri", source["uri"]), ("digest", source.get("digest"))) if v}
    volumes, mounts, pvc_env = pvc_mounts([*((f, u, True) for f, u in _uris(resolved)), ("output", output_uri, False)])
    kiln_env: list[Obj] = [
        {"name": "KILN_COMPRESSION_SPEC", "value": json.dumps(resolved, sort_keys=True, separators=(",", ":"))},
        {"name": "KILN_OUTPUT_URI", "value": output_uri},
        {"name": "KILN_JOB_NAMESPACE", "value": namespace},
        {"name": "KILN_JOB_NAME", "value": mc},
        {"name": "KILN_JOB_UID", "value": meta.get("uid", "")},
        {"name": "KILN_IMAGE", "value": image},
        *pvc_env,
    ]
    key_vols, key_mounts, signing_key, trusted = key_volumes(spec)
    if signing_key:
        kiln_env.append({"name": "KILN_SIGNING_KEY", "value": signing_key})
    if trusted:
        kiln_env.append({"name": "KILN_TRUSTED_KEYS", "value": trusted})
    names = {e["name"] for e in kiln_env}
    user_env = merge([copy.deepcopy(dict(e)) for e in artifact_env], copy.deepcopy(spec.get("env") or []))
    container: Obj = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": spec.get("imagePullPolicy") or "IfNotPresent",
        "command": ["python", "-m", "kiln_compressor"],
        "env": [e for e in user_env if e["name"] not in names] + kiln_env,
        "resources": container_resources(spec, COMPRESSOR),
        "volumeMounts": [*mounts, TMP_MOUNT, *key_mounts],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    scheduling = spec.get("scheduling") or {}
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "enableServiceLinks": False,
        "automountServiceAccountToken": False,  # the compressor never calls the API
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": [*volumes, tmp_volume(COMPRESSOR), *key_vols],
    }
    pod_spec.update(placement(spec))
    pod_labels = child_labels(mc, key, attempt)
    pod_meta: Obj = {"labels": dict(pod_labels)}
    override = spec.get("podTemplate") or {}
    if override:
        pod_meta = merge(pod_meta, override.get("metadata") or {})
        pod_meta["labels"] = {**pod_meta.get("labels", {}), **pod_labels}
        pod_spec = merge(pod_spec, override.get("spec") or {})
        pod_spec["restartPolicy"] = "Never"
        ours = next((c for c in pod_spec["containers"] if c.get("name") == CONTAINER), None)
        if ours is None:
            ours = copy.deepcopy(container)
            pod_spec["containers"].insert(0, ours)
        ours.update(image=image, command=list(container["command"]))
        ours["env"] = [e for e in ours.get("env") or [] if e.get("name") not in names] + copy.deepcopy(kiln_env)
        pod_spec["volumes"] = reassert(pod_spec.get("volumes") or [], [*volumes, tmp_volume(COMPRESSOR), *key_vols])
        ours["volumeMounts"] = reassert(ours.get("volumeMounts") or [], [*mounts, TMP_MOUNT, *key_mounts])
    job_labels = child_labels(mc, key, attempt)
    queue = scheduling.get("queueName")
    if queue:
        job_labels[labels.QUEUE] = queue
    return copy.deepcopy(
        {
            "apiVersion": "batch/v1",
            "kind": "Job",
            "metadata": {"name": job_name(mc, key, attempt), "namespace": namespace, "labels": job_labels},
            "spec": {
                "backoffLimit": 0,
                "suspend": bool(queue),
                "template": {"metadata": pod_meta, "spec": pod_spec},
            },
        }
    )
