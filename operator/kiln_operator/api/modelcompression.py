"""ModelCompression: the API of turning a trained model into a smaller, faster ONNX artifact, with gates."""

from kiln_operator.api import common
from kiln_operator.api.schema import (
    NAME,
    Schema,
    array,
    boolean,
    exactly_one,
    immutable,
    integer,
    number,
    obj,
    rule,
    string,
    string_map,
    timestamp,
)

PHASES = ["Pending", "Running", "AwaitingApproval", "Promoted", "Rejected", "Failed"]
STEP_KINDS = ("export", "optimize", "quantize", "float16", "prune", "distill")

STEP = obj(
    "One step of the recipe; set exactly one of its fields.",
    {
        "export": obj(
            "ONNX export from the transformers/torch source, with dynamic batch and sequence axes and a parity "
            "check against the source model.",
            {
                "opset": integer("ONNX opset.", minimum=14, maximum=23, default=18),
                "parityTolerance": number(
                    "Maximum absolute logit difference to the source model.",
                    minimum=0,
                    exclusive_minimum=True,
                    maximum=1,
                    default=1e-4,
                ),
            },
        ),
        "optimize": obj(
            "Graph optimisation with ONNX Runtime's transformer optimizer and session optimisation level.",
            {
                "level": string(
                    "ONNX Runtime graph optimisation level.", enum=["Basic", "Extended", "All"], default="All"
                ),
                "expectFusions": array(
                    "Fused operators that must appear (e.g. Attention, SkipLayerNormalization); "
                    "the step fails otherwise.",
                    string("Operator type.", max_length=128),
                    max_items=32,
                ),
            },
        ),
        "quantize": obj(
            "int8 quantisation: Dynamic (weights only, a CPU win) or Static (QDQ with calibration data).",
            {
                "mode": string("Dynamic or Static.", enum=["Dynamic", "Static"]),
                "perChannel": boolean("Per-channel weight scales.", default=False),
                "format": string("Static quantisation format.", enum=["QDQ", "QOperator"], default="QDQ"),
                "calibration": obj(
                    "Calibration data for Static mode.",
                    {
                        "dataset": common.dataset("Representative inputs."),
                        "samples": integer("Samples to calibrate on.", minimum=1, maximum=100000, default=512),
                        "method": string(
                            "Range estimation.", enum=["MinMax", "Entropy", "Percentile"], default="MinMax"
                        ),
                    },
                    required=["dataset"],
                ),
            },
            required=["mode"],
            rules=[
                rule(
                    "self.mode != 'Static' || has(self.calibration)",
                    "Static quantization needs calibration",
                    field=".calibration",
                )
            ],
        ),
        "float16": obj(
            "fp16 conversion (the GPU win); inputs, outputs and numerically unsafe nodes stay fp32.",
            {
                "keepIOTypes": boolean("Keep graph inputs and outputs in fp32.", default=True),
                "blockList": array(
                    "Operator types kept in fp32.", string("Operator type.", max_length=128), max_items=64
                ),
            },
        ),
        "prune": obj(
            "Pruning of the source model before export.",
            {
                "method": string(
                    "Magnitude (unstructured) or Structured (heads/channels).",
                    enum=["Magnitude", "Structured"],
                    default="Magnitude",
                ),
                "sparsity": number("Fraction of weights removed.", minimum=0, maximum=0.95, exclusive_minimum=True),
            },
            required=["sparsity"],
        ),
        "distill": obj(
            "Knowledge distillation into a smaller student, with the trainer's code.",
            {
                "student": obj(
                    "The student model.",
                    {"uri": common.source_uri("Student model to train.")},
                    required=["uri"],
                ),
                "dataset": common.dataset("Training data for the student."),
                "maxSteps": integer("Optimizer steps.", minimum=1, maximum=10_000_000, default=1000),
                "temperature": number(
                    "Softmax temperature.", minimum=0, exclusive_minimum=True, maximum=100, default=2.0
                ),
                "alpha": number(
                    "Weight of the distillation loss against the label loss.", minimum=0, maximum=1, default=0.5
                ),
            },
            required=["student", "dataset"],
        ),
    },
    rules=[rule(exactly_one(*STEP_KINDS), "a step sets exactly one of: " + ", ".join(STEP_KINDS))],
)

