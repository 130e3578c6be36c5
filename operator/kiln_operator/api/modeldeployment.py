"""ModelDeployment: the API of serving a promoted artifact, scaling it and rolling new ones out."""

from kiln_operator.api import common
from kiln_operator.api.schema import (
    NAME,
    Schema,
    array,
    boolean,
    exactly_one,
    integer,
    number,
    number_map,
    obj,
    quantity,
    rule,
    string,
    string_map,
    timestamp,
)

PHASES = ["Pending", "Progressing", "Ready", "Degraded", "Failed"]
GPU_PROVIDERS = "['CUDAExecutionProvider', 'TensorrtExecutionProvider']"

CANARY_STEP = obj(
    "Send `weight` percent of traffic to the candidate, then pause.",
    {
        "weight": integer("Percent of traffic on the candidate.", minimum=1, maximum=100),
        "pauseSeconds": integer(
            "How long to hold this step while analysis runs (absent: hold until a person approves it with "
            "kubectl annotate md/<name> kiln.dev/approve=<candidate shortDigest>/<step index>, as with a bare "
            "Argo Rollouts pause).",
            minimum=0,
            maximum=86400,
        ),
    },
    required=["weight"],
)

LABEL_SELECTOR = obj(
    "A Kubernetes label selector ({} matches everything).",
    {
        "matchLabels": string_map("Labels that must be present with these values.", value_length=63),
        "matchExpressions": array(
            "Set-based requirements, all of which must hold.",
            obj(
                "One requirement.",
                {
                    "key": string("Label key.", min_length=1, max_length=317),
                    "operator": string("How the values apply.", enum=["In", "NotIn", "Exists", "DoesNotExist"]),
                    "values": array("Values (In and NotIn only).", string("A value.", max_length=63), max_items=64),
                },
                required=["key", "operator"],
                rules=[
                    rule(
                        "(self.operator in ['In', 'NotIn']) == (has(self.values) && size(self.values) > 0)",
                        "values must be non-empty for In and NotIn, and absent for Exists and DoesNotExist",
                        field=".values",
                    )
                ],
            ),
            max_items=16,
        ),
    },
)

SIGNAL_NAME = r"^[a-z][a-z0-9_]{0,62}$"

MONITORING = obj(
    "Watching the served model in production against its reference profile (the evaluation set's summaries that "
    "the trainer and compressor record in the artifact): drift scores per signal, anomalies, a sampled payload "
    "log. Defaults apply with no configuration; docs/monitoring.md.",
    {
        "enabled": boolean("Compute drift and anomalies in the servers and report them here.", default=True),
        "windowSamples": integer(
            "Drift is measured over each server's last windowSamples samples.",
            minimum=50,
            maximum=1_000_000,
            default=1000,
        ),
        "windowSeconds": integer(
            "And none older than this (0: no age limit).", minimum=0, maximum=30 * 86400, default=0
        ),
        "minSamples": integer(
            "Samples in the window before a verdict (fewer: Drifting is Unknown).",
            minimum=1,
            maximum=1_000_000,
            default=200,
        ),
        "driftThreshold": number(
            "A signal drifts when its Jensen-Shannon distance (base 2: 0 the same distribution, 1 disjoint) from the "
            "reference is over this.",
            minimum=0,
            maximum=1,
            exclusive_minimum=True,
            default=0.2,
        ),
        "thresholds": {
            **number_map(
                "Per-signal thresholds over driftThreshold (prediction, confidence, tokens, unknown_tokens, "
                "channel<c>_mean, channel<c>_std)."
            ),
            "x-kubernetes-validations": [
                rule(
                    "self.all(k, k.matches('" + SIGNAL_NAME + "') && self[k] > 0.0 && self[k] <= 1.0)",
                    "thresholds: keys must be signal names (lower case, digits, _) and values in (0, 1]",
                )
            ],
        },
        "referenceUri": common.source_uri(
            "A reference profile (kiln-profile.json, or an artifact holding one) instead of the artifact's own."
        ),
        "referenceSamples": integer(
            "With no profile in the artifact and no referenceUri, each server takes its first referenceSamples "
            "samples as the reference (status says so).",
            minimum=50,
            maximum=1_000_000,
            default=1000,
        ),
        "intervalSeconds": integer(
            "How often the operator reads the drift scores.", minimum=5, maximum=3600, default=60
        ),
        "accessLogRate": number(
            "Share of requests logged as one JSON line each (request id, digest, revision, latency, status).",
            minimum=0,
            maximum=1,
            default=0,
        ),
        "payloadLog": obj(
            "A sampled share of requests and responses, written in batches as dataset artifacts (JSON Lines, each "
            "record with the model digest, revision, time and request id): the raw material of a retraining set.",
            {
                "rate": number("Share of requests logged (0-1).", minimum=0, maximum=1, default=0.1),
                "uri": common.output_uri("Where batches are published, one artifact each."),
                "batchRecords": integer("Records per batch.", minimum=1, maximum=1_000_000, default=500),
                "batchSeconds": integer(
                    "A partial batch is published after this.", minimum=1, maximum=86400, default=60
                ),
                "redact": array(
                    'Named inputs written as "[redacted]".', string("An input name.", max_length=253), max_items=64
                ),
                "hash": array(
                    "Named inputs written as their SHA-256 (joinable, not readable).",
                    string("An input name.", max_length=253),
                    max_items=64,
                ),
            },
            required=["uri"],
        ),
    },
    default={},
)

