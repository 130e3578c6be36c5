"""ModelDeployment -> its children: a Deployment of the inference server per artifact revision, one Service in
front of every revision in service (the traffic split follows the ready replicas), a PodDisruptionBudget and,
with autoscaling, a HorizontalPodAutoscaler on the ModelDeployment's scale subresource. Pure; the handler adopts.

A revision is an artifact: its key is the digest's first 10 hex digits (or the URI's hash when no digest is
known), so the Deployment serving an artifact always has the same name and a restarted operator finds it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from typing import Any

from kiln_operator import labels
from kiln_operator.builders.pods import (
    CONTAINER_SECURITY,
    POD_SECURITY,
    SERVER,
    TMP_MOUNT,
    TRUSTED_KEYS_DIR,
    container_resources,
    dns_label,
    key_volumes,
    merge,
    placement,
    pvc_mounts,
    quantity,
    tmp_volume,
)
from kiln_operator.resources import MODEL_DEPLOYMENT

Obj = dict[str, Any]
CONTAINER = "server"
HTTP_PORT = 8080
GRPC_PORT = 8081
METRICS_PORT = 9090
TLS_DIR = "/etc/kiln/tls"
# The ClusterRoles manifests/server-roles/ installs for servers with spec.service.auth Kubernetes.
TOKEN_REVIEW_ROLE = "kiln-server-tokenreview"
ACCESS_REVIEW_ROLE = "kiln-server-access-review"
PROVIDERS = {"CPUExecutionProvider": "cpu", "CUDAExecutionProvider": "cuda", "TensorrtExecutionProvider": "tensorrt"}
# Pods metric names the custom metrics API serves per autoscaling.metric (Prometheus Adapter rules:
# docs/modeldeployment.md).
POD_METRICS = {
    "InFlightRequests": "kiln_server_inflight_requests",
    "QueueTimeMs": "kiln_server_queue_time_ms",
    "P95LatencyMs": "kiln_server_p95_latency_ms",
}


def revision_key(uri: str, digest: str | None) -> str:
    if digest:
        return digest.split(":", 1)[1][:10]
    return hashlib.sha256(uri.encode()).hexdigest()[:10]


def base(md: str) -> str:
    return dns_label(md, "md")


def deployment_name(md: str, key: str) -> str:
    return f"{base(md)}-{key}"


def selector(md: str) -> dict[str, str]:
    """Every serving pod of the ModelDeployment, all revisions: the Service's, the PDB's and the scale selector."""
    return {labels.MODELDEPLOYMENT: base(md)}


def child_labels(md: str, key: str | None = None) -> dict[str, str]:
    out = {**labels.recommended("kiln-server", md, "serving"), **selector(md)}
    if key is not None:
        out[labels.REVISION] = key
    return out


def service_url(md: Mapping[str, Any]) -> str:
    meta, spec = md["metadata"], md.get("spec") or {}
    port = (spec.get("service") or {}).get("port") or HTTP_PORT
    scheme = "https" if tls_secret(md) else "http"
    return f"{scheme}://{base(meta['name'])}.{meta['namespace']}.svc.cluster.local:{port}"


def grpc_address(md: Mapping[str, Any]) -> str:
    meta, spec = md["metadata"], md.get("spec") or {}
    port = (spec.get("service") or {}).get("grpcPort") or GRPC_PORT
    return f"{base(meta['name'])}.{meta['namespace']}.svc.cluster.local:{port}"


def _threads(spec: Mapping[str, Any]) -> int:
    """intraOpThreads 0 means one per CPU: the container's CPU request, not the node's cores ORT would see."""
    runtime = spec.get("runtime") or {}
    if runtime.get("intraOpThreads"):
        return int(runtime["intraOpThreads"])
    cpu = (spec.get("resources") or {}).get("cpu")
    return max(1, math.ceil(quantity(cpu))) if cpu else 0


def _monitoring_env(md: Mapping[str, Any], revision: str) -> dict[str, str]:
    """spec.monitoring as the server's settings (docs/server.md); its defaults are the API's."""
    mon = (md.get("spec") or {}).get("monitoring") or {}
    if not mon.get("enabled", True):
        return {"KILN_SERVER_MONITORING": "off"}
    env = {
        "KILN_SERVER_MONITORING": "on",
        "KILN_SERVER_DEPLOYMENT": md["metadata"]["name"],
        "KILN_SERVER_REVISION": revision,
        "KILN_SERVER_DRIFT_WINDOW": str(mon.get("windowSamples", 1000)),
        "KILN_SERVER_DRIFT_MAX_AGE": str(mon.get("windowSeconds", 0)),
        "KILN_SERVER_DRIFT_MIN_SAMPLES": str(mon.get("minSamples", 200)),
        "KILN_SERVER_DRIFT_THRESHOLD": str(mon.get("driftThreshold", 0.2)),
        "KILN_SERVER_REFERENCE_SAMPLES": str(mon.get("referenceSamples", 1000)),
        "KILN_SERVER_ACCESS_LOG_RATE": str(mon.get("accessLogRate", 0)),
    }
    if mon.get("thresholds"):
        env["KILN_SERVER_DRIFT_THRESHOLDS"] = ",".join(f"{k}={v}" for k, v in sorted(mon["thresholds"].items()))
    if mon.get("referenceUri"):
        env["KILN_SERVER_REFERENCE_URI"] = mon["referenceUri"]
    log = mon.get("payloadLog")
    if log:
        env["KILN_SERVER_PAYLOAD_LOG_RATE"] = str(log.get("rate", 0.1))
        env["KILN_SERVER_PAYLOAD_LOG_URI"] = log["uri"]
        env["KILN_SERVER_PAYLOAD_LOG_BATCH_RECORDS"] = str(log.get("batchRecords", 500))
        env["KILN_SERVER_PAYLOAD_LOG_BATCH_SECONDS"] = str(log.get("batchSeconds", 60))
        if log.get("redact"):
            env["KILN_SERVER_PAYLOAD_LOG_REDACT"] = ",".join(log["redact"])
        if log.get("hash"):
            env["KILN_SERVER_PAYLOAD_LOG_HASH"] = ",".join(log["hash"])
    return env


def auth(md: Mapping[str, Any]) -> bool:
    """Whether callers must be authorised by the cluster (spec.service.auth Kubernetes)."""
    return ((md.get("spec") or {}).get("service") or {}).get("auth") == "Kubernetes"


def tls_secret(md: Mapping[str, Any]) -> str | None:
    return (((md.get("spec") or {}).get("service") or {}).get("tls") or {}).get("secretName")


def _security_env(md: Mapping[str, Any]) -> dict[str, str]:
    """spec.service.auth, spec.service.tls and spec.verification as the server's settings (docs/server.md)."""
    env: dict[str, str] = {}
    if auth(md):
        env.update(
            KILN_SERVER_AUTH="kubernetes",
            KILN_SERVER_NAMESPACE=md["metadata"]["namespace"],
            KILN_SERVER_DEPLOYMENT=md["metadata"]["name"],
        )
    if tls_secret(md):
        env.update(
            KILN_SERVER_TLS_CERT_FILE=f"{TLS_DIR}/tls.crt",
            KILN_SERVER_TLS_KEY_FILE=f"{TLS_DIR}/tls.key",
        )
    if ((md.get("spec") or {}).get("verification") or {}).get("trustedKeysConfigMap"):
        env["KILN_SERVER_TRUSTED_KEYS"] = TRUSTED_KEYS_DIR
    return env


