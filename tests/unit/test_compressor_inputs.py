"""The compressor's inputs: the ModelCompression spec (field names, enums, rules), and bad inputs that must fail
with one line naming the field and a distinct exit code before any model is built or exported."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kiln_artifacts.contract import TERMINATION_LIMIT, ExitCode, UserError, termination_message
from kiln_compressor.config import parse_config
from kiln_compressor.report import shrink
from kiln_operator.api import modelcompression

SRC = "file:///models/m"
DATA = "file:///data/d"


def spec(**over: Any) -> dict[str, Any]:
    s: dict[str, Any] = {
        "source": {"uri": SRC},
        "image": "kiln/compressor:0.1.0",
        "recipe": {"steps": [{"export": {}}]},
        "evaluation": {"dataset": {"uri": DATA}},
    }
    s.update(over)
    return s


def parse(s: dict[str, Any], *argv: str) -> Any:
    return parse_config(list(argv), env={"KILN_COMPRESSION_SPEC": json.dumps(s)})


def rejected(s: dict[str, Any], *argv: str) -> str:
    with pytest.raises(UserError) as e:
        parse(s, *argv)
    return e.value.message


def test_defaults_follow_the_crd() -> None:
    cfg = parse(spec())
    assert (cfg.device, cfg.provider, cfg.precision) == ("cpu", "CPUExecutionProvider", "fp32")
    assert cfg.batch_sizes == (1, 8, 32)
    assert cfg.sequence_lengths == (128,)
    assert (cfg.iterations, cfg.warmup, cfg.metric, cfg.evaluation_samples) == (100, 10, "accuracy", 0)
    assert cfg.steps is not None
    assert dict(cfg.steps[0].params) == {"opset": 18, "parityTolerance": 1e-4}
    # The defaults above are the CRD's: read them from the schema so that a change there fails here.
    props = modelcompression.SPEC["properties"]
    bench = props["benchmark"]["properties"]
    assert bench["batchSizes"]["default"] == [1, 8, 32]
    assert bench["iterations"]["default"] == 100
    export = modelcompression.STEP["properties"]["export"]["properties"]
    assert export["opset"]["default"] == 18
    assert export["parityTolerance"]["default"] == 1e-4


def test_every_crd_step_field_is_accepted() -> None:
    """The compressor takes exactly the CRD's step fields (pass-through JSON)."""
    from kiln_compressor.config import STEP_FIELDS

    for kind, schema in modelcompression.STEP["properties"].items():
        assert set(STEP_FIELDS[kind]) == set(schema["properties"]), kind
    assert set(modelcompression.SPEC["properties"]) == set(__import__("kiln_compressor.config").config.SPEC_FIELDS)


def test_a_full_spec_as_the_samples_write_it() -> None:
    import yaml

    sample = Path(__file__).parents[2] / "manifests/samples/modelcompression.yaml"
    s = yaml.safe_load(sample.read_text())["spec"]
    s["evaluation"]["dataset"]["uri"] = DATA
    cfg = parse(s, "--source-uri", SRC)
    assert cfg.source_uri == SRC
    assert cfg.precision == "int8"
    assert [st.kind for st in cfg.steps] == ["export", "optimize", "quantize"]
    assert cfg.steps[2].params["perChannel"] is True
    assert cfg.gates == {"maxAccuracyDrop": 0.01, "minAgreement": 0.98, "minSpeedup": 1.5}


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"sauce": {}}, "spec: unknown field(s) sauce"),
        ({"recipe": {"steps": [{"export": {"opset": 13}}]}}, "recipe.steps[0].export.opset: must be in 14..23, got 13"),
        ({"recipe": {"steps": [{"export": {"opsett": 18}}]}}, "recipe.steps[0].export: unknown field(s) opsett"),
        ({"recipe": {"steps": [{"export": {}, "optimize": {}}]}}, "recipe.steps[0]: a step sets exactly one of"),
        ({"recipe": {"steps": [{"optimize": {}}, {"export": {}}]}}, "recipe.steps: export may appear once, as the"),
        ({"recipe": {"steps": [{"export": {}}], "auto": {}}}, "recipe: set exactly one of steps or auto"),
        (
            {"recipe": {"steps": [{"quantize": {"mode": "Static"}}]}, "target": {"precision": "int8"}},
            "recipe.steps[0].quantize.calibration: Static quantization needs calibration",
        ),
        ({"target": {"device": "gpu"}}, "target.executionProvider: must be CPUExecutionProvider exactly when"),
        ({"target": {"precision": "fp16"}}, "target.precision: fp16 needs target.device gpu"),
        (
            {"target": {"device": "gpu", "executionProvider": "CUDAExecutionProvider", "precision": "int8"}},
            "target.precision: int8 does not run as int8 on CUDAExecutionProvider",
        ),
        (
            {"recipe": {"steps": [{"export": {}}, {"quantize": {"mode": "Dynamic"}}]}},
            "target.precision: is fp32 but the recipe produces int8 (recipe.steps[1].quantize)",
        ),
        (
            {
                "recipe": {"steps": [{"export": {}}, {"float16": {}}]},
                "target": {"device": "cpu", "precision": "fp32"},
            },
            "recipe.steps[1].float16: fp16 is a GPU win",
        ),
        (
            {
                "recipe": {"steps": [{"export": {}}, {"quantize": {"mode": "Dynamic"}}]},
                "target": {"device": "gpu", "executionProvider": "TensorrtExecutionProvider", "precision": "int8"},
            },
            "recipe.steps[1].quantize.mode: Dynamic int8 is a CPU-only win",
        ),
        (
            {"recipe": {"steps": [{"export": {}}, {"optimize": {}}, {"prune": {"sparsity": 0.5}}]}},
            "recipe.steps[2].prune: prune works on the torch model and must come before recipe.steps[1].optimize",
        ),
        ({"recipe": {"steps": [{"prune": {"sparsity": 0.99}}]}}, "recipe.steps[0].prune.sparsity: must be in (0"),
        ({"gates": {"maxAccuracyDrop": 2}}, "gates.maxAccuracyDrop: must be in [0, 1]"),
        ({"gates": {"maxLatency": 2}}, "gates: unknown field(s) maxLatency"),
        ({"source": {"trainingJobRef": {"name": "t"}}}, "source.uri: the controller resolves source.trainingJobRef"),
        ({"source": {"uri": "ftp://x/y"}}, "source.uri"),
        ({"source": {"uri": SRC, "digest": "sha256:xyz"}}, "source.digest: must be sha256:<64 lowercase hex"),
        ({"evaluation": {"metric": "accuracy"}}, "evaluation.dataset: is required"),
        ({"benchmark": {"batchSizes": [0]}}, "benchmark.batchSizes[0]: must be in 1..4096, got 0"),
    ],
)
def test_rejections_name_the_field_and_the_rule(over: dict[str, Any], message: str) -> None:
    assert message in rejected(spec(**over))