SPEC = obj(
    "The desired serving of a model.",
    {
        "source": obj(
            "What to serve: follow a ModelCompression's or TrainingJob's promoted artifact, or serve an artifact "
            "URI; exactly one. When the followed resource promotes a new artifact, it is rolled out.",
            {
                "modelCompressionRef": common.local_ref("ModelCompression"),
                "trainingJobRef": common.local_ref("TrainingJob"),
                "uri": common.source_uri("Artifact to serve."),
                "digest": common.digest("Pin to this artifact digest instead of following promotions."),
            },
            rules=[
                rule(
                    exactly_one("modelCompressionRef", "trainingJobRef", "uri"),
                    "set exactly one of modelCompressionRef, trainingJobRef or uri",
                )
            ],
        ),
        "replicas": integer(
            "Desired replicas when autoscaling is off (kubectl scale sets this).", minimum=0, maximum=1000, default=1
        ),
        "autoscaling": obj(
            "A HorizontalPodAutoscaler between minReplicas and maxReplicas.",
            {
                "minReplicas": integer("Lower bound.", minimum=1, maximum=1000, default=1),
                "maxReplicas": integer("Upper bound.", minimum=1, maximum=1000),
                "metric": string(
                    "Signal: CPU (out of the box), or the server's InFlightRequests, QueueTimeMs or "
                    "P95LatencyMs through the custom metrics API.",
                    enum=["CPU", "InFlightRequests", "QueueTimeMs", "P95LatencyMs"],
                    default="CPU",
                ),
                "target": quantity("Target per replica: CPU utilisation percent, requests in flight, or ms."),
            },
            required=["maxReplicas", "target"],
            rules=[
                rule("self.maxReplicas >= self.minReplicas", "maxReplicas must be >= minReplicas", field=".maxReplicas")
            ],
        ),
        "runtime": obj(
            "The inference server (images/server).",
            {
                **common.image(),
                "executionProvider": string(
                    "ONNX Runtime execution provider; GPU providers need resources.gpus.",
                    enum=common.EXECUTION_PROVIDERS,
                    default="CPUExecutionProvider",
                ),
                "maxBatchSize": integer("Dynamic batching: largest merged batch.", minimum=1, maximum=4096, default=32),
                "maxQueueDelayMs": integer(
                    "Dynamic batching: longest wait to fill a batch.", minimum=0, maximum=10000, default=5
                ),
                "maxQueueSize": integer(
                    "Requests queued before new ones get 429.", minimum=1, maximum=1_000_000, default=256
                ),
                "intraOpThreads": integer(
                    "ONNX Runtime intra-op threads (0: one per CPU).", minimum=0, maximum=256, default=0
                ),
                "interOpThreads": integer(
                    "ONNX Runtime inter-op threads (0: default).", minimum=0, maximum=256, default=0
                ),
                "instances": integer(
                    "Batches run at the same time. On CPU, one per core with intraOpThreads 1 serves bursts best "
                    "(docs/server.md, Dynamic batching).",
                    minimum=1,
                    maximum=64,
                    default=1,
                ),
            },
            required=["image"],
        ),
        "rollout": obj(
            "How a new artifact replaces the current one.",
            {
                "strategy": string(
                    "Canary (steps with analysis and automatic rollback) or RollingUpdate.",
                    enum=["Canary", "RollingUpdate"],
                    default="RollingUpdate",
                ),
                "steps": array(
                    "Canary steps; weights rise strictly and the last is 100.",
                    CANARY_STEP,
                    max_items=20,
                    min_items=1,
                    rules=[
                        rule("self[size(self) - 1].weight == 100", "the last canary step must have weight 100"),
                        rule(
                            "self.map(s, s.weight).isSorted() && "
                            "self.all(s, self.filter(t, t.weight == s.weight).size() == 1)",
                            "canary weights must rise strictly",
                        ),
                    ],
                ),
                "analysis": obj(
                    "Checks at each step, comparing the candidate with the stable revision; a failure rolls back.",
                    {
                        "intervalSeconds": integer("How often metrics are read.", minimum=5, maximum=3600, default=60),
                        "maxErrorRate": number(
                            "Largest allowed candidate error rate (5xx / all).", minimum=0, maximum=1, default=0.01
                        ),
                        "maxP95LatencyMs": number(
                            "Largest allowed candidate p95 latency.", minimum=0, exclusive_minimum=True
                        ),
                        "minRequests": integer(
                            "Requests the candidate must have served before a verdict.",
                            minimum=0,
                            maximum=100_000_000,
                            default=100,
                        ),
                        "maxPredictionDrift": number(
                            "Largest allowed Jensen-Shannon distance (0: the same, 1: disjoint) between the "
                            "candidate's and the stable revision's predicted-class distributions over the step's "
                            "window: both see the same inputs, so a large difference is a regression. Absent: not "
                            "checked.",
                            minimum=0,
                            maximum=1,
                            exclusive_minimum=True,
                        ),
                    },
                    default={},
                ),
                "progressDeadlineSeconds": integer(
                    "A new revision whose pods are not all ready this long after it was created is rolled back.",
                    minimum=30,
                    maximum=86400,
                    default=600,
                ),
                "retryDigest": common.digest(
                    "Roll out this digest again although it was rolled back before (rolled-back digests are "
                    "otherwise never retried); each new try needs a new spec generation."
                ),
            },
            default={"strategy": "RollingUpdate"},
            rules=[
                rule("self.strategy != 'Canary' || has(self.steps)", "strategy Canary needs steps", field=".steps"),
                rule("self.strategy == 'Canary' || !has(self.steps)", "steps need strategy Canary", field=".steps"),
            ],
        ),
        "service": obj(
            "The Service in front of the serving revisions.",
            {
                "type": string("Service type.", enum=["ClusterIP", "NodePort", "LoadBalancer"], default="ClusterIP"),
                "port": integer(
                    "Service port (HTTP, Open Inference Protocol).", minimum=1, maximum=65535, default=8080
                ),
                "grpcPort": integer(
                    "Service port of the Open Inference Protocol over gRPC (appProtocol kubernetes.io/h2c).",
                    minimum=1,
                    maximum=65535,
                    default=8081,
                ),
                "auth": string(
                    "Who may call the model. None: anyone who can reach the Service. Kubernetes: every REST and gRPC "
                    "request carries a bearer token the API server accepts (TokenReview), whose subject RBAC allows "
                    "to `create` the subresource `modeldeployments/predict` of this ModelDeployment (a "
                    "SubjectAccessReview, as kube-rbac-proxy does); else 401 or 403. Health endpoints stay open. The "
                    "operator gives the servers a ServiceAccount of their own allowed to ask exactly that "
                    "(docs/security.md).",
                    enum=["None", "Kubernetes"],
                    default="None",
                ),
                "tls": obj(
                    "Serve REST and gRPC over TLS (the metrics port stays plain HTTP). A renewed certificate is "
                    "picked up without a restart.",
                    {
                        "secretName": string(
                            "A kubernetes.io/tls Secret in this namespace (tls.crt, tls.key), e.g. what cert-manager "
                            "writes.",
                            pattern=NAME,
                            max_length=253,
                        )
                    },
                    required=["secretName"],
                ),
                "allowFrom": array(
                    "Who may connect to the serving ports, as NetworkPolicy peers (enforced where the cluster's pod "
                    "network enforces NetworkPolicy). Default: pods of this namespace, and of the Gateway's "
                    "namespaces when a gateway is named. The metrics port is open to the operator's and the "
                    "monitoring namespaces only.",
                    obj(
                        "Pods matching both selectors (an absent selector matches everything on its side; a peer "
                        "with no namespaceSelector means this namespace).",
                        {
                            "namespaceSelector": LABEL_SELECTOR,
                            "podSelector": LABEL_SELECTOR,
                        },
                        rules=[
                            rule(
                                "has(self.namespaceSelector) || has(self.podSelector)",
                                "a peer needs namespaceSelector or podSelector",
                            )
                        ],
                    ),
                    max_items=32,
                ),
                "gateway": obj(
                    "Gateway API: an HTTPRoute <name> to a Service per revision (<name>-<digest[:10]>), whose "
                    "backend weights are the canary weights exactly (without it, the split follows replica "
                    "ratios). Needs the Gateway API CRDs and a Gateway.",
                    {
                        "parentRefs": array(
                            "Gateways (or their listeners) the route attaches to.",
                            obj(
                                "A Gateway.",
                                {
                                    "name": string("Gateway name.", pattern=NAME, max_length=253),
                                    "namespace": string("Gateway namespace (default: ours).", pattern=NAME),
                                    "sectionName": string("Listener name.", pattern=NAME),
                                },
                                required=["name"],
                            ),
                            min_items=1,
                            max_items=8,
                        ),
                        "hostnames": array(
                            "Host names the route serves (the first one is status.routeUrl).",
                            string(
                                "A host name.",
                                pattern=r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
                                max_length=253,
                            ),
                            max_items=16,
                        ),
                    },
                    required=["parentRefs"],
                ),
            },
            default={},
            rules=[
                rule(
                    "!has(self.port) || !has(self.grpcPort) || self.port != self.grpcPort",
                    "port and grpcPort must differ",
                    field=".grpcPort",
                )
            ],
        ),
        "monitoring": MONITORING,
        "resources": common.resources("Per replica.", gpus_help="Only with a GPU execution provider."),
        "scheduling": common.scheduling(queue=False),
        "verification": common.verification(
            "to serve an artifact (the revision fails with ArtifactUntrusted and the stable one keeps serving)"
        ),
        "podTemplate": common.pod_template(),
    },
    required=["source", "runtime"],
    rules=[
        rule(
            "!has(self.autoscaling) || self.autoscaling.metric != 'CPU' || has(self.resources.cpu)",
            "autoscaling on CPU needs resources.cpu (utilisation is measured against the request)",
            field=".autoscaling.metric",
        ),
        rule(
            "!has(self.monitoring.payloadLog) || self.monitoring.enabled",
            "monitoring.payloadLog needs monitoring.enabled",
            field=".monitoring.payloadLog",
        ),
        rule(
            f"self.resources.gpus == 0 || self.runtime.executionProvider in {GPU_PROVIDERS}",
            "resources.gpus needs a GPU execution provider (a GPU count only with a GPU-capable runtime)",
            field=".resources.gpus",
        ),
        rule(
            f"!(self.runtime.executionProvider in {GPU_PROVIDERS}) || self.resources.gpus >= 1",
            "a GPU execution provider needs resources.gpus >= 1",
            field=".resources.gpus",
        ),
    ],
)