def _server_env(md: Mapping[str, Any], uri: str, digest: str | None, revision: str) -> list[Obj]:
    spec, meta = md.get("spec") or {}, md["metadata"]
    runtime = spec.get("runtime") or {}
    env = {
        "KILN_MODEL_URI": uri,
        "KILN_MODEL_NAME": meta["name"],
        "KILN_SERVER_PORT": str(HTTP_PORT),
        "KILN_SERVER_GRPC_PORT": str(GRPC_PORT),
        "KILN_SERVER_METRICS_PORT": str(METRICS_PORT),
        "KILN_SERVER_PROVIDER": PROVIDERS[runtime.get("executionProvider") or "CPUExecutionProvider"],
        "KILN_SERVER_MAX_BATCH_SIZE": str(runtime.get("maxBatchSize") or 32),
        "KILN_SERVER_MAX_QUEUE_DELAY_MS": str(runtime.get("maxQueueDelayMs", 5)),
        "KILN_SERVER_MAX_QUEUE_SIZE": str(runtime.get("maxQueueSize") or 256),
        "KILN_SERVER_INTRA_OP_THREADS": str(_threads(spec)),
        "KILN_SERVER_INTER_OP_THREADS": str(runtime.get("interOpThreads") or 1),
        "KILN_SERVER_INSTANCES": str(runtime.get("instances") or 1),
        **_monitoring_env(md, revision),
        **_security_env(md),
    }
    if digest:
        env["KILN_MODEL_DIGEST"] = digest  # the server refuses to start on any other artifact
    return [{"name": k, "value": v} for k, v in env.items()]


