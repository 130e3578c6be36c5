"""Schema pieces the three kinds share, so they say the same thing the same way."""

from kiln_operator.api.schema import (
    DIGEST,
    NAME,
    Schema,
    array,
    free_form,
    integer,
    number_map,
    obj,
    quantity,
    rule,
    string,
    string_map,
    timestamp,
)

READ_URI = r"^(hf|s3|pvc|file)://[^\s]+$"
WRITE_URI = r"^(s3|pvc|file)://[^\s]+$"
URI_HELP = (
    "hf://org/name[@revision] (read only), s3://bucket/prefix, pvc://claim/path or file:///path. "
    "s3 credentials come from the operator's configured Secret reference, never from the URI."
)
EXECUTION_PROVIDERS = ["CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"]


def source_uri(description: str) -> Schema:
    return string(f"{description} {URI_HELP}", pattern=READ_URI, max_length=2048)


def output_uri(description: str) -> Schema:
    return string(f"{description} s3://, pvc:// or file:// (hf:// is read only).", pattern=WRITE_URI, max_length=2048)


def digest(description: str) -> Schema:
    return string(f"{description} Format: sha256:<64 hex digits>.", pattern=DIGEST, max_length=71)


def local_ref(kind: str) -> Schema:
    return obj(
        f"A {kind} in the same namespace.",
        {"name": string(f"Name of the {kind}.", pattern=NAME, max_length=63)},
        required=["name"],
    )


def dataset(description: str) -> Schema:
    return obj(
        description,
        {
            "uri": source_uri("Where the data set lives."),
            "revision": string(
                "Revision of the data set (a git revision for hf://, a version tag otherwise).", max_length=128
            ),
        },
        required=["uri"],
    )


