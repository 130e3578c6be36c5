"""The pod building blocks every workload shares: hardening, placement, resources, artifact volumes, the
podTemplate merge and names. Pure, like every builder."""

from __future__ import annotations

import copy
import hashlib
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kiln_artifacts.k8s import pvc_volume
from kiln_artifacts.uri import parse_uri

Obj = dict[str, Any]

GPU = "nvidia.com/gpu"
NONROOT = 65532  # the images' USER

# The hardening every workload pod gets (restricted Pod Security Standard); the images run as NONROOT.
CONTAINER_SECURITY: Obj = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "capabilities": {"drop": ["ALL"]},
}
POD_SECURITY: Obj = {
    "runAsNonRoot": True,
    "runAsUser": NONROOT,
    "runAsGroup": NONROOT,
    "fsGroup": NONROOT,  # PVCs are writable by the workload
    "fsGroupChangePolicy": "OnRootMismatch",  # no recursive chown of a large data set on every start
    "seccompProfile": {"type": "RuntimeDefault"},
}
# The root filesystem is read-only: HOME, TMPDIR and caches live in an emptyDir (tmp_volume) mounted here.
TMP_MOUNT: Obj = {"name": "tmp", "mountPath": "/tmp"}

_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def quantity(value: Any) -> float:
    """A plain or milli Kubernetes quantity as a number ("2" -> 2.0, "500m" -> 0.5): CPU counts and metric targets."""
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def dns_label(name: str, prefix: str) -> str:
    """A DNS-1035 label of at most 48 characters for an object name (a DNS-1123 subdomain, at most 48).

    Service names and pod hostnames must be labels that start with a letter; names that are not get a readable
    prefix and a hash suffix, so two objects never share children (``a.b`` and ``a-b`` differ)."""
    if _DNS1035.match(name) and len(name) <= 48:
        return name
    safe = re.sub(r"[^a-z0-9-]", "-", name.lower())[:36].strip("-")
    return f"{prefix}-{safe}-{hashlib.sha256(name.encode()).hexdigest()[:8]}".replace("--", "-")


def placement(spec: Mapping[str, Any]) -> Obj:
    """The pod spec fields of spec.scheduling, plus the GPU toleration when GPUs are asked for."""
    scheduling = spec.get("scheduling") or {}
    out = {
        k: copy.deepcopy(scheduling[k]) for k in ("nodeSelector", "affinity", "priorityClassName") if scheduling.get(k)
    }
    tolerations = copy.deepcopy(list(scheduling.get("tolerations") or []))
    gpu = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}
    if (spec.get("resources") or {}).get("gpus") and gpu not in tolerations:
        tolerations.append(gpu)
    if tolerations:
        out["tolerations"] = tolerations
    return out


@dataclass(frozen=True)
class Sizing:
    """What a workload container asks for where spec.resources says nothing, and how large its scratch space may
    grow. A request at all keeps a pod out of BestEffort (evicted first, invisible to Kueue's cpu/memory quota);
    defaults are requests only, so a larger model than the default fits where the node has room."""

    cpu: str
    memory: str
    tmp: str  # /tmp (an emptyDir on the node's disk): caches, downloads, staged artifacts
    ephemeral: str  # the ephemeral-storage request: the scheduler then places the pod where /tmp can grow


# Sized for the sample models: the trainer and the compressor hold a model, its data and (the compressor) two ONNX
# sessions; the server one session. /tmp holds a Hugging Face download or an s3:// artifact cache.
TRAINER = Sizing(cpu="1", memory="2Gi", tmp="20Gi", ephemeral="1Gi")
COMPRESSOR = Sizing(cpu="1", memory="2Gi", tmp="20Gi", ephemeral="1Gi")
SERVER = Sizing(cpu="250m", memory="512Mi", tmp="10Gi", ephemeral="256Mi")


def container_resources(spec: Mapping[str, Any], sizing: Sizing) -> Obj:
    """spec.resources: cpu and memory named are the request and the limit (Guaranteed where both are); the ones not
    named get the kind's default as a request only; GPUs are limits (extended resources)."""
    res = spec.get("resources") or {}
    fixed = {k: res[k] for k in ("cpu", "memory") if res.get(k) is not None}
    defaults = {"cpu": sizing.cpu, "memory": sizing.memory}
    requests = {**{k: v for k, v in defaults.items() if k not in fixed}, **fixed, "ephemeral-storage": sizing.ephemeral}
    out: Obj = {"requests": requests}
    if fixed:
        out["limits"] = dict(fixed)
    if res.get("gpus"):
        # Extended resources are limits only; the request defaults to the limit.
        out.setdefault("limits", {})[GPU] = res["gpus"]
    return out