REVISION = obj(
    "A served artifact.",
    {
        "revision": integer("Revision number (1-based, increasing).", minimum=1),
        "uri": string("Artifact location.", max_length=2048),
        "digest": string("Artifact digest.", max_length=71),
        "shortDigest": string("First 12 hex digits.", max_length=12),
        "deployment": string("The Deployment that serves it.", max_length=253),
        "replicas": integer("Its pods.", minimum=0),
        "readyReplicas": integer("Its ready pods.", minimum=0),
    },
)

METRICS = obj(
    "One revision's figures over the analysis window.",
    {
        "requests": number("Requests answered."),
        "errorRate": number("5xx / all."),
        "p95LatencyMs": number("p95 request latency."),
        "predictionDrift": number("Jensen-Shannon distance of its predicted classes from the stable revision's."),
    },
)

MONITORING_STATUS = obj(
    "Drift of the serving revision's live traffic from its reference, as last read.",
    {
        "time": timestamp("When the servers' figures were read."),
        "revision": integer("The revision measured.", minimum=1),
        "reference": string("Where the reference came from: artifact, uri or traffic.", max_length=32),
        "samples": integer("Samples in the servers' windows, all pods together.", minimum=0),
        "minSamples": integer("Samples needed before a verdict.", minimum=0),
        "pods": integer("Pods that answered.", minimum=0),
        "signals": array(
            "Per signal.",
            obj(
                "One signal.",
                {
                    "name": string("Signal.", max_length=63),
                    "score": number("Jensen-Shannon distance from the reference (pods weighted by samples)."),
                    "threshold": number("Over this, the signal drifts."),
                    "drifting": boolean("score > threshold with enough samples."),
                    "since": timestamp("Since when it has been over its threshold."),
                },
            ),
            max_items=64,
        ),
        "anomalies": {**number_map("Anomalous samples by kind, since the servers started."), "maxProperties": 16},
        "message": string("Why there is no verdict, when there is none.", max_length=1024),
    },
)

