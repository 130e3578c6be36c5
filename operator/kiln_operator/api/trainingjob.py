"""TrainingJob: the API of a training run."""

from kiln_operator.api import common
from kiln_operator.api.schema import (
    Schema,
    array,
    boolean,
    immutable,
    integer,
    number,
    obj,
    rule,
    string,
    string_map,
    timestamp,
)

FAILURE_CLASSES = ["UserError", "OutOfMemory", "Infrastructure", "Preemption", "DeadlineExceeded", "Unknown"]
PHASES = ["Pending", "Running", "Restarting", "Succeeded", "Failed", "Suspended"]

HYPERPARAMETERS = obj(
    "Training hyperparameters, passed to the trainer (images/trainer) through its documented contract.",
    {
        "learningRate": number("Peak learning rate.", minimum=0, maximum=10, exclusive_minimum=True, default=5e-5),
        "epochs": integer("Passes over the training set. Set this or maxSteps.", minimum=1, maximum=10000),
        "maxSteps": integer("Optimizer steps to run. Set this or epochs.", minimum=1, maximum=100_000_000),
        "batchSize": integer("Per-process batch size.", minimum=1, maximum=65536, default=16),
        "gradientAccumulationSteps": integer("Micro-batches per optimizer step.", minimum=1, maximum=1024, default=1),
        "precision": string(
            "Numeric precision; bf16/fp16 use autocast on GPUs and fall back to fp32 on CPUs.",
            enum=["fp32", "bf16", "fp16"],
            default="bf16",
        ),
        "seed": integer("Random seed (data order, initialisation).", minimum=0, maximum=2**31 - 1, default=42),
        "evalEverySteps": integer(
            "Evaluate every N steps (0: at the end of each epoch only).", minimum=0, maximum=100_000_000, default=0
        ),
        "extra": string_map("Further trainer-specific hyperparameters, passed as strings."),
    },
    rules=[
        rule(
            "!(has(self.epochs) && has(self.maxSteps))",
            "set epochs or maxSteps, not both",
            reason="FieldValueForbidden",
        )
    ],
    default={},
)

CHECKPOINT = obj(
    "Checkpoint cadence and retention. A checkpoint counts only when complete; the trainer keeps the last `keep`.",
    {
        "uri": common.output_uri("Where checkpoints go (default: next to the output)."),
        "everySteps": integer("Checkpoint every N optimizer steps.", minimum=1, maximum=100_000_000),
        "everyMinutes": integer("Checkpoint at least this often, in minutes.", minimum=1, maximum=1440, default=30),
        "keep": integer("Complete checkpoints to keep.", minimum=1, maximum=100, default=3),
    },
    default={},
)

RUN_POLICY = obj(
    "Retry budgets and deadlines. Preemptions and evictions never count against a budget.",
    {
        "maxInfraRetries": integer(
            "Attempts replaced after infrastructure failures (node lost, rendezvous or NCCL "
            "timeout, storage unreachable).",
            minimum=0,
            maximum=100,
            default=5,
        ),
        "maxUserRetries": integer(
            "Attempts replaced after user-code failures (the trainer's user-error exit code) and OOM.",
            minimum=0,
            maximum=10,
            default=1,
        ),
        "activeDeadlineSeconds": integer("Fail the job after it ran this long in total.", minimum=1),
        "startupDeadlineSeconds": integer(
            "Fail an attempt whose pods have not all started after this long (image pull failing, unschedulable).",
            minimum=30,
            maximum=86400,
            default=900,
        ),
        "progressDeadlineSeconds": integer(
            "Replace an attempt that reported no progress for this long (hung collective, deadlock).",
            minimum=60,
            maximum=86400,
            default=1800,
        ),
        "onProgressDeadline": string(
            "What a missed progress deadline does: Restart (a new attempt, from the infrastructure budget) or Fail.",
            enum=["Restart", "Fail"],
            default="Restart",
        ),
        "childrenTtlSecondsAfterFinished": integer(
            "Delete the finished job's Jobs, pods and Service after this long (their outcome, failure and log tail "
            "stay in status; the artifact and checkpoints are never deleted).",
            minimum=0,
            maximum=2592000,
            default=3600,
        ),
        "ttlSecondsAfterFinished": integer(
            "Delete the finished TrainingJob itself after this long (unset: keep). The artifact stays.", minimum=0
        ),
    },
    default={},
)