def tmp_volume(sizing: Sizing) -> Obj:
    """The writable /tmp on the read-only root filesystem, bounded: a runaway cache evicts its pod, not the node."""
    return {"name": "tmp", "emptyDir": {"sizeLimit": sizing.tmp}}


def shm_volume(spec: Mapping[str, Any], sizing: Sizing) -> Obj:
    """A memory-backed /dev/shm (DataLoader workers, NCCL) bounded by the container's memory: its pages count
    against the memory limit anyway, and without a bound they could take the node's."""
    memory = (spec.get("resources") or {}).get("memory") or sizing.memory
    return {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": memory}}


def pvc_mounts(uses: Iterable[tuple[str, str, bool]]) -> tuple[list[Obj], list[Obj], list[Obj]]:
    """Volumes, mounts and env for the pvc:// URIs among ``uses`` ((field, uri, read-only) each): each claim once,
    read-write if any use of it writes."""
    found: dict[str, Obj] = {}
    for field, uri, read_only in uses:
        if not uri or parse_uri(uri, field=field).scheme != "pvc":
            continue
        pv = pvc_volume(uri, read_only=read_only, field=field)
        prev = found.get(pv["volume"]["name"])
        if prev is None or (prev["volumeMount"]["readOnly"] and not read_only):
            found[pv["volume"]["name"]] = pv
    ordered = [found[k] for k in sorted(found)]
    env = copy.deepcopy(ordered[0]["env"]) if ordered else []
    return [pv["volume"] for pv in ordered], [pv["volumeMount"] for pv in ordered], env


def merge(base: Any, override: Any) -> Any:
    """A small strategic-merge: dicts merge recursively, a None value removes a key, lists whose items all have a
    ``name`` (containers, volumes, env, volumeMounts) merge by name, other lists are replaced. Never mutates."""
    if isinstance(base, Mapping) and isinstance(override, Mapping):
        out = {k: copy.deepcopy(v) for k, v in base.items()}
        for k, v in override.items():
            if v is None:
                out.pop(k, None)
            else:
                out[k] = merge(out[k], v) if k in out else copy.deepcopy(v)
        return out
    if isinstance(base, list) and isinstance(override, list) and _named(base) and _named(override):
        by_name = {item["name"]: item for item in override}
        out_list = [merge(item, by_name.pop(item["name"])) if item["name"] in by_name else item for item in base]
        return copy.deepcopy(out_list) + [copy.deepcopy(item) for item in override if item["name"] in by_name]
    return copy.deepcopy(override)


def reassert(items: list[Obj], owned: Sequence[Obj]) -> list[Obj]:
    """Drop the merged items that carry an owned name, then append the owned ones as built."""
    names = {o["name"] for o in owned}
    return [i for i in items if i.get("name") not in names] + copy.deepcopy(list(owned))


def _named(items: list[Any]) -> bool:
    return all(isinstance(i, Mapping) and "name" in i for i in items)


SIGNING_DIR = "/etc/kiln/signing"
SIGNING_KEY = "private-key.pem"
TRUSTED_KEYS_DIR = "/etc/kiln/trusted-keys"


def key_volumes(spec: Mapping[str, Any]) -> tuple[list[Obj], list[Obj], str | None, str | None]:
    """spec.signing's Secret and spec.verification's ConfigMap as volumes and read-only mounts, with the paths the
    programs take (the signing key file, the trusted keys folder; None when not asked for)."""
    volumes: list[Obj] = []
    mounts: list[Obj] = []
    key = trusted = None
    secret = (spec.get("signing") or {}).get("secretName")
    if secret:
        # Only the one key, readable by the workload's group (fsGroup) and nobody else.
        volumes.append(
            {
                "name": "kiln-signing-key",
                "secret": {
                    "secretName": secret,
                    "items": [{"key": SIGNING_KEY, "path": SIGNING_KEY}],
                    "defaultMode": 0o440,
                },
            }
        )
        mounts.append({"name": "kiln-signing-key", "mountPath": SIGNING_DIR, "readOnly": True})
        key = f"{SIGNING_DIR}/{SIGNING_KEY}"
    config_map = (spec.get("verification") or {}).get("trustedKeysConfigMap")
    if config_map:
        volumes.append({"name": "kiln-trusted-keys", "configMap": {"name": config_map}})
        mounts.append({"name": "kiln-trusted-keys", "mountPath": TRUSTED_KEYS_DIR, "readOnly": True})
        trusted = TRUSTED_KEYS_DIR
    return volumes, mounts, key, trusted