def template_hash(md: Mapping[str, Any], image_default: str | None) -> str:
    """What every revision's pod template is built from (the artifact aside): a spec change here rolls all."""
    spec = md.get("spec") or {}
    parts = {k: spec.get(k) for k in ("runtime", "resources", "scheduling", "podTemplate")}
    parts["image"] = image_default
    # Only when set, so that a spec without them keeps the hash (and the pods) it had before they existed.
    svc = spec.get("service") or {}
    for k, v in (("auth", svc.get("auth")), ("tls", svc.get("tls")), ("verification", spec.get("verification"))):
        if v and v != "None":
            parts[k] = v
    # The servers' monitoring settings, less how often the operator reads them (which no pod needs to know).
    mon = {k: v for k, v in (spec.get("monitoring") or {}).items() if k != "intervalSeconds"}
    if mon:
        parts["monitoring"] = mon
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def deployment(
    md: Mapping[str, Any],
    key: str,
    *,
    uri: str,
    digest: str | None,
    number: int,
    role: str,
    replicas: int,
    created: float,
    image_default: str | None = None,
    artifact_env: Sequence[Mapping[str, Any]] = (),
    annotations: Mapping[str, str] | None = None,
) -> Obj:
    """One revision: the server image serving ``uri`` (pinned to ``digest``), probes on the server's health
    endpoints, restricted security, surge-first rolling updates (maxUnavailable 0)."""
    meta, spec = md["metadata"], md.get("spec") or {}
    runtime = spec.get("runtime") or {}
    image = runtime.get("image") or image_default
    if not image:
        raise ValueError("spec.runtime.image is empty and no default image is configured")
    name = meta["name"]
    mon = spec.get("monitoring") or {}
    pvc_volumes, pvc_mounted, pvc_env = pvc_mounts(
        [
            ("source.uri", uri, True),
            ("monitoring.referenceUri", mon.get("referenceUri") or "", True),
            ("monitoring.payloadLog.uri", (mon.get("payloadLog") or {}).get("uri") or "", False),
        ]
    )
    kiln_env = _server_env(md, uri, digest, key) + [dict(e) for e in pvc_env]
    kiln_names = {e["name"] for e in kiln_env}
    user_env = [dict(e) for e in artifact_env]
    key_vols, key_mounts, _, _ = key_volumes(spec)
    volumes = [*pvc_volumes, tmp_volume(SERVER), *key_vols]  # read-only root: TensorRT cache, temp files
    mounts = [*pvc_mounted, TMP_MOUNT, *key_mounts]
    secret = tls_secret(md)
    if secret:
        # The whole Secret, not items: kubelet then swaps both files at once when cert-manager renews them.
        volumes.append({"name": "kiln-tls", "secret": {"secretName": secret, "defaultMode": 0o440}})
        mounts.append({"name": "kiln-tls", "mountPath": TLS_DIR, "readOnly": True})

    def probe(path: str, period: int, failures: int) -> Obj:
        return {
            # The kubelet does not verify the certificate of an HTTPS probe: a renewed one never fails a probe.
            "httpGet": {"path": path, "port": "http", "scheme": "HTTPS" if secret else "HTTP"},
            "periodSeconds": period,
            "failureThreshold": failures,
            "timeoutSeconds": 2,
        }

    container: Obj = {
        "name": CONTAINER,
        "image": image,
        "imagePullPolicy": runtime.get("imagePullPolicy") or "IfNotPresent",
        "env": [e for e in user_env if e["name"] not in kiln_names] + kiln_env,
        "ports": [
            {"name": "http", "containerPort": HTTP_PORT, "protocol": "TCP"},
            {"name": "grpc", "containerPort": GRPC_PORT, "protocol": "TCP"},
            {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"},
        ],
        "resources": container_resources(spec, SERVER),
        # Live while loading and draining; ready only when the model is loaded, warmed up and on its provider.
        "livenessProbe": probe("/v2/health/live", 10, 3),
        "readinessProbe": probe("/v2/health/ready", 2, 2),
        # A start-up failure (corrupt artifact, provider missing) writes its one-line reason here.
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "volumeMounts": mounts,
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    pod_spec: Obj = {
        "enableServiceLinks": False,
        # The server's shutdown delay (3 s) plus its grace period (25 s) fit: a scale-down drops no request.
        "terminationGracePeriodSeconds": 30,
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [container],
        "volumes": volumes,
    }
    if auth(md):
        # Its own ServiceAccount, allowed to ask the API server who a caller is and whether RBAC lets them in.
        # Also the deprecated alias, which the API server fills in from the name: owning both, server-side apply
        # removes both when auth is switched off (else the alias would bring the name back).
        sa = service_account_name(name)
        pod_spec.update(serviceAccountName=sa, serviceAccount=sa, automountServiceAccountToken=True)
    else:
        pod_spec["automountServiceAccountToken"] = False  # the server never talks to the API
    pod_spec.update(placement(spec))
    pod_labels = child_labels(name, key)
    # A revision's replicas on different nodes where there are several: a node lost takes one replica, not all,
    # and the PodDisruptionBudget means something. Preferred only, so a one-node cluster still schedules them all.
    pod_spec["topologySpreadConstraints"] = [
        {
            "maxSkew": 1,
            "topologyKey": "kubernetes.io/hostname",
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": {"matchLabels": {**selector(name), labels.REVISION: key}},
        }
    ]
    pod_meta: Obj = {
        "labels": dict(pod_labels),
        "annotations": {
            "prometheus.io/scrape": "true",
            "prometheus.io/port": str(METRICS_PORT),
            "prometheus.io/path": "/metrics",
        },
    }
    override = spec.get("podTemplate") or {}
    if override:
        pod_meta = merge(pod_meta, override.get("metadata") or {})
        pod_meta["labels"] = {**pod_meta.get("labels", {}), **pod_labels}  # the selectors match on these
        pod_spec = merge(pod_spec, override.get("spec") or {})
        server = next((c for c in pod_spec["containers"] if c.get("name") == CONTAINER), None)
        if server is None:
            server = copy.deepcopy(container)
            pod_spec["containers"].insert(0, server)
        server["image"] = image
        server["env"] = [e for e in server.get("env") or [] if e.get("name") not in kiln_names] + copy.deepcopy(
            kiln_env
        )
        names = {v["name"] for v in volumes}
        pod_spec["volumes"] = [v for v in pod_spec.get("volumes") or [] if v.get("name") not in names] + volumes
        mnames = {m["name"] for m in mounts}
        server["volumeMounts"] = [m for m in server.get("volumeMounts") or [] if m.get("name") not in mnames] + mounts
    notes = {
        labels.REVISION_NUMBER: str(number),
        labels.ARTIFACT_URI: uri,
        labels.ROLE: role,
        labels.CREATED: str(int(created)),
        labels.TEMPLATE_HASH: template_hash(md, image_default),
        **(annotations or {}),
    }
    if digest:
        notes[labels.ARTIFACT_DIGEST] = digest
    return copy.deepcopy(
        {
            "apiVersion": "apps/v1",
            "kind": "Deployment",
            "metadata": {
                "name": deployment_name(name, key),
                "namespace": meta["namespace"],
                "labels": child_labels(name, key),
                "annotations": notes,
            },
            "spec": {
                "replicas": replicas,
                "revisionHistoryLimit": 2,
                "selector": {"matchLabels": child_labels(name, key)},
                # Surge first: a template change never takes a ready replica away before its successor is ready.
                "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": "25%", "maxUnavailable": 0}},
                "template": {"metadata": pod_meta, "spec": pod_spec},
            },
        }
    )