def env() -> Schema:
    return array(
        "Extra environment variables for the workload container. Credentials belong in valueFrom.secretKeyRef.",
        obj(
            "An environment variable (core/v1 EnvVar).",
            {
                "name": string("Variable name.", pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$", max_length=256),
                "value": string("Literal value.", max_length=32768),
                "valueFrom": free_form(
                    "Source of the value (core/v1 EnvVarSource: secretKeyRef, configMapKeyRef, "
                    "fieldRef, resourceFieldRef)."
                ),
            },
            required=["name"],
            rules=[rule("!(has(self.value) && has(self.valueFrom))", "set value or valueFrom, not both")],
        ),
        max_items=128,
        list_type="map",
    ) | {"x-kubernetes-list-map-keys": ["name"]}


def resources(description: str, *, gpus_help: str) -> Schema:
    return obj(
        description,
        {
            "cpu": quantity(
                "CPU request, also the limit (e.g. 4 or 3500m). Absent: a request of the kind's default and no limit "
                "(docs/api.md, Resources)."
            ),
            "memory": quantity(
                "Memory request, also the limit (e.g. 16Gi); it also bounds a memory-backed /dev/shm. Absent: a "
                "request of the kind's default and no limit."
            ),
            "gpus": integer(f"NVIDIA GPUs (nvidia.com/gpu). {gpus_help}", minimum=0, maximum=16, default=0),
        },
        default={"gpus": 0},
    )


def tolerations() -> Schema:
    return array(
        "Tolerations added to the pods. GPU pods get nvidia.com/gpu=present:NoSchedule tolerated automatically.",
        obj(
            "A core/v1 Toleration.",
            {
                "key": string("Taint key (empty with operator Exists matches every taint).", max_length=316),
                "operator": string("Exists or Equal.", enum=["Exists", "Equal"]),
                "value": string("Taint value, with operator Equal.", max_length=63),
                "effect": string(
                    "NoSchedule, PreferNoSchedule or NoExecute; empty matches all.",
                    enum=["NoSchedule", "PreferNoSchedule", "NoExecute"],
                ),
                "tolerationSeconds": integer("How long a NoExecute taint is tolerated.", minimum=0),
            },
        ),
        max_items=32,
    )


def scheduling(*, queue: bool) -> Schema:
    props: dict[str, Schema] = {
        "priorityClassName": string("PriorityClass of the pods.", pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"),
        "nodeSelector": string_map("Node labels the pods must match.", value_length=63),
        "tolerations": tolerations(),
        "affinity": free_form("Pod affinity (core/v1 Affinity), passed to the pods as is."),
    }
    if queue:
        props["queueName"] = string(
            "Kueue LocalQueue: set as the kueue.x-k8s.io/queue-name label; the workload is created suspended so "
            "Kueue admits it.",
            pattern=NAME,
            max_length=63,
        )
    return obj("Where and with which priority the pods run.", props, default={})


def pod_template() -> Schema:
    return obj(
        "Escape hatch: merged (strategic merge patch) onto the pod template Kiln generates. Fields Kiln must own "
        "(the workload container's command, the artifact volumes) are overridden back.",
        {
            "metadata": obj(
                "Extra pod labels and annotations.",
                {"labels": string_map("Pod labels.", value_length=63), "annotations": string_map("Pod annotations.")},
            ),
            "spec": free_form("A partial core/v1 PodSpec."),
        },
    )


def image() -> dict[str, Schema]:
    return {
        "image": string("Container image of the workload.", min_length=1, max_length=1024),
        "imagePullPolicy": string(
            "When to pull the image.", enum=["Always", "IfNotPresent", "Never"], default="IfNotPresent"
        ),
    }


def artifact_ref(description: str) -> Schema:
    return obj(
        description,
        {
            "uri": string("Where the artifact lives.", max_length=2048),
            "digest": string("Artifact digest (sha256 over its manifest's file digests).", max_length=71),
            "shortDigest": string("The first 12 hex digits of the digest, for kubectl get.", max_length=12),
            "format": string("Artifact format, e.g. hf-transformers or onnx.", max_length=63),
            "metrics": number_map("Metrics recorded in the artifact's manifest (e.g. eval_accuracy, loss)."),
        },
    )


def failure(classes: list[str]) -> Schema:
    return obj(
        "Why the last attempt failed, when it did.",
        {
            "class": string("Failure class; each has its own retry budget.", enum=classes),
            "reason": string("Machine-readable reason (CamelCase).", max_length=128),
            "message": string("One-line explanation.", max_length=4096),
            "exitCode": integer("Exit code of the failing container, when there is one."),
            "pod": string("The pod that failed first.", max_length=253),
            "logTail": string("Last lines of the failing container's log.", max_length=16384),
            "time": timestamp("When the failure was observed."),
        },
    )


CONDITION = obj(
    "A condition in the shape of metav1.Condition.",
    {
        "type": string("Condition type (Ready, Reconciling, Stalled, and kind-specific ones).", max_length=316),
        "status": string("True, False or Unknown.", enum=["True", "False", "Unknown"]),
        "reason": string("Machine-readable CamelCase reason for the last transition.", max_length=1024),
        "message": string("Human-readable detail of the last transition.", max_length=32768),
        "lastTransitionTime": timestamp("When the status last changed."),
        "observedGeneration": integer("The metadata.generation this condition was computed from.", minimum=0),
    },
    required=["type", "status", "lastTransitionTime", "reason", "message"],
)


def status_base(condition_types: str) -> dict[str, Schema]:
    """observedGeneration and conditions, as kstatus (kubectl wait, Argo CD, Flux) reads them."""
    return {
        "observedGeneration": integer("The metadata.generation the operator last reconciled.", minimum=0),
        "conditions": array(
            "Current conditions. Ready is the summary; Reconciling=True while the operator is converging; "
            f"Stalled=True when it cannot progress without a change to the spec. {condition_types}",
            CONDITION,
            max_items=32,
            list_type="map",
        )
        | {"x-kubernetes-list-map-keys": ["type"]},
    }


def signing() -> Schema:
    return obj(
        "Sign the manifest of the artifact this publishes (files, digest, lineage, metrics, profile), so that any "
        'later change to it is detected (docs/security.md, "Signed artifacts").',
        {
            "secretName": string(
                "A Secret in this namespace holding the Ed25519 private key (PKCS#8 PEM, as `openssl genpkey "
                "-algorithm ed25519` writes it) under the key private-key.pem. Mounted read-only into the workload "
                "container only.",
                pattern=NAME,
                max_length=253,
            )
        },
        required=["secretName"],
    )


def verification(what: str) -> Schema:
    return obj(
        f"Refuse {what} unless its manifest is signed by one of the trusted keys and unchanged since "
        '(docs/security.md, "Signed artifacts").',
        {
            "trustedKeysConfigMap": string(
                "A ConfigMap in this namespace whose every entry is one trusted Ed25519 public key (PEM). Several "
                "entries make a key rotation: an artifact signed by any of them is accepted.",
                pattern=NAME,
                max_length=253,
            )
        },
        required=["trustedKeysConfigMap"],
    )