SPEC = obj(
    "The desired training run.",
    {
        **common.image(),
        "command": array(
            "Entrypoint override (default: the image's trainer).", string("An argument.", max_length=4096), max_items=64
        ),
        "args": array("Arguments to the trainer.", string("An argument.", max_length=4096), max_items=256),
        "env": common.env(),
        "model": obj(
            "The model to start from; absent: train from scratch.",
            {
                "uri": common.source_uri("Pretrained model or artifact."),
                "digest": common.digest("Expected artifact digest; loading fails on a mismatch."),
            },
            required=["uri"],
            rules=[immutable("spec.model")],
        ),
        "dataset": common.dataset("The training (and evaluation) data.")
        | {"x-kubernetes-validations": [immutable("spec.dataset")]},
        "hyperparameters": HYPERPARAMETERS,
        "nodes": integer(
            "Nodes (pods) in the job; more than one runs multi-node torchrun.",
            minimum=1,
            maximum=1024,
            default=1,
            rules=[immutable("spec.nodes")],
        ),
        "processesPerNode": integer(
            "Processes per node (torchrun --nproc-per-node). Default: resources.gpus, or 1 without GPUs.",
            minimum=1,
            maximum=64,
            rules=[immutable("spec.processesPerNode")],
        ),
        "resources": common.resources("Per node (per pod).", gpus_help="Per node; 0 trains on CPUs."),
        "output": obj(
            "Where the trained model is published as an artifact.",
            {"uri": common.output_uri("Artifact location (default: the operator's artifact store).")},
            default={},
            rules=[immutable("spec.output")],
        ),
        "checkpoint": CHECKPOINT,
        "resume": obj(
            "How a new attempt starts.",
            {
                "policy": string(
                    "Latest: resume from the latest complete checkpoint. Never: start over.",
                    enum=["Latest", "Never"],
                    default="Latest",
                ),
                "fromUri": common.source_uri("Resume the first attempt from this checkpoint."),
            },
            default={},
            rules=[
                rule("!has(self.fromUri) || self.policy != 'Never'", "fromUri needs policy Latest", field=".fromUri")
            ],
        ),
        "runPolicy": RUN_POLICY,
        "suspend": boolean(
            "Suspend the job: running pods are stopped (after a checkpoint) and resume on false. "
            "Kueue flips this for queued jobs.",
            default=False,
        ),
        "scheduling": common.scheduling(queue=True),
        "signing": common.signing(),
        "podTemplate": common.pod_template(),
    },
    required=["image", "dataset"],
    rules=[
        rule(
            "!has(self.processesPerNode) || self.resources.gpus == 0 || self.processesPerNode <= self.resources.gpus",
            "processesPerNode must not exceed resources.gpus",
            field=".processesPerNode",
        ),
        rule("has(self.model) == has(oldSelf.model)", "spec.model is immutable", field=".model"),
        rule(
            "self.resources.gpus > 0 || self.hyperparameters.precision != 'fp16'",
            "fp16 needs GPUs (resources.gpus > 0)",
            field=".hyperparameters.precision",
        ),
    ],
)

STATUS = obj(
    "What the operator observed.",
    {
        **common.status_base("TrainingJob adds Suspended, Preempted and Failed."),
        "phase": string("Summary: Pending, Running, Restarting, Succeeded, Failed or Suspended.", enum=PHASES),
        "startTime": timestamp("When the first attempt's pods started."),
        "completionTime": timestamp("When the job succeeded or failed for good."),
        "attempt": integer("Current attempt (1-based); each attempt is one Job.", minimum=0),
        "jobName": string("The batch/v1 Job of the current attempt.", max_length=63),
        "restarts": obj(
            "Attempts replaced, by failure class.",
            {
                "infrastructure": integer("After infrastructure failures.", minimum=0),
                "user": integer("After user-code failures and OOM.", minimum=0),
            },
        ),
        "preemptions": integer("Attempts replaced after preemption or eviction (no budget).", minimum=0),
        "pods": obj(
            "Pods of the current attempt by state.",
            {s: integer(f"Pods {s}.", minimum=0) for s in ("pending", "running", "succeeded", "failed")},
        ),
        "progress": obj(
            "Live progress reported by the trainer.",
            {
                "step": integer("Optimizer steps done.", minimum=0),
                "totalSteps": integer("Optimizer steps planned.", minimum=0),
                "resumedFromStep": integer(
                    "The checkpoint's step this attempt resumed from (absent: it started from scratch).", minimum=0
                ),
                "percent": integer("step / totalSteps, in percent.", minimum=0, maximum=100),
                "epoch": number("Epochs done (fractional)."),
                "loss": number("Latest training loss."),
                "samplesPerSecond": number("Throughput over all processes."),
                "heartbeatTime": timestamp("When the trainer last reported."),
                "eta": timestamp("Estimated completion."),
            },
        ),
        "artifact": common.artifact_ref("The model this job produced."),
        "lastCheckpoint": obj(
            "The latest complete checkpoint.",
            {
                "uri": string("Where it is.", max_length=2048),
                "step": integer("Its step.", minimum=0),
                "time": timestamp("When it was written."),
            },
        ),
        "failure": common.failure(FAILURE_CLASSES),
        "gpuSeconds": integer("GPU-seconds used by all attempts.", minimum=0),
    },
)

COLUMNS: list[Schema] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Progress", "type": "integer", "jsonPath": ".status.progress.percent", "description": "Percent done."},
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss"},
    {"name": "Attempt", "type": "integer", "jsonPath": ".status.attempt", "priority": 1},
    {"name": "Digest", "type": "string", "jsonPath": ".status.artifact.shortDigest"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