def service(md: Mapping[str, Any]) -> Obj:
    """One Service for all revisions in service: a canary's share of traffic is its share of ready pods."""
    meta, spec = md["metadata"], md.get("spec") or {}
    svc = spec.get("service") or {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": base(meta["name"]), "namespace": meta["namespace"], "labels": child_labels(meta["name"])},
        "spec": {
            "type": svc.get("type") or "ClusterIP",
            "selector": selector(meta["name"]),
            "ports": service_ports(spec),
        },
    }


def service_ports(spec: Mapping[str, Any]) -> list[Obj]:
    """REST and gRPC (h2c: Gateways and meshes then route HTTP/2 per call, not per connection)."""
    svc = spec.get("service") or {}
    http: Obj = {"name": "http", "port": svc.get("port") or HTTP_PORT, "targetPort": "http", "protocol": "TCP"}
    grpc: Obj = {"name": "grpc", "port": svc.get("grpcPort") or GRPC_PORT, "targetPort": "grpc", "protocol": "TCP"}
    if svc.get("tls"):
        http["appProtocol"] = "https"  # gRPC over TLS has no standard appProtocol value: none is said
    else:
        grpc["appProtocol"] = "kubernetes.io/h2c"
    return [http, grpc]


def pod_disruption_budget(md: Mapping[str, Any]) -> Obj:
    """At most one serving pod evicted at a time (a node drain never takes the model down at once); one, not a
    minAvailable, so a single-replica deployment never blocks a drain forever."""
    meta = md["metadata"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": {"name": base(meta["name"]), "namespace": meta["namespace"], "labels": child_labels(meta["name"])},
        "spec": {"maxUnavailable": 1, "selector": {"matchLabels": selector(meta["name"])}},
    }


