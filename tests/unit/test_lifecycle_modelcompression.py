"""The ModelCompression state machine and its Job builder, without a cluster."""

import json

import pytest

from kiln_operator.builders import modelcompression as b
from kiln_operator.lifecycle import modelcompression as life

NOW = 1_800_000_000.0
SRC = "sha256:" + "1a" * 32
CAND = "sha256:" + "2b" * 32
CONFIG = life.Config(artifact_root="file:///store", registry_root="file:///store/registry")


def mc(**spec):
    status = spec.pop("status", {})
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelCompression",
        "metadata": {"name": "small", "namespace": "team", "uid": "abcdef0123456789", "generation": 2},
        "spec": {
            "image": "kiln/compressor:1",
            "source": {"trainingJobRef": {"name": "run"}},
            "recipe": {"steps": [{"export": {}}, {"quantize": {"mode": "Dynamic"}}]},
            "evaluation": {"dataset": {"uri": "pvc://data/sst2"}},
            **spec,
        },
        "status": status,
    }


def tj(phase="Succeeded", digest=SRC):
    return {
        "metadata": {"name": "run"},
        "status": {
            "phase": phase,
            "artifact": {"uri": "file:///store/team/run/model", "digest": digest},
            "conditions": [{"type": "ModelReady", "status": "True" if phase == "Succeeded" else "False"}],
            "failure": {"message": "OOM"} if phase == "Failed" else {},
        },
    }


def job(attempt, key=SRC[7:17], **conditions):
    return {
        "metadata": {"name": b.job_name("small", key, attempt), "labels": b.child_labels("small", key, attempt)},
        "status": {"conditions": [{"type": t, "status": "True"} for t in conditions]},
    }


def pod(attempt, phase, message, key=SRC[7:17], code=0):
    return {
        "metadata": {"name": f"small-{key}-{attempt}-x", "labels": b.child_labels("small", key, attempt)},
        "status": {
            "phase": phase,
            "containerStatuses": [
                {"name": "compressor", "state": {"terminated": {"exitCode": code, "message": json.dumps(message)}}}
            ],
        },
    }


def report(passed=True):
    gates = [{"name": "maxAccuracyDrop", "passed": passed, "value": 0.004 if passed else 0.031, "threshold": 0.01}]
    return {
        "exitCode": 0,
        "reason": "Succeeded",
        "artifact": {"uri": "file:///store/team/small/cand", "digest": CAND},
        "gatesPassed": passed,
        "candidate": "int8-dynamic",
        "report": {"sizeRatio": 0.26, "speedup": 1.9, "p95Ms": 3.1, "accuracyDrop": gates[0]["value"], "gates": gates},
    }


def cond(plan, type_):
    return next(c for c in plan.status["conditions"] if c["type"] == type_)


def test_waits_for_its_trainingjob_then_compresses_its_model():
    plan = life.decide(mc(), None, [], [], NOW, CONFIG)
    assert cond(plan, "SourceReady")["reason"] == "SourceNotFound"
    assert plan.status["phase"] == "Pending"
    assert not plan.create
    plan = life.decide(mc(), tj("Running"), [], [], NOW, CONFIG)
    assert cond(plan, "SourceReady")["reason"] == "SourceNotReady"
    plan = life.decide(mc(), tj("Failed"), [], [], NOW, CONFIG)
    assert cond(plan, "SourceReady")["reason"] == "SourceFailed"
    assert cond(plan, "Stalled")["status"] == "True"
    plan = life.decide(mc(), tj(), [], [], NOW, CONFIG)
    (created,) = plan.create
    assert created["metadata"]["name"] == f"small-{SRC[7:17]}-1"
    env = {e["name"]: e.get("value") for e in created["spec"]["template"]["spec"]["containers"][0]["env"]}
    spec = json.loads(env["KILN_COMPRESSION_SPEC"])
    assert spec["source"] == {"uri": "file:///store/team/run/model", "digest": SRC}
    assert env["KILN_OUTPUT_URI"] == f"file:///store/team/small-abcdef01/{SRC[7:17]}"
    assert plan.status["phase"] == "Running"
    volumes = created["spec"]["template"]["spec"]["volumes"]
    assert any(v.get("persistentVolumeClaim", {}).get("claimName") == "data" for v in volumes)  # pvc:// evaluation