SPEC = obj(
    "The desired compression.",
    {
        "source": obj(
            "The model to compress: a TrainingJob's artifact or an artifact URI, exactly one.",
            {
                "trainingJobRef": common.local_ref("TrainingJob"),
                "uri": common.source_uri("Artifact to compress."),
                "digest": common.digest("Pin the source artifact; a different digest is refused."),
            },
            rules=[
                rule(exactly_one("trainingJobRef", "uri"), "set exactly one of trainingJobRef or uri"),
                immutable("spec.source"),
            ],
        ),
        "target": obj(
            "What the artifact is for.",
            {
                "device": string("Where it will be served.", enum=["cpu", "gpu"], default="cpu"),
                "executionProvider": string(
                    "ONNX Runtime execution provider it is tuned and measured on.",
                    enum=common.EXECUTION_PROVIDERS,
                    default="CPUExecutionProvider",
                ),
                "precision": string("Weight precision of the result.", enum=["fp32", "fp16", "int8"], default="fp32"),
            },
            default={"device": "cpu", "executionProvider": "CPUExecutionProvider", "precision": "fp32"},
            rules=[
                rule(
                    "(self.device == 'cpu') == (self.executionProvider == 'CPUExecutionProvider')",
                    "target.executionProvider must be CPUExecutionProvider exactly when target.device is cpu",
                    field=".executionProvider",
                ),
                rule(
                    "self.precision != 'fp16' || self.device == 'gpu'",
                    "fp16 needs target.device gpu",
                    field=".precision",
                ),
                rule(
                    "self.precision != 'int8' || self.executionProvider != 'CUDAExecutionProvider'",
                    "int8 does not run as int8 on CUDAExecutionProvider: use TensorrtExecutionProvider or cpu",
                    field=".precision",
                ),
            ],
        ),
        "recipe": obj(
            "How to compress: an ordered list of steps, or an automatic search under the gates.",
            {
                "steps": array(
                    "Steps, applied in order.",
                    STEP,
                    max_items=16,
                    min_items=1,
                    rules=[
                        rule(
                            "self.filter(s, has(s.export)).size() <= 1 && "
                            "(!self.exists(s, has(s.export)) || has(self[0].export))",
                            "export may appear once, as the first step",
                        )
                    ],
                ),
                "auto": obj(
                    "Try recipes cheapest first within the target and gates; keep the best that passes.",
                    {
                        "objective": string("What best means.", enum=["Smallest", "Fastest"], default="Smallest"),
                        "maxCandidates": integer("Recipes to try at most.", minimum=1, maximum=32, default=6),
                    },
                ),
            },
            rules=[rule(exactly_one("steps", "auto"), "set exactly one of steps or auto")],
        ),
        "evaluation": obj(
            "Held-out data on which source and candidate are compared.",
            {
                "dataset": common.dataset("Evaluation data."),
                "metric": string("Task metric.", enum=["accuracy", "f1", "top1Agreement"], default="accuracy"),
                "samples": integer("Samples to evaluate (0: all).", minimum=0, maximum=10_000_000, default=0),
            },
            required=["dataset"],
        ),
        "benchmark": obj(
            "The latency grid measured on the target execution provider.",
            {
                "batchSizes": array(
                    "Batch sizes.",
                    integer("A batch size.", minimum=1, maximum=4096),
                    max_items=16,
                    min_items=1,
                    default=[1, 8, 32],
                ),
                "sequenceLengths": array(
                    "Sequence lengths (text models).",
                    integer("A length.", minimum=1, maximum=32768),
                    max_items=16,
                    min_items=1,
                    default=[128],
                ),
                "iterations": integer("Timed runs per cell.", minimum=10, maximum=100000, default=100),
                "warmup": integer("Untimed runs per cell.", minimum=0, maximum=10000, default=10),
            },
            default={},
        ),
        "gates": obj(
            "What the candidate must meet to be promoted. Unset gates are not checked.",
            {
                "maxAccuracyDrop": number(
                    "Largest allowed drop of the metric, absolute (0.01 = one point).", minimum=0, maximum=1
                ),
                "minAgreement": number("Smallest allowed top-1 agreement with the source.", minimum=0, maximum=1),
                "maxP95LatencyMs": number(
                    "Largest p95 latency at the reference cell (first batch size and length).",
                    minimum=0,
                    exclusive_minimum=True,
                ),
                "minSpeedup": number(
                    "Smallest speed-up of p95 over the source at the reference cell.", minimum=0, exclusive_minimum=True
                ),
                "maxSizeBytes": integer("Largest artifact size.", minimum=1),
            },
            default={},
        ),
        "promotion": obj(
            "What happens to a candidate that passes the gates.",
            {
                "policy": string(
                    "Automatic, or Manual (wait for approvedDigest).", enum=["Automatic", "Manual"], default="Automatic"
                ),
                "modelName": string(
                    "Registry name it is promoted under (default: metadata.name).", pattern=NAME, max_length=63
                ),
                "approvedDigest": common.digest("With policy Manual: the candidate digest a person approved."),
            },
            default={},
            rules=[
                rule(
                    "!has(self.approvedDigest) || self.policy == 'Manual'",
                    "approvedDigest needs policy Manual",
                    field=".approvedDigest",
                )
            ],
        ),
        **common.image(),
        "env": common.env(),
        "resources": common.resources(
            "Of the compression pod.", gpus_help="Only with target.device gpu, which needs at least 1."
        ),
        "scheduling": common.scheduling(queue=True),
        "signing": common.signing(),
        "verification": common.verification("to compress the source"),
        "podTemplate": common.pod_template(),
        "labels": string_map("Extra labels recorded in the artifact's lineage.", max_properties=32),
    },
    required=["source", "recipe", "evaluation", "image"],
    rules=[
        rule(
            "self.target.device == 'gpu' || self.resources.gpus == 0",
            "resources.gpus needs target.device gpu (a GPU count only with a GPU-capable runtime)",
            field=".resources.gpus",
        ),
        rule(
            "self.target.device != 'gpu' || self.resources.gpus >= 1",
            "target.device gpu needs resources.gpus >= 1 to benchmark on the GPU",
            field=".resources.gpus",
        ),
    ],
)