def autoscaler(md: Mapping[str, Any]) -> Obj:
    """An autoscaling/v2 HPA on the ModelDeployment's scale subresource: it sets spec.replicas, and the controller
    shares those replicas out between the revisions (the HPA never fights a canary over a Deployment)."""
    meta, spec = md["metadata"], md.get("spec") or {}
    auto = spec["autoscaling"]
    metric = auto.get("metric") or "CPU"
    if metric == "CPU":
        target: Obj = {
            "type": "Resource",
            "resource": {"name": "cpu", "target": {"type": "Utilization", "averageUtilization": _percent(auto)}},
        }
    else:
        target = {
            "type": "Pods",
            "pods": {
                "metric": {"name": POD_METRICS[metric]},
                "target": {"type": "AverageValue", "averageValue": str(auto["target"])},
            },
        }
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": base(meta["name"]), "namespace": meta["namespace"], "labels": child_labels(meta["name"])},
        "spec": {
            "scaleTargetRef": {
                "apiVersion": MODEL_DEPLOYMENT.api_version,
                "kind": MODEL_DEPLOYMENT.kind,
                "name": meta["name"],
            },
            "minReplicas": auto.get("minReplicas") or 1,
            "maxReplicas": auto["maxReplicas"],
            "metrics": [target],
        },
    }


def _percent(auto: Mapping[str, Any]) -> int:
    return max(1, round(quantity(auto["target"])))


def replicas(md: Mapping[str, Any]) -> int:
    """The replicas the ModelDeployment wants in service: spec.replicas (kubectl scale, or the HPA through the
    scale subresource), kept within the autoscaling bounds."""
    spec = md.get("spec") or {}
    n = int(spec.get("replicas", 1))
    auto = spec.get("autoscaling")
    if auto:
        n = min(max(n, int(auto.get("minReplicas") or 1)), int(auto["maxReplicas"]))
    return n


def revision_service_name(md: str, key: str) -> str:
    return f"{base(md)}-{key}"


def revision_service(md: Mapping[str, Any], key: str) -> Obj:
    """With a Gateway: one Service per revision, so the HTTPRoute can weigh revisions exactly."""
    meta, spec = md["metadata"], md.get("spec") or {}
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": revision_service_name(meta["name"], key),
            "namespace": meta["namespace"],
            "labels": child_labels(meta["name"], key),
        },
        "spec": {
            "selector": {**selector(meta["name"]), labels.REVISION: key},
            "ports": service_ports(spec),
        },
    }


def http_route(md: Mapping[str, Any], weights: Sequence[tuple[str, int]]) -> Obj:
    """The HTTPRoute: every revision in service as a backend with its exact weight (percent)."""
    meta, spec = md["metadata"], md.get("spec") or {}
    svc = spec.get("service") or {}
    gateway = svc["gateway"]
    port = svc.get("port") or HTTP_PORT
    route: Obj = {
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "HTTPRoute",
        "metadata": {"name": base(meta["name"]), "namespace": meta["namespace"], "labels": child_labels(meta["name"])},
        "spec": {
            "parentRefs": [
                {"group": "gateway.networking.k8s.io", "kind": "Gateway", **p} for p in gateway["parentRefs"]
            ],
            "rules": [
                {
                    "backendRefs": [
                        {"name": revision_service_name(meta["name"], key), "port": port, "weight": weight}
                        for key, weight in weights
                    ]
                }
            ],
        },
    }
    if gateway.get("hostnames"):
        route["spec"]["hostnames"] = list(gateway["hostnames"])
    return route


