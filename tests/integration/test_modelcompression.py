"""The ModelCompression controller on the real control plane: a TrainingJob's model becomes its source, the
compressor runs as a Job (kwok plays the container and returns the compressor's termination message, which the
compressor's own tests produce for real), the gates decide, and promotion writes the real registry."""

import json
from pathlib import Path

import pytest
import yaml
from support.cluster import Cluster, Operator
from support.waiting import wait_for

import kiln_artifacts as ka


@pytest.fixture(autouse=True)
def store(monkeypatch, tmp_path):
    root = tmp_path / "store"
    root.mkdir()
    monkeypatch.setenv("KILN_ARTIFACT_ROOT", f"file://{root}")
    return root


def artifact(tmp_path: Path, name: str, content: bytes, fmt: str) -> ka.Artifact:
    folder = tmp_path / f"src-{name}"
    folder.mkdir()
    (folder / "model.bin").write_bytes(content)
    return ka.publish(folder, f"file://{tmp_path}/artifacts/{name}", format=fmt)


def summary(candidate: ka.Artifact, drop: float, passed: bool) -> str:
    gate = {"name": "maxAccuracyDrop", "passed": passed, "value": drop, "threshold": 0.01}
    return json.dumps(
        {
            "exitCode": 0,
            "reason": "Succeeded",
            "artifact": {"uri": candidate.uri, "digest": candidate.digest},
            "gatesPassed": passed,
            "candidate": "int8-dynamic",
            "report": {"sizeRatio": 0.27, "speedup": 1.8, "p95Ms": 2.5, "accuracyDrop": drop, "gates": [gate]},
        }
    )


def apply(cluster: Cluster, ns: str, *bodies: dict) -> None:
    cluster.kubectl("apply", "-n", ns, "-f", "-", stdin=yaml.safe_dump_all(bodies))


def status(cluster: Cluster, ns: str, kind: str, name: str) -> dict:
    return cluster.get(kind, name, "-n", ns).get("status") or {}


def condition(st: dict, type_: str) -> dict:
    return next(c for c in st.get("conditions", []) if c["type"] == type_)


def compression(name: str, message: str, **spec) -> dict:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelCompression",
        "metadata": {"name": name},
        "spec": {
            "image": "kiln/compressor:test",
            "source": {"trainingJobRef": {"name": "trained"}},
            "recipe": {"steps": [{"export": {}}, {"quantize": {"mode": "Dynamic"}}]},
            "evaluation": {"dataset": {"uri": "file:///data/sst2"}},
            "gates": {"maxAccuracyDrop": 0.01},
            "podTemplate": {
                "metadata": {"annotations": {"kwok.kiln.dev/run-for": "1s", "kwok.kiln.dev/message": message}}
            },
            **spec,
        },
    }


def test_trained_model_is_compressed_gated_and_promoted(
    cluster: Cluster, namespace: str, operator: Operator, tmp_path: Path, store: Path
):
    model = artifact(tmp_path, "model", b"fp32 weights" * 100, "hf-transformers")
    good = artifact(tmp_path, "good", b"int8", "onnx")
    bad = artifact(tmp_path, "bad", b"int8 but worse", "onnx")
    trained = {"exitCode": 0, "reason": "Succeeded", "artifact": {"uri": model.uri, "digest": model.digest}}
    apply(
        cluster,
        namespace,
        compression("auto", summary(good, 0.004, True)),
        compression("manual", summary(good, 0.004, True), promotion={"policy": "Manual", "modelName": "reviewed"}),
        compression("strict", summary(bad, 0.031, False)),
    )
    # No TrainingJob yet: every compression waits and says why.
    st = wait_for(lambda: (s := status(cluster, namespace, "mc", "auto")).get("conditions") and s, what="auto waits")
    assert condition(st, "SourceReady")["reason"] == "SourceNotFound"
    apply(
        cluster,
        namespace,
        {
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "TrainingJob",
            "metadata": {"name": "trained"},
            "spec": {
                "image": "kiln/trainer:test",
                "dataset": {"uri": "file:///data/sst2"},
                "podTemplate": {
                    "metadata": {
                        "annotations": {"kwok.kiln.dev/run-for": "1s", "kwok.kiln.dev/message": json.dumps(trained)}
                    }
                },
            },
        },
    )
    st = wait_for(
        lambda: (s := status(cluster, namespace, "mc", "auto")).get("phase") in ("Promoted", "Failed") and s,
        what="auto promoted",
        timeout=90,
    )
    assert st["phase"] == "Promoted", st
    assert st["sourceArtifact"]["digest"] == model.digest
    assert st["candidate"]["digest"] == good.digest
    assert st["report"]["sizeRatio"] == 0.27
    assert st["promoted"] == {
        "uri": good.uri,
        "digest": good.digest,
        "shortDigest": good.digest[7:19],
        "modelName": "auto",
        "version": 1,
    }
    for type_ in ("SourceReady", "Compressed", "GatesPassed", "Promoted", "Ready"):
        assert condition(st, type_)["status"] == "True", type_
    # The registry really holds the version, pointing at the candidate's bytes.
    latest = ka.Registry(f"file://{store}/registry").latest("auto")
    assert (latest.version, latest.digest, latest.uri) == (1, good.digest, good.uri)
    (job,) = cluster.get("jobs", "-n", namespace, "-l", "kiln.dev/modelcompression=auto")["items"]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert json.loads(env["KILN_COMPRESSION_SPEC"])["source"] == {"uri": model.uri, "digest": model.digest}

    st = wait_for(
        lambda: (s := status(cluster, namespace, "mc", "strict")).get("phase") == "Rejected" and s, what="rejected"
    )
    assert condition(st, "GatesPassed")["reason"] == "AccuracyDropTooLarge"
    assert "0.031" in condition(st, "GatesPassed")["message"]
    assert "promoted" not in st

    st = wait_for(
        lambda: (s := status(cluster, namespace, "mc", "manual")).get("phase") == "AwaitingApproval" and s,
        what="awaiting approval",
    )
    assert good.digest in condition(st, "Promoted")["message"]
    patch = {"spec": {"promotion": {"approvedDigest": good.digest}}}
    cluster.kubectl("patch", "-n", namespace, "mc/manual", "--type=merge", "-p", json.dumps(patch))
    st = wait_for(
        lambda: (s := status(cluster, namespace, "mc", "manual")).get("phase") == "Promoted" and s, what="approved"
    )
    assert st["promoted"]["modelName"] == "reviewed"
    assert ka.Registry(f"file://{store}/registry").latest("reviewed").digest == good.digest
    reasons = [e["reason"] for e in cluster.get("events", "-n", namespace)["items"]]
    assert {"Compressing", "Promoted", "AccuracyDropTooLarge", "AwaitingApproval"} <= set(reasons)