def test_flags_override_the_spec() -> None:
    cfg = parse(
        spec(),
        "--source-uri", "file:///other", "--batch-sizes", "2,4", "--sequence-lengths", "32",
        "--iterations", "10", "--output-uri", "file:///out/x", "--threads", "1",
    )  # fmt: skip
    assert cfg.source_uri == "file:///other"
    assert (cfg.batch_sizes, cfg.sequence_lengths, cfg.iterations) == ((2, 4), (32,), 10)
    assert (cfg.output_uri, cfg.threads) == ("file:///out/x", 1)
    assert "--output-uri hf://a/b: must be writable" in rejected(spec(), "--output-uri", "hf://a/b")


def test_termination_message_fits_the_kubelet_limit() -> None:
    cell = {"batchSize": 1, "sequenceLength": 128, "p50Ms": 1.0, "p95Ms": 1.0, "p99Ms": 1.0, "throughput": 1.0}
    report = {
        "source": {"latency": [cell] * 256},
        "candidate": {"latency": [cell] * 256},
        "cpuFallbackNodes": ["node-" + "x" * 100] * 256,
        "gates": [{"name": "accuracyDrop", "passed": False, "message": "m" * 1000}],
    }
    artifact = {"uri": "file:///a", "digest": "d"}
    text = termination_message(ExitCode.SUCCEEDED, "done", shrink=shrink, report=report, artifact=artifact)
    assert len(text.encode()) <= TERMINATION_LIMIT
    body = json.loads(text)
    assert body["artifact"]["uri"] == "file:///a"
    assert body["report"]["candidate"]["latency"] == [cell]  # the reference cell survives


def test_gate_verdicts_and_the_gpu_placement_gate() -> None:
    from kiln_artifacts.contract import GATE_REASONS
    from kiln_compressor.pipeline import evaluate_gates

    summary = {
        "accuracyDrop": 0.02, "agreement": 0.97, "p95Ms": 4.0, "speedup": 1.6,
        "candidate": {"sizeBytes": 1000}, "cpuFallbackNodes": ["/encoder/layer.0/MatMul"],
    }  # fmt: skip
    gates = {"maxAccuracyDrop": 0.01, "minAgreement": 0.95, "maxP95LatencyMs": 5.0, "minSpeedup": 2.0,
             "maxSizeBytes": 999}  # fmt: skip
    verdicts = {g["name"]: g for g in evaluate_gates(gates, summary, "gpu")}
    assert {n: g["passed"] for n, g in verdicts.items()} == {
        "maxAccuracyDrop": False, "minAgreement": True, "maxP95LatencyMs": True, "minSpeedup": False,
        "maxSizeBytes": False,
        "placement": False,
    }  # fmt: skip
    assert verdicts["maxAccuracyDrop"]["message"] == "metric drop 0.0200 > 0.01"
    assert verdicts["placement"]["message"] == "1 heavy nodes on CPUExecutionProvider: /encoder/layer.0/MatMul"
    assert set(verdicts) == set(GATE_REASONS)
    # Gates are named by their spec field (what the user wrote and the controller reads).
    assert set(GATE_REASONS) - {"placement"} == set(modelcompression.SPEC["properties"]["gates"]["properties"])
    assert [g["name"] for g in evaluate_gates({}, summary, "cpu")] == []  # unset gates are not checked