def route_url(md: Mapping[str, Any]) -> str | None:
    gateway = ((md.get("spec") or {}).get("service") or {}).get("gateway")
    if not gateway:
        return None
    hosts = gateway.get("hostnames") or []
    return f"http://{hosts[0]}" if hosts else None


def service_account_name(md: str) -> str:
    return f"{base(md)}-server"


def service_account(md: Mapping[str, Any]) -> Obj:
    """The servers' identity when they check callers: no other pod uses it, and it can do nothing else."""
    meta = md["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": {
            "name": service_account_name(meta["name"]),
            "namespace": meta["namespace"],
            "labels": child_labels(meta["name"]),
        },
        "automountServiceAccountToken": False,  # only the server pods that need it ask for it
    }


def access_review_binding(md: Mapping[str, Any]) -> Obj:
    """LocalSubjectAccessReviews in this namespace only: a server can ask about its own namespace, nothing else."""
    meta = md["metadata"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": {
            "name": f"{service_account_name(meta['name'])}-access-review",
            "namespace": meta["namespace"],
            "labels": child_labels(meta["name"]),
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": ACCESS_REVIEW_ROLE},
        "subjects": [
            {"kind": "ServiceAccount", "name": service_account_name(meta["name"]), "namespace": meta["namespace"]}
        ],
    }


def token_review_binding_name(namespace: str, md: str) -> str:
    """Cluster-scoped, so the namespace is part of the name; a hash keeps it unique and within 253 characters."""
    digest = hashlib.sha256(f"{namespace}/{md}".encode()).hexdigest()[:10]
    return f"kiln-server-{namespace[:100]}-{base(md)}-{digest}"


def token_review_binding(md: Mapping[str, Any]) -> Obj:
    """TokenReview is cluster-scoped: its grant needs a ClusterRoleBinding, which a namespaced ModelDeployment
    cannot own; its labels name the owner, and the controller deletes it when the owner is gone."""
    meta = md["metadata"]
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {
            "name": token_review_binding_name(meta["namespace"], meta["name"]),
            "labels": {**child_labels(meta["name"]), labels.OWNER_NAMESPACE: meta["namespace"]},
            "annotations": {labels.OWNER_UID: meta.get("uid") or ""},
        },
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": TOKEN_REVIEW_ROLE},
        "subjects": [
            {"kind": "ServiceAccount", "name": service_account_name(meta["name"]), "namespace": meta["namespace"]}
        ],
    }


def _namespace_peer(namespace: str) -> Obj:
    return {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": namespace}}}


def network_policy(md: Mapping[str, Any], operator_namespace: str, monitoring_namespaces: Sequence[str]) -> Obj:
    """Ingress to the serving pods: the serving ports from spec.service.allowFrom (default: this namespace, and the
    Gateways' namespaces), the metrics port from the operator (its direct scrapes) and the monitoring namespaces.
    The kubelet's probes come from the node, which NetworkPolicy never blocks."""
    meta, spec = md["metadata"], md.get("spec") or {}
    svc = spec.get("service") or {}
    allow = svc.get("allowFrom")
    if allow:
        peers = [copy.deepcopy(dict(p)) for p in allow]
    else:
        peers = [{"podSelector": {}}]
        gateways = {p.get("namespace") or meta["namespace"] for p in (svc.get("gateway") or {}).get("parentRefs") or []}
        peers += [_namespace_peer(ns) for ns in sorted(gateways - {meta["namespace"]})]
    scrapers = [_namespace_peer(ns) for ns in sorted({operator_namespace, *monitoring_namespaces})]
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {"name": base(meta["name"]), "namespace": meta["namespace"], "labels": child_labels(meta["name"])},
        "spec": {
            "podSelector": {"matchLabels": selector(meta["name"])},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": peers,
                    "ports": [{"port": "http", "protocol": "TCP"}, {"port": "grpc", "protocol": "TCP"}],
                },
                {"from": scrapers, "ports": [{"port": "metrics", "protocol": "TCP"}]},
            ],
        },
    }