def test_a_pinned_digest_refuses_another_source():
    plan = life.decide(mc(source={"trainingJobRef": {"name": "run"}, "digest": CAND}), tj(), [], [], NOW, CONFIG)
    assert cond(plan, "SourceReady")["reason"] == "SourceDigestMismatch"


def test_passing_gates_promote_automatically():
    plan = life.decide(mc(), tj(), [job(1, Complete=1)], [pod(1, "Succeeded", report())], NOW, CONFIG)
    assert plan.promote == ("file:///store/team/small/cand", "small")
    assert plan.status["candidate"]["digest"] == CAND
    assert plan.status["report"]["sizeRatio"] == 0.26
    assert cond(plan, "GatesPassed")["status"] == "True"
    assert plan.status["phase"] == "Promoted"
    # Once status.promoted names the candidate, nothing is promoted again.
    done = mc(status={**plan.status, "promoted": {"digest": CAND, "version": 1}})
    again = life.decide(done, tj(), [job(1, Complete=1)], [pod(1, "Succeeded", report())], NOW, CONFIG)
    assert again.promote is None
    assert cond(again, "Ready")["status"] == "True"


def test_failing_gates_reject_with_the_numbers():
    plan = life.decide(mc(), tj(), [job(1, Complete=1)], [pod(1, "Succeeded", report(passed=False))], NOW, CONFIG)
    assert plan.status["phase"] == "Rejected"
    assert cond(plan, "GatesPassed")["reason"] == "AccuracyDropTooLarge"
    assert "0.031" in cond(plan, "GatesPassed")["message"]
    assert plan.promote is None


def test_manual_promotion_waits_for_the_approved_digest():
    manual = {"policy": "Manual"}
    plan = life.decide(mc(promotion=manual), tj(), [job(1, Complete=1)], [pod(1, "Succeeded", report())], NOW, CONFIG)
    assert plan.status["phase"] == "AwaitingApproval"
    assert CAND in cond(plan, "Promoted")["message"]
    assert plan.promote is None
    approved = mc(promotion={**manual, "approvedDigest": CAND})
    plan = life.decide(approved, tj(), [job(1, Complete=1)], [pod(1, "Succeeded", report())], NOW, CONFIG)
    assert plan.promote == ("file:///store/team/small/cand", "small")


def test_a_new_source_artifact_compresses_again_and_keeps_history():
    first = life.decide(mc(), tj(), [job(1, Complete=1)], [pod(1, "Succeeded", report())], NOW, CONFIG)
    old = mc(status={**first.status, "promoted": {"digest": CAND, "version": 1}})
    new_source = "sha256:" + "3c" * 32
    plan = life.decide(old, tj(digest=new_source), [job(1, Complete=1)], [], NOW, CONFIG)
    assert plan.status["history"][0]["sourceDigest"] == SRC
    assert plan.status["history"][0]["outcome"] == "Promoted"
    assert plan.deleted("Job") == [f"small-{SRC[7:17]}-1"]
    assert plan.create[0]["metadata"]["name"] == f"small-{new_source[7:17]}-1"
    assert plan.status["promoted"]["digest"] == CAND  # still what is promoted until the new one is


@pytest.mark.parametrize(
    ("code", "reason", "retried"),
    [(4, "Infrastructure", True), (2, "UserError", False), (6, "ParityCheck", False), (14, "Untrusted", False)],
)
def test_failures_retry_only_what_a_retry_can_fix(code, reason, retried):
    message = {"exitCode": code, "reason": reason, "message": "boom"}
    plan = life.decide(mc(), tj(), [job(1, Failed=1)], [pod(1, "Failed", message, code=code)], NOW, CONFIG)
    if retried:
        assert plan.create[0]["metadata"]["name"].endswith("-2")
        assert plan.status["phase"] == "Running"
    else:
        assert not plan.create
        assert plan.status["phase"] == "Failed"
        assert plan.status["failure"]["class"] == reason
        assert "boom" in plan.status["failure"]["message"]  # the program's own words, whatever its class


def test_conditions_change_at_the_time_the_pass_is_given():
    from kiln_operator.status import rfc3339

    plan = life.decide(mc(), tj(), [], [], NOW, CONFIG)
    assert {c["lastTransitionTime"] for c in plan.status["conditions"]} == {rfc3339(NOW)}
