"""What GitOps tools read from the statuses the state machines write: kstatus itself (sigs.k8s.io/cli-utils, the
library Flux computes health with; hack/kstatus, built by hack/build-kstatus.sh) reads every phase of the three
kinds, each status written by the real ``decide`` of its kind and put on an object with ``metadata.generation``;
so does Argo CD's Lua interpreter (gopher-lua, in the same program) running manifests/argocd/health.lua as Argo CD
runs a health check from argocd-cm.

Current: the object is what its spec asks for (Flux's health check passes). InProgress: it still converges (Flux
waits). Failed: it cannot get there without a change to the spec or a new artifact (Flux reports it at once
instead of waiting for its timeout)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from support.cluster import bin_dir
from support.deployments import carry_out

from kiln_artifacts.contract import ExitCode
from kiln_operator import labels
from kiln_operator.analysis import Sample
from kiln_operator.builders import modelcompression as mcb
from kiln_operator.builders import trainingjob as tjb
from kiln_operator.lifecycle import modelcompression as mclife
from kiln_operator.lifecycle import modeldeployment as mdlife
from kiln_operator.lifecycle import trainingjob as tjlife
from kiln_operator.status import rfc3339

REPO = Path(__file__).resolve().parents[2]
KSTATUS = bin_dir() / "kstatus"
ARGOCD_HEALTH = REPO / "manifests/argocd/health.lua"
NOW = 1_800_000_000.0
Obj = dict[str, Any]


def pinned_version() -> str:
    for line in (REPO / "hack/versions.env").read_text().splitlines():
        if line.startswith("KSTATUS_VERSION="):
            return "v" + line.split("=", 1)[1].strip()
    raise AssertionError("hack/versions.env pins no KSTATUS_VERSION")


def kstatus(*objects: Obj, as_list: bool = False, argocd: bool = False) -> list[Obj]:
    """kstatus' reading of each object: {"kind", "name", "status", "message"} (or "error"); with ``argocd``,
    Argo CD's reading through Kiln's Lua health check instead."""
    if not KSTATUS.exists():
        if os.environ.get("CI"):
            pytest.fail(f"{KSTATUS} not built under CI: hack/test.sh runs hack/build-kstatus.sh")
        pytest.skip(f"{KSTATUS} is not built (hack/build-kstatus.sh)")
    text = json.dumps(list(objects)) if as_list else "".join(json.dumps(o) + "\n" for o in objects)
    args = [str(KSTATUS), f"--argocd-health={ARGOCD_HEALTH}"] if argocd else [str(KSTATUS)]
    out = subprocess.run(args, input=text, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return [json.loads(line) for line in out.stdout.splitlines()]


def resource(kind: str, name: str, status: Obj, generation: int) -> Obj:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": kind,
        "metadata": {"name": name, "namespace": "team", "generation": generation},
        "status": status,
    }


def cond(status: Obj, type_: str) -> Obj:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


# ------------------------------------------------------------------------------------------------ TrainingJob

TJ_GENERATION = 3


def tj(**spec: Any) -> Obj:
    status = spec.pop("status", {})
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "run", "namespace": "team", "uid": "0123456789ab", "generation": TJ_GENERATION},
        "spec": {"image": "kiln/trainer:1", "dataset": {"uri": "file:///data"}, **spec},
        "status": status,
    }


def tj_job(attempt: int, *conditions: str) -> Obj:
    return {
        "metadata": {
            "name": tjb.job_name("run", attempt),
            "labels": tjb.child_labels("run", attempt),
            "annotations": {labels.LEDGER: tjlife.Ledger().dump()},
            "creationTimestamp": rfc3339(NOW - 100),
        },
        "spec": {"suspend": False},
        "status": {"conditions": [{"type": t, "status": "True"} for t in conditions]},
    }


def tj_pod(attempt: int, phase: str, terminated: Obj | None = None) -> Obj:
    state = {"terminated": {"finishedAt": rfc3339(NOW - 10), **terminated}} if terminated else {"running": {}}
    return {
        "metadata": {
            "name": f"run-{attempt}-0-x",
            "labels": tjb.child_labels("run", attempt),
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"},
        },
        "status": {
            "phase": phase,
            "startTime": rfc3339(NOW - 50),
            "containerStatuses": [{"name": "trainer", "state": state}],
        },
    }


def tj_status(phase: str) -> Obj:
    """The status ``decide`` writes for a TrainingJob in ``phase``."""
    running = tj(status={"phase": "Running"})
    if phase == "Pending":
        plan = tjlife.decide(tj(), [], [], None, NOW)
    elif phase == "Running":
        plan = tjlife.decide(tj(status={"phase": "Pending"}), [tj_job(1)], [tj_pod(1, "Running")], None, NOW)
    elif phase == "Restarting":
        lost = json.dumps({"exitCode": 4, "reason": "Infrastructure", "message": "storage unreachable"})
        pods = [tj_pod(1, "Failed", {"exitCode": 4, "message": lost})]
        plan = tjlife.decide(running, [tj_job(1)], pods, None, NOW)
    elif phase == "Suspended":
        plan = tjlife.decide(tj(suspend=True), [], [], None, NOW)
    elif phase == "Succeeded":
        said = {"exitCode": 0, "reason": "Succeeded", "artifact": {"uri": "s3://m/run", "digest": "sha256:" + "a" * 64}}
        pods = [tj_pod(1, "Succeeded", {"exitCode": 0, "message": json.dumps(said)})]
        plan = tjlife.decide(running, [tj_job(1, "Complete")], pods, None, NOW)
    elif phase == "Failed":
        bad = json.dumps({"exitCode": 2, "reason": "UserError", "message": "ValueError: no such column"})
        pods = [tj_pod(1, "Failed", {"exitCode": 2, "message": bad})]
        plan = tjlife.decide(
            tj(status={"phase": "Running"}, runPolicy={"maxUserRetries": 0}), [tj_job(1)], pods, None, NOW
        )
    else:
        raise AssertionError(phase)
    assert plan.status["phase"] == phase
    return plan.status


# ------------------------------------------------------------------------------------------- ModelCompression

MC_GENERATION = 2
SRC = "sha256:" + "1a" * 32
CAND = "sha256:" + "2b" * 32
MC_CONFIG = mclife.Config(artifact_root="file:///store", registry_root="file:///store/registry")


def mc(**spec: Any) -> Obj:
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelCompression",
        "metadata": {"name": "small", "namespace": "team", "uid": "abcdef0123456789", "generation": MC_GENERATION},
        "spec": {
            "image": "kiln/compressor:1",
            "source": {"trainingJobRef": {"name": "run"}},
            "recipe": {"steps": [{"export": {}}, {"quantize": {"mode": "Dynamic"}}]},
            "evaluation": {"dataset": {"uri": "pvc://data/sst2"}},
            **spec,
        },
    }


def trained(phase: str = "Succeeded") -> Obj:
    return {
        "metadata": {"name": "run"},
        "status": {
            "phase": phase,
            "artifact": {"uri": "file:///store/team/run/model", "digest": SRC},
            "conditions": [{"type": "ModelReady", "status": "True" if phase == "Succeeded" else "False"}],
        },
    }


def mc_job(*conditions: str) -> Obj:
    key = SRC[7:17]
    return {
        "metadata": {"name": mcb.job_name("small", key, 1), "labels": mcb.child_labels("small", key, 1)},
        "status": {"conditions": [{"type": t, "status": "True"} for t in conditions]},
    }


def mc_pod(phase: str, said: Obj, code: int = 0) -> Obj:
    key = SRC[7:17]
    terminated = {"exitCode": code, "message": json.dumps(said)}
    return {
        "metadata": {"name": f"small-{key}-1-x", "labels": mcb.child_labels("small", key, 1)},
        "status": {"phase": phase, "containerStatuses": [{"name": "compressor", "state": {"terminated": terminated}}]},
    }


def compressed(passed: bool) -> Obj:
    gate = {"name": "maxAccuracyDrop", "passed": passed, "value": 0.004 if passed else 0.031, "threshold": 0.01}
    return {
        "exitCode": 0,
        "reason": "Succeeded",
        "artifact": {"uri": "file:///store/team/small/cand", "digest": CAND},
        "gatesPassed": passed,
        "report": {"sizeRatio": 0.26, "accuracyDrop": gate["value"], "gates": [gate]},
    }


def mc_status(phase: str) -> Obj:
    """The status ``decide`` writes for a ModelCompression in ``phase``."""
    done = [mc_job("Complete")]
    if phase == "Pending":
        plan = mclife.decide(mc(), trained("Running"), [], [], NOW, MC_CONFIG)
    elif phase == "Running":
        plan = mclife.decide(mc(), trained(), [], [], NOW, MC_CONFIG)
    elif phase == "AwaitingApproval":
        pods = [mc_pod("Succeeded", compressed(True))]
        plan = mclife.decide(mc(promotion={"policy": "Manual"}), trained(), done, pods, NOW, MC_CONFIG)
    elif phase == "Promoted":
        plan = mclife.decide(mc(), trained(), done, [mc_pod("Succeeded", compressed(True))], NOW, MC_CONFIG)
    elif phase == "Rejected":
        plan = mclife.decide(mc(), trained(), done, [mc_pod("Succeeded", compressed(False))], NOW, MC_CONFIG)
    elif phase == "Failed":
        said = {"exitCode": 2, "reason": "UserError", "message": "the recipe's quantize step needs an export first"}
        pods = [mc_pod("Failed", said, code=2)]
        plan = mclife.decide(mc(), trained(), [mc_job("Failed")], pods, NOW, MC_CONFIG)
    else:
        raise AssertionError(phase)
    assert plan.status["phase"] == phase
    return plan.status


# -------------------------------------------------------------------------------------------- ModelDeployment

D1, D2, D3 = ("sha256:" + c * 64 for c in "123")
CANARY = {
    "strategy": "Canary",
    "steps": [{"weight": 50, "pauseSeconds": 0}, {"weight": 100, "pauseSeconds": 0}],
    "analysis": {"intervalSeconds": 10, "minRequests": 10, "maxErrorRate": 0.05},
}


def promotes(digest: str) -> Obj:
    return {"status": {"promoted": {"uri": f"file:///reg/{digest[7:12]}", "digest": digest}}}


class World:
    """The revisions' Deployments as the API server and the Deployment controller keep them; each pass's plan is
    applied and its status written back, as the controller does."""

    def __init__(self, **spec: Any) -> None:
        self.md: Obj = {
            "apiVersion": "kiln.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": "sentiment", "namespace": "team", "uid": "u-1", "generation": 1},
            "spec": {
                "source": {"modelCompressionRef": {"name": "mc"}},
                "replicas": 2,
                "runtime": {"image": "kiln/server:1"},
                **spec,
            },
        }
        self.deployments: dict[str, Obj] = {}
        self.pods: list[Obj] = []
        self.now = NOW

    def step(self, source: Obj | None, analysis: mdlife.Analysis | None = None) -> Obj:
        plan = mdlife.decide(
            self.md, source, copy.deepcopy(list(self.deployments.values())), self.pods, self.now, analysis=analysis
        )
        carry_out(self.deployments, plan)
        self.md = {**self.md, "status": plan.status}
        return plan.status

    def ready_all(self) -> None:
        for d in self.deployments.values():
            d["status"] = {"readyReplicas": d["spec"]["replicas"]}

    def spec_change(self, **spec: Any) -> None:
        self.md["spec"] = {**self.md["spec"], **spec}
        self.md["metadata"]["generation"] += 1


def serving(**spec: Any) -> World:
    w = World(**spec)
    w.step(promotes(D1))
    w.ready_all()
    w.step(promotes(D1))
    return w


def crash_looping(key: str, code: int, said: str, template: str = "5d8f", created: float = NOW - 300) -> Obj:
    """A server pod of the revision ``key`` (of the ReplicaSet of pod template ``template``) in a crash loop."""
    return {
        "metadata": {
            "name": f"sentiment-{key[:4]}-{template}",
            "labels": {labels.REVISION: key, "pod-template-hash": template},
            "creationTimestamp": rfc3339(created),
        },
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "server",
                    "ready": False,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 5m0s"}},
                    "lastState": {"terminated": {"exitCode": code, "message": said}},
                }
            ],
        },
    }


def pulling(key: str) -> Obj:
    waiting = {"reason": "ImagePullBackOff", "message": 'Back-off pulling image "kiln/server:1"'}
    return {
        "metadata": {"name": f"sentiment-{key[:4]}-abc", "labels": {labels.REVISION: key}},
        "status": {"phase": "Pending", "containerStatuses": [{"name": "server", "state": {"waiting": waiting}}]},
    }


def unschedulable(key: str) -> Obj:
    scheduled = {"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}
    scheduled["message"] = "0/3 nodes are available: 3 Insufficient cpu."
    return {
        "metadata": {"name": f"sentiment-{key[:4]}-abc", "labels": {labels.REVISION: key}},
        "status": {"phase": "Pending", "conditions": [scheduled]},
    }


def only_revision_with(pod: Callable[[str], Obj]) -> World:
    """The first revision, created, whose pods are ``pod`` (none ready)."""
    w = World()
    w.step(promotes(D1))
    w.pods = [pod("1111111111")]
    return w


def unloadable(key: str) -> Obj:
    return crash_looping(key, ExitCode.ARTIFACT, "model.onnx: sha256 mismatch")


def changed_while_unloadable(new_pods: str) -> Obj:
    """The only revision cannot load its model; a spec change (a new server image) rolls its pods. ``new_pods``:
    "none" (the pass that applies the new template), "starting" or "unloadable" (the new template's pod)."""
    w = only_revision_with(unloadable)
    w.step(promotes(D1))  # Stalled ("Degraded (only revision: ModelLoadFailed)")
    w.spec_change(runtime={"image": "kiln/server:2"})
    if new_pods == "none":
        return w.step(promotes(D1))
    w.step(promotes(D1))
    if new_pods == "starting":
        creating = [{"name": "server", "state": {"waiting": {"reason": "ContainerCreating"}}}]
        w.pods.append(
            {
                "metadata": {
                    "name": "sentiment-1111-7c9e",
                    "labels": {labels.REVISION: "1111111111", "pod-template-hash": "7c9e"},
                    "creationTimestamp": rfc3339(NOW - 1),
                },
                "status": {"phase": "Pending", "containerStatuses": creating},
            }
        )
    else:
        w.pods.append(crash_looping("1111111111", ExitCode.ARTIFACT, "still a sha256 mismatch", "7c9e", NOW - 1))
    return w.step(promotes(D1))


def rolled_back() -> World:
    """A canary of D2 whose analysis failed: D1 serves all replicas again; the source still promotes D2."""
    w = serving(rollout=CANARY)
    w.step(promotes(D2))
    w.ready_all()
    w.step(promotes(D2))
    w.now += 10
    due = mdlife.analysis_due(w.md, list(w.deployments.values()), w.now)
    assert due is not None
    bad = Sample(requests=40, errors=8, p95_ms=6.0)
    w.step(promotes(D2), mdlife.Analysis(due.revision, due.step, due.window, candidate=bad))
    return w


def md_case(name: str) -> tuple[Obj, str]:
    """The status ``decide`` writes in the ModelDeployment case ``name``, and the phase that case is."""
    if name == "Pending":  # the first revision's pods come up
        w = World()
        w.step(promotes(D1))
        return w.step(promotes(D1)), "Pending"
    if name == "Pending (source not promoted yet)":
        return World().step({"status": {"phase": "Running"}}), "Pending"
    if name == "Pending (unschedulable)":
        return only_revision_with(unschedulable).step(promotes(D1)), "Pending"
    if name == "Progressing (canary)":
        w = serving(rollout=CANARY)
        w.step(promotes(D2))
        w.ready_all()
        return w.step(promotes(D2)), "Progressing"
    if name == "Ready":
        return serving().step(promotes(D1)), "Ready"
    if name == "Degraded (only revision: ModelLoadFailed)":
        return only_revision_with(unloadable).step(promotes(D1)), "Degraded"
    if name == "Degraded (ModelLoadFailed), a spec change applied":
        return changed_while_unloadable("none"), "Degraded"
    if name == "Degraded (ModelLoadFailed), the changed pods starting":
        return changed_while_unloadable("starting"), "Degraded"
    if name == "Degraded (ModelLoadFailed), the changed pods failing too":
        return changed_while_unloadable("unloadable"), "Degraded"
    if name == "Degraded (only revision: ArtifactUntrusted)":
        said = '{"reason": "Untrusted", "message": "artifact signed by ed25519:0123 only, not trusted"}'
        w = only_revision_with(lambda k: crash_looping(k, ExitCode.UNTRUSTED, said))
        return w.step(promotes(D1)), "Degraded"
    if name == "Degraded (ImagePullBackOff)":
        return only_revision_with(pulling).step(promotes(D1)), "Degraded"
    if name == "Degraded (CrashLoopBackOff, unknown exit)":
        w = only_revision_with(lambda k: crash_looping(k, ExitCode.UNKNOWN, "Traceback ..."))
        return w.step(promotes(D1)), "Degraded"
    if name == "rolled back":
        w = rolled_back()
        return w.md["status"], "Ready"
    if name == "rolled back (a later pass)":
        return rolled_back().step(promotes(D2)), "Ready"
    if name == "rolled back, then a newer artifact":
        return rolled_back().step(promotes(D3)), "Progressing"
    if name == "rolled back, then pinned to the serving digest":
        w = rolled_back()
        w.spec_change(source={"modelCompressionRef": {"name": "mc"}, "digest": D1})
        return w.step(promotes(D2)), "Ready"
    if name == "Failed (pinned digest not promoted)":
        w = World(source={"modelCompressionRef": {"name": "mc"}, "digest": D3})
        return w.step(promotes(D2)), "Failed"
    raise AssertionError(name)


# ------------------------------------------------------------------------------------------------ the readings

# (kind, case, what a platform user expects kstatus to read)
EXPECTED = [
    ("TrainingJob", "Pending", "InProgress"),
    ("TrainingJob", "Running", "InProgress"),
    ("TrainingJob", "Restarting", "InProgress"),
    ("TrainingJob", "Suspended", "Current"),  # suspended as the spec asks: nothing to wait for
    ("TrainingJob", "Succeeded", "Current"),
    ("TrainingJob", "Failed", "Failed"),
    ("ModelCompression", "Pending", "InProgress"),
    ("ModelCompression", "Running", "InProgress"),
    ("ModelCompression", "AwaitingApproval", "Current"),  # held for a person, as spec.promotion asks
    ("ModelCompression", "Promoted", "Current"),
    ("ModelCompression", "Rejected", "Failed"),
    ("ModelCompression", "Failed", "Failed"),
    ("ModelDeployment", "Pending", "InProgress"),
    ("ModelDeployment", "Pending (source not promoted yet)", "InProgress"),
    ("ModelDeployment", "Pending (unschedulable)", "InProgress"),
    ("ModelDeployment", "Progressing (canary)", "InProgress"),
    ("ModelDeployment", "Ready", "Current"),
    ("ModelDeployment", "Degraded (only revision: ModelLoadFailed)", "Failed"),
    ("ModelDeployment", "Degraded (only revision: ArtifactUntrusted)", "Failed"),
    # A spec change may fix it: the old template's pods (kept until the new ones are ready) no longer decide.
    ("ModelDeployment", "Degraded (ModelLoadFailed), a spec change applied", "InProgress"),
    ("ModelDeployment", "Degraded (ModelLoadFailed), the changed pods starting", "InProgress"),
    ("ModelDeployment", "Degraded (ModelLoadFailed), the changed pods failing too", "Failed"),
    ("ModelDeployment", "Degraded (ImagePullBackOff)", "InProgress"),
    ("ModelDeployment", "Degraded (CrashLoopBackOff, unknown exit)", "InProgress"),
    ("ModelDeployment", "rolled back", "Failed"),
    ("ModelDeployment", "rolled back (a later pass)", "Failed"),
    ("ModelDeployment", "rolled back, then a newer artifact", "InProgress"),
    ("ModelDeployment", "rolled back, then pinned to the serving digest", "Current"),
    ("ModelDeployment", "Failed (pinned digest not promoted)", "Failed"),
]


def build(kind: str, case: str) -> Obj:
    """The object kstatus reads: the status ``decide`` wrote, on an object of the generation it was written for."""
    if kind == "TrainingJob":
        status, generation = tj_status(case), TJ_GENERATION
    elif kind == "ModelCompression":
        status, generation = mc_status(case), MC_GENERATION
    else:
        status, phase = md_case(case)
        assert status["phase"] == phase, (case, status["phase"])
        generation = status["observedGeneration"]
    assert status["observedGeneration"] == generation
    return resource(kind, case, status, generation)


@pytest.fixture(scope="module")
def readings() -> dict[tuple[str, str], tuple[Obj, Obj]]:
    """Every case's object and kstatus' reading of it, from one run of the program."""
    objects = [build(kind, case) for kind, case, _ in EXPECTED]
    out = kstatus(*objects)
    assert [(r["kind"], r["name"]) for r in out] == [(k, c) for k, c, _ in EXPECTED]
    return {(k, c): (obj, r) for (k, c, _), obj, r in zip(EXPECTED, objects, out, strict=True)}


@pytest.mark.parametrize(("kind", "case", "expected"), EXPECTED, ids=[f"{k}:{c}" for k, c, _ in EXPECTED])
def test_kstatus_reads_each_phase_as_a_platform_user_expects(readings, kind, case, expected):
    obj, reading = readings[(kind, case)]
    assert "error" not in reading, reading
    summary = {c["type"]: (c["status"], c["reason"]) for c in obj["status"]["conditions"]}
    assert reading["status"] == expected, (reading, summary)
    # Kiln's own kstatus conditions say the same, so tools that read the conditions directly agree with kstatus.
    assert (cond(obj["status"], "Stalled").get("status") == "True") == (expected == "Failed"), summary
    assert (cond(obj["status"], "Reconciling").get("status") == "True") == (expected == "InProgress"), summary


# What Argo CD shows for each kstatus reading. Suspended: held as the spec asks (Argo CD's own reading of a
# suspended Job or a paused Rollout); Degraded: Failed, which needs a change to the spec or a new artifact.
ARGOCD = {"Current": "Healthy", "InProgress": "Progressing", "Failed": "Degraded"}
HELD = {("TrainingJob", "Suspended"), ("ModelCompression", "AwaitingApproval")}


@pytest.fixture(scope="module")
def argocd_readings(readings) -> dict[tuple[str, str], Obj]:
    objects = [readings[(k, c)][0] for k, c, _ in EXPECTED]
    out = kstatus(*objects, argocd=True)
    assert [(r["kind"], r["name"]) for r in out] == [(k, c) for k, c, _ in EXPECTED]
    return {(k, c): r for (k, c, _), r in zip(EXPECTED, out, strict=True)}


@pytest.mark.parametrize(("kind", "case", "expected"), EXPECTED, ids=[f"{k}:{c}" for k, c, _ in EXPECTED])
def test_argo_cd_reads_each_phase_as_kstatus_does(argocd_readings, readings, kind, case, expected):
    reading = argocd_readings[(kind, case)]
    assert "error" not in reading, reading
    assert reading["status"] == ("Suspended" if (kind, case) in HELD else ARGOCD[expected]), reading
    # The message is the deciding condition's reason and words, as kstatus' is.
    obj, _ = readings[(kind, case)]
    deciding = {"Degraded": "Stalled", "Progressing": "Reconciling"}.get(reading["status"], "Ready")
    c = cond(obj["status"], deciding)
    assert reading["message"].startswith(c["reason"]), (reading, c)
    assert c["message"][:200] in reading["message"]


def test_argo_cd_waits_for_the_operator_to_observe_a_new_generation_and_a_first_status():
    status, _ = md_case("Ready")
    ahead = resource("ModelDeployment", "ahead", status, status["observedGeneration"] + 1)
    fresh = {k: v for k, v in resource("TrainingJob", "new", {}, 1).items() if k != "status"}
    bare = resource("ModelCompression", "bare", {"observedGeneration": 1}, 1)  # no conditions yet
    readings = kstatus(ahead, fresh, bare, argocd=True)
    assert [(r["status"], r.get("error")) for r in readings] == [("Progressing", None)] * 3, readings
    assert readings[0]["message"] == "Waiting for the Kiln operator to observe generation 2"
    assert readings[2]["message"] == "Waiting for the Kiln operator's Ready condition"


def test_argo_cd_refuses_what_its_interpreter_refuses(tmp_path):
    """The harness is as strict as Argo CD: a script using the string library (not opened for argocd-cm scripts)
    fails, so the shipped check provably does without it."""
    script = tmp_path / "uses-string.lua"
    script.write_text('hs = {}\nhs.status = string.upper("healthy")\nreturn hs\n')
    obj = build("TrainingJob", "Succeeded")
    out = subprocess.run(
        [str(KSTATUS), f"--argocd-health={script}"], input=json.dumps(obj), capture_output=True, text=True, timeout=60
    )
    if not KSTATUS.exists():
        pytest.skip(f"{KSTATUS} is not built (hack/build-kstatus.sh)")
    (reading,) = [json.loads(line) for line in out.stdout.splitlines()]
    assert "string" in reading["error"], reading


def test_a_permanent_serving_error_stalls_with_the_pods_reason_and_the_server_s_words(readings):
    for case, reason, words in [
        ("Degraded (only revision: ModelLoadFailed)", "ModelLoadFailed", "sha256 mismatch"),
        ("Degraded (only revision: ArtifactUntrusted)", "ArtifactUntrusted", "not trusted"),
    ]:
        obj, reading = readings[("ModelDeployment", case)]
        stalled, degraded = cond(obj["status"], "Stalled"), cond(obj["status"], "Degraded")
        assert (stalled["status"], stalled["reason"]) == ("True", reason)
        assert (degraded["status"], degraded["reason"]) == ("True", reason)
        assert cond(obj["status"], "Ready")["status"] == "False"
        assert words in reading["message"]  # Flux shows kstatus' message: the server's own words


def test_a_rolled_back_deployment_serves_ready_but_reads_failed_until_a_new_artifact_or_spec(readings):
    """`kubectl wait --for=condition=Ready` returns (the stable revision serves all replicas); kstatus, and so Flux,
    reads Failed (Stalled=True, reason RolledBack): the artifact the source promotes is not what serves."""
    for case in ("rolled back", "rolled back (a later pass)"):
        obj, reading = readings[("ModelDeployment", case)]
        st = obj["status"]
        assert cond(st, "Ready")["status"] == "True"
        assert st["current"]["digest"] == D1
        assert (cond(st, "RolledBack")["status"], cond(st, "RolledBack")["reason"]) == ("True", "AnalysisFailed")
        assert (cond(st, "Stalled")["status"], cond(st, "Stalled")["reason"]) == ("True", "RolledBack")
        assert cond(st, "Degraded")["status"] == "False"  # no serving pod fails
        assert D2 in reading["message"]
        assert "error rate 0.2000 > maxErrorRate 0.05" in reading["message"]
    pinned, _ = readings[("ModelDeployment", "rolled back, then pinned to the serving digest")]
    assert cond(pinned["status"], "Stalled")["status"] == "False"
    assert pinned["status"]["observedGeneration"] == 2


def test_a_pinned_digest_the_source_does_not_promote_stalls_with_that_reason(readings):
    obj, reading = readings[("ModelDeployment", "Failed (pinned digest not promoted)")]
    stalled = cond(obj["status"], "Stalled")
    assert (stalled["status"], stalled["reason"]) == ("True", "SourceDigestMismatch")
    assert f"not the pinned {D3}" in reading["message"]


def test_a_state_the_spec_asks_to_hold_is_ready_but_says_it_did_not_run_or_promote(readings):
    """kstatus falls back on Ready when neither Reconciling nor Stalled is True, and reads Ready=False as
    InProgress: a suspended TrainingJob and a candidate held for approval are Ready (nothing for the controller to
    do), while Succeeded and Promoted say what did not happen; the approval command is in Ready's message."""
    for kind, case, said in [
        ("TrainingJob", "Suspended", ("Succeeded", "False")),
        ("ModelCompression", "AwaitingApproval", ("Promoted", "False")),
    ]:
        obj, _ = readings[(kind, case)]
        ready = cond(obj["status"], "Ready")
        assert (ready["status"], ready["reason"]) == ("True", case)
        assert cond(obj["status"], said[0])["status"] == said[1]
    held, _ = readings[("ModelCompression", "AwaitingApproval")]
    assert f'"approvedDigest":"{CAND}"' in cond(held["status"], "Ready")["message"]


def test_a_generation_not_yet_observed_reads_in_progress_whatever_the_conditions_say():
    status, _ = md_case("Ready")
    ahead = resource("ModelDeployment", "ahead", status, status["observedGeneration"] + 1)
    [reading] = kstatus(ahead)
    assert reading["status"] == "InProgress"
    assert "latest observed generation is 1" in reading["message"]


def test_the_program_reads_a_json_list_as_it_reads_objects_one_per_line():
    objects = [build("TrainingJob", "Succeeded"), build("TrainingJob", "Failed")]
    assert kstatus(*objects, as_list=True) == kstatus(*objects)
    assert [r["status"] for r in kstatus(*objects, as_list=True)] == ["Current", "Failed"]


def test_the_binary_is_built_from_the_pinned_cli_utils():
    kstatus()  # skips when not built
    out = subprocess.run([str(KSTATUS), "--version"], capture_output=True, text=True, timeout=60, check=True)
    assert f"sigs.k8s.io/cli-utils {pinned_version()} " in out.stdout, "rebuild it: hack/build-kstatus.sh"
    assert "gopher-lua v1.1.2" in out.stdout  # the interpreter Argo CD embeds
    go_mod = (REPO / "hack/kstatus/go.mod").read_text()
    assert f"sigs.k8s.io/cli-utils {pinned_version()}\n" in go_mod