LATENCY_CELL = obj(
    "One cell of the benchmark grid.",
    {
        "batchSize": integer("Batch size.", minimum=1),
        "sequenceLength": integer("Sequence length.", minimum=0),
        "p50Ms": number("Median latency."),
        "p95Ms": number("95th percentile latency."),
        "p99Ms": number("99th percentile latency."),
        "throughput": number("Samples per second."),
    },
)


def _measured(who: str) -> Schema:
    return obj(
        f"Measurements of the {who}.",
        {
            "sizeBytes": integer("Artifact size.", minimum=0),
            "parameters": integer("Parameter count.", minimum=0),
            "metric": number("The evaluation metric."),
            "latency": array("The benchmark grid.", LATENCY_CELL, max_items=256),
            "peakMemoryBytes": integer("Peak resident memory during the benchmark.", minimum=0),
            "sessionStartSeconds": number("Time to create the inference session."),
        },
    )


STATUS = obj(
    "What the operator observed.",
    {
        **common.status_base("ModelCompression adds SourceReady, Compressed, GatesPassed and Promoted."),
        "phase": string("Summary: " + ", ".join(PHASES) + ".", enum=PHASES),
        "report": obj(
            "How the candidate compares with the source.",
            {
                "source": _measured("source"),
                "candidate": _measured("candidate"),
                "sizeRatio": number("candidate size / source size."),
                "speedup": number("source p95 / candidate p95 at the reference cell."),
                "p95Ms": number("Candidate p95 at the reference cell."),
                "accuracyDrop": number("source metric - candidate metric."),
                "agreement": number("Top-1 agreement with the source."),
                "maxLogitDiff": number("Largest absolute logit difference to the source."),
                "nodesByProvider": {
                    "type": "object",
                    "description": "Graph nodes per execution provider that ran them.",
                    "maxProperties": 8,
                    "additionalProperties": {"type": "integer"},
                },
                "cpuFallbackNodes": array(
                    "Heavy nodes a GPU candidate left on the CPU provider.",
                    string("Node name.", max_length=512),
                    max_items=256,
                ),
                "recipe": array("The steps applied.", string("A step.", max_length=256), max_items=16),
                "gates": array(
                    "Each gate's verdict.",
                    obj(
                        "A gate.",
                        {
                            "name": string("Gate.", max_length=63),
                            "passed": boolean("Whether it passed."),
                            "value": number("Measured value."),
                            "threshold": number("The limit."),
                            "message": string("Explanation.", max_length=1024),
                        },
                    ),
                    max_items=16,
                ),
            },
        ),
        "sourceArtifact": common.artifact_ref("The source artifact that was compressed."),
        "gatesPassed": boolean("Whether the candidate passed every gate."),
        "history": array(
            "Earlier compressions of this ModelCompression (one per source artifact), newest first.",
            obj(
                "One compression.",
                {
                    "sourceDigest": string("The source artifact's digest.", max_length=71),
                    "candidateDigest": string("The candidate's digest.", max_length=71),
                    "outcome": string("Its final phase.", max_length=32),
                    "time": timestamp("When it was superseded."),
                },
            ),
            max_items=20,
        ),
        "candidate": common.artifact_ref("The artifact produced."),
        "promoted": obj(
            "The promoted artifact and its registry entry.",
            {
                "uri": string("The promoted artifact (what a ModelDeployment following this serves).", max_length=2048),
                "digest": string("Digest.", max_length=71),
                "shortDigest": string("First 12 hex digits.", max_length=12),
                "modelName": string("Registry name.", max_length=63),
                "version": integer("Registry version.", minimum=1),
                "signedBy": array(
                    "Key ids (ed25519:<16 hex>) whose signatures over the artifact's manifest verify, as the "
                    "registry recorded them; empty for an unsigned artifact.",
                    string("A key id.", max_length=64),
                    max_items=8,
                ),
            },
        ),
        "failure": common.failure(
            ["UserError", "OutOfMemory", "Infrastructure", "ParityCheck", "Untrusted", "Unknown"]
        ),
    },
)

COLUMNS: list[Schema] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Size", "type": "number", "jsonPath": ".status.report.sizeRatio", "description": "Size ratio."},
    {"name": "P95ms", "type": "number", "jsonPath": ".status.report.p95Ms"},
    {"name": "Speedup", "type": "number", "jsonPath": ".status.report.speedup"},
    {
        "name": "AccDrop",
        "type": "number",
        "jsonPath": ".status.report.accuracyDrop",
        "description": "Accuracy lost against the source model.",
    },
    {"name": "Digest", "type": "string", "jsonPath": ".status.promoted.shortDigest"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