STATUS = obj(
    "What the operator observed.",
    {
        **common.status_base("ModelDeployment adds Progressing, Degraded, RolledBack and Drifting."),
        "phase": string("Summary: " + ", ".join(PHASES) + ".", enum=PHASES),
        "replicas": integer("Serving pods (all revisions).", minimum=0),
        "readyReplicas": integer("Ready serving pods.", minimum=0),
        "selector": string("Label selector of the serving pods (for the scale subresource and HPAs).", max_length=1024),
        "url": string("Cluster-local URL of the Service.", max_length=2048),
        "grpcAddress": string("Cluster-local host:port of the Service's gRPC port.", max_length=2048),
        "routeUrl": string("URL through the Gateway, when service.gateway names host names.", max_length=2048),
        "route": string("The HTTPRoute, when service.gateway is set.", max_length=253),
        "current": REVISION,
        "candidate": REVISION,
        "canaryWeight": integer("Percent of traffic on the candidate.", minimum=0, maximum=100),
        "canaryStep": integer("Index of the current canary step.", minimum=0),
        "p95LatencyMs": number("Current revision's p95 latency, from the last analysis."),
        "analysis": obj(
            "The last canary analysis.",
            {
                "time": timestamp("When the metrics were read."),
                "revision": integer("Candidate revision analysed.", minimum=1),
                "step": integer("Canary step analysed.", minimum=0),
                "windowSeconds": integer("Window the figures cover (since the step began).", minimum=0),
                "candidate": METRICS,
                "stable": METRICS,
                "verdict": string("Pass, Fail, Wait or Unavailable.", enum=["Pass", "Fail", "Wait", "Unavailable"]),
                "message": string("Why.", max_length=1024),
            },
        ),
        "monitoring": MONITORING_STATUS,
        "rejected": array(
            "Digests rolled back: never rolled out again unless spec.rollout.retryDigest names one.",
            obj(
                "A rolled-back digest.",
                {
                    "digest": string("Artifact digest.", max_length=71),
                    "reason": string("Why it was rolled back, with the numbers.", max_length=1024),
                    "generation": integer("The spec generation it was rolled back under.", minimum=0),
                    "time": timestamp("When."),
                },
            ),
            max_items=20,
        ),
        "history": array(
            "Past rollouts, newest last.",
            obj(
                "A rollout.",
                {
                    "revision": integer("Revision.", minimum=1),
                    "digest": string("Artifact digest.", max_length=71),
                    "outcome": string("How it ended.", enum=["InProgress", "Promoted", "RolledBack", "Superseded"]),
                    "reason": string("Why.", max_length=1024),
                    "startTime": timestamp("Start."),
                    "endTime": timestamp("End."),
                },
            ),
            max_items=50,
        ),
    },
)

SCALE = {
    "specReplicasPath": ".spec.replicas",
    "statusReplicasPath": ".status.replicas",
    "labelSelectorPath": ".status.selector",
}

COLUMNS: list[Schema] = [
    {"name": "Ready", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Ready")].status'},
    {"name": "Replicas", "type": "integer", "jsonPath": ".spec.replicas"},
    {"name": "Available", "type": "integer", "jsonPath": ".status.readyReplicas"},
    {"name": "Canary", "type": "integer", "jsonPath": ".status.canaryWeight", "description": "Canary weight %."},
    {"name": "P95ms", "type": "number", "jsonPath": ".status.p95LatencyMs"},
    {"name": "Digest", "type": "string", "jsonPath": ".status.current.shortDigest"},
    {"name": "Drifting", "type": "string", "jsonPath": '.status.conditions[?(@.type=="Drifting")].status'},
    {"name": "URL", "type": "string", "jsonPath": ".status.url", "priority": 1},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
