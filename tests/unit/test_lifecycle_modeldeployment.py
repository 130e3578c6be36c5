"""The ModelDeployment state machine and builders, without a cluster: a small world applies each Plan (Deployments
created, scaled, deleted; readiness set by the test) and the next pass reads it back, as the controller does."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from support.deployments import carry_out

from kiln_artifacts.contract import ExitCode
from kiln_operator import labels
from kiln_operator.analysis import PodDrift, Sample
from kiln_operator.builders import modeldeployment as b
from kiln_operator.lifecycle import modeldeployment as life

D1 = "sha256:" + "1" * 64
D2 = "sha256:" + "2" * 64
D3 = "sha256:" + "3" * 64


def md(**spec: Any) -> dict[str, Any]:
    base = {
        "source": {"modelCompressionRef": {"name": "mc"}},
        "replicas": 2,
        "runtime": {"image": "kiln/server:1", "maxBatchSize": 16},
        "resources": {"cpu": "2", "memory": "1Gi", "gpus": 0},
    }
    base.update(spec)
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": "sentiment", "namespace": "ns", "uid": "u-1", "generation": 1},
        "spec": base,
    }


def mc(digest: str) -> dict[str, Any]:
    return {"status": {"promoted": {"uri": f"file:///reg/{digest[7:12]}", "digest": digest}}}


CANARY = {
    "strategy": "Canary",
    "steps": [{"weight": 50, "pauseSeconds": 0}, {"weight": 100, "pauseSeconds": 0}],
    "analysis": {"intervalSeconds": 10, "minRequests": 10, "maxErrorRate": 0.05, "maxP95LatencyMs": 100},
}


class World:
    """Deployments as the API server and the Deployment controller would keep them."""

    def __init__(self, body: dict[str, Any]) -> None:
        self.md = body
        self.deployments: dict[str, dict[str, Any]] = {}
        self.pods: list[dict[str, Any]] = []
        self.now = 1_000_000.0
        self.plans: list[Any] = []
        self.routes: list[dict[str, Any]] = []

    def step(
        self,
        source: dict[str, Any] | None,
        analysis: life.Analysis | None = None,
        monitoring: life.Monitoring | None = None,
    ) -> Any:
        plan = life.decide(
            self.md,
            source,
            list(copy.deepcopy(list(self.deployments.values()))),
            self.pods,
            self.now,
            analysis=analysis,
            monitoring=monitoring,
        )
        self.routes = [o for o in plan.apply if o["kind"] == "HTTPRoute"] or self.routes
        carry_out(self.deployments, plan)
        self.md = {**self.md, "status": plan.status}
        self.plans.append(plan)
        return plan

    def ready_all(self) -> None:
        for d in self.deployments.values():
            d["status"] = {"readyReplicas": d["spec"]["replicas"], "replicas": d["spec"]["replicas"]}

    def by_role(self, role: str) -> dict[str, Any] | None:
        return next((d for d in self.deployments.values() if d["metadata"]["annotations"][labels.ROLE] == role), None)


def cond(status: dict[str, Any], type_: str) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == type_)


def good(n: float = 50) -> Sample:
    return Sample(requests=n, errors=0, p95_ms=5.0)


def to_analysis(world: World, sample: Sample) -> life.Analysis:
    due = life.analysis_due(world.md, list(world.deployments.values()), world.now)
    assert due is not None, "an analysis is due"
    return life.Analysis(due.revision, due.step, due.window, candidate=sample, stable=good())


def test_first_revision_is_deployed_then_ready():
    w = World(md())
    plan = w.step(mc(D1))
    [dep] = plan.apply
    assert dep["metadata"]["name"] == "sentiment-1111111111"
    assert dep["spec"]["replicas"] == 2
    assert plan.status["phase"] == "Pending"
    assert cond(plan.status, "Ready")["status"] == "False"
    plan = w.step(mc(D1))
    assert plan.apply == []  # nothing changed: nothing applied
    w.ready_all()
    plan = w.step(mc(D1))
    assert plan.status["phase"] == "Ready"
    assert cond(plan.status, "Ready")["status"] == "True"
    assert plan.status["current"]["digest"] == D1
    assert plan.status["current"]["revision"] == 1
    assert plan.status["readyReplicas"] == 2
    assert plan.status["selector"] == "kiln.dev/modeldeployment=sentiment"
    assert plan.status["url"] == "http://sentiment.ns.svc.cluster.local:8080"
    assert plan.status["grpcAddress"] == "sentiment.ns.svc.cluster.local:8081"


def test_source_not_promoted_yet_waits():
    w = World(md())
    plan = w.step({"status": {"phase": "Running"}})
    assert plan.apply == []
    assert cond(plan.status, "SourceReady")["reason"] == "SourceNotReady"
    assert cond(plan.status, "Reconciling")["status"] == "True"


def deployed(spec: dict[str, Any] | None = None) -> World:
    w = World(md(**(spec or {})))
    w.step(mc(D1))
    w.ready_all()
    w.step(mc(D1))
    return w


def test_canary_passes_every_step_and_promotes_with_surge_first():
    w = deployed({"rollout": CANARY})
    plan = w.step(mc(D2))
    cand = w.by_role("candidate")
    assert cand is not None
    assert cand["spec"]["replicas"] == 2  # 50 %: as many pods as the stable revision, on top of its own
    assert w.by_role("stable")["spec"]["replicas"] == 2
    assert plan.status["phase"] == "Progressing"
    assert life.analysis_due(w.md, list(w.deployments.values()), w.now) is None  # not ready: no analysis
    w.ready_all()
    w.step(mc(D2))
    assert w.by_role("stable")["spec"]["replicas"] == 2  # the stable revision keeps its full capacity
    assert w.by_role("candidate")["metadata"]["annotations"][labels.STEP_STARTED] == str(int(w.now))
    assert w.md["status"]["canaryWeight"] == 50
    w.now += 10
    plan = w.step(mc(D2), to_analysis(w, good()))
    assert plan.status["analysis"]["verdict"] == "Pass"
    cand = w.by_role("candidate")
    assert cand["metadata"]["annotations"][labels.CANARY_STEP] == "1"
    assert cand["spec"]["replicas"] == 2
    assert labels.STEP_STARTED not in cand["metadata"]["annotations"]
    # Step 1 (100%): the stable revision makes way as far as the candidate's ready replicas (here all 2) cover.
    w.step(mc(D2))
    assert w.by_role("stable")["spec"]["replicas"] == 0
    w.ready_all()
    w.step(mc(D2))
    w.now += 10
    plan = w.step(mc(D2), to_analysis(w, good()))
    assert [d["metadata"]["annotations"][labels.ARTIFACT_DIGEST] for d in w.deployments.values()] == [D2]
    assert w.by_role("stable")["spec"]["replicas"] == 2
    assert plan.status["current"]["digest"] == D2
    assert plan.status["current"]["revision"] == 2
    assert [h["outcome"] for h in plan.status["history"]] == ["Promoted", "Superseded"]
    assert ("Normal", "Promoted") in [(t, r) for t, r, _ in plan.events]


def test_failed_analysis_rolls_back_and_the_digest_is_not_retried():
    w = deployed({"rollout": CANARY})
    w.step(mc(D2))
    w.ready_all()
    w.step(mc(D2))
    w.now += 10
    bad = Sample(requests=40, errors=8, p95_ms=6.0)
    plan = w.step(mc(D2), to_analysis(w, bad))
    assert [d["metadata"]["annotations"][labels.ARTIFACT_DIGEST] for d in w.deployments.values()] == [D1]
    assert w.by_role("stable")["spec"]["replicas"] == 2
    rolled = cond(plan.status, "RolledBack")
    assert rolled["status"] == "True"
    assert rolled["reason"] == "AnalysisFailed"
    assert "error rate 0.2000 > maxErrorRate 0.05" in rolled["message"]
    assert plan.status["rejected"][0]["digest"] == D2
    assert plan.status["history"][-1]["outcome"] == "RolledBack"
    # The source still promotes D2: it is not rolled out again.
    for _ in range(3):
        plan = w.step(mc(D2))
        assert plan.apply == []
        assert len(w.deployments) == 1
    assert cond(plan.status, "RolledBack")["reason"] == "AnalysisFailed"
    assert "not retried" in cond(plan.status, "RolledBack")["message"]
    # A newer artifact is rolled out as usual.
    w.step(mc(D3))
    assert w.by_role("candidate")["metadata"]["annotations"][labels.ARTIFACT_DIGEST] == D3


def test_retry_digest_with_a_new_generation_tries_again():
    w = deployed({"rollout": CANARY})
    w.step(mc(D2))
    w.ready_all()
    w.step(mc(D2))
    w.now += 10
    w.step(mc(D2), to_analysis(w, Sample(requests=40, errors=40, p95_ms=1.0)))
    assert w.by_role("candidate") is None
    w.md["spec"]["rollout"] = {**CANARY, "retryDigest": D2}
    w.step(mc(D2))
    assert w.by_role("candidate") is None  # same generation as the rollback: still rejected
    w.md["metadata"]["generation"] = 2
    w.step(mc(D2))
    assert w.by_role("candidate")["metadata"]["annotations"][labels.ARTIFACT_DIGEST] == D2


def test_slow_candidate_fails_on_p95_only_after_min_requests():
    verdict = life.verdict(CANARY["analysis"], life.Analysis(2, 0, 10, candidate=Sample(5, 0, 900.0)))
    assert verdict[0] == "Wait"
    verdict = life.verdict(CANARY["analysis"], life.Analysis(2, 0, 10, candidate=Sample(50, 0, 900.0)))
    assert verdict[0] == "Fail"
    assert "p95 latency 900.0 ms > maxP95LatencyMs 100" in verdict[1]
    # Errors beyond the budget of minRequests fail at once, before minRequests is reached.
    assert life.verdict(CANARY["analysis"], life.Analysis(2, 0, 10, candidate=Sample(3, 3, 1.0)))[0] == "Fail"
    assert life.verdict(CANARY["analysis"], life.Analysis(2, 0, 10, error="down"))[0] == "Unavailable"


def crashing(name: str, key: str, code: int, message: str) -> dict[str, Any]:
    return {
        "metadata": {"name": name, "labels": {labels.REVISION: key}},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "server",
                    "ready": False,
                    "state": {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off"}},
                    "lastState": {"terminated": {"exitCode": code, "message": message}},
                }
            ],
        },
    }


def test_candidate_whose_model_does_not_load_is_rolled_back():
    w = deployed({"rollout": CANARY})
    w.step(mc(D2))
    w.pods = [
        crashing("sentiment-2222-abc", "2222222222", ExitCode.ARTIFACT, "artifact file model.onnx: sha256 mismatch")
    ]
    plan = w.step(mc(D2))
    rolled = cond(plan.status, "RolledBack")
    assert rolled["reason"] == "ModelLoadFailed"
    assert "sha256 mismatch" in rolled["message"]
    assert w.by_role("candidate") is None


def test_candidate_refused_as_untrusted_is_rolled_back_with_its_own_reason():
    w = deployed({"rollout": CANARY, "verification": {"trustedKeysConfigMap": "keys"}})
    w.step(mc(D2))
    said = '{"reason": "Untrusted", "message": "artifact file:///reg/22222: signed by ed25519:0123 only, not trusted"}'
    w.pods = [crashing("sentiment-2222-abc", "2222222222", ExitCode.UNTRUSTED, said)]
    plan = w.step(mc(D2))
    rolled = cond(plan.status, "RolledBack")
    assert rolled["reason"] == "ArtifactUntrusted"
    assert "not trusted" in rolled["message"]
    assert w.by_role("candidate") is None
    assert w.by_role("stable")["metadata"]["annotations"]["kiln.dev/artifact-digest"] == D1


def test_stable_revision_refused_as_untrusted_is_degraded():
    w = World(md(verification={"trustedKeysConfigMap": "keys"}))
    w.step(mc(D1))
    w.pods = [
        crashing(
            "sentiment-1111-abc", "1111111111", ExitCode.UNTRUSTED, '{"reason": "Untrusted", "message": "unsigned"}'
        )
    ]
    plan = w.step(mc(D1))
    degraded = cond(plan.status, "Degraded")
    assert (degraded["status"], degraded["reason"]) == ("True", "ArtifactUntrusted")
    assert cond(plan.status, "Ready")["status"] == "False"


def test_stable_crash_loop_is_degraded_not_ready():
    w = deployed()
    w.pods = [crashing("sentiment-1111-abc", "1111111111", 1, "Traceback ...")]
    for d in w.deployments.values():
        d["status"] = {"readyReplicas": 1}
    plan = w.step(mc(D1))
    assert cond(plan.status, "Degraded")["status"] == "True"
    assert cond(plan.status, "Degraded")["reason"] == "CrashLoopBackOff"
    assert cond(plan.status, "Ready")["status"] == "False"
    assert plan.status["phase"] == "Degraded"


def test_progress_deadline_rolls_back_a_candidate_that_never_gets_ready():
    w = deployed({"rollout": {**CANARY, "progressDeadlineSeconds": 60}})
    w.step(mc(D2))
    w.now += 61
    plan = w.step(mc(D2))
    assert cond(plan.status, "RolledBack")["reason"] == "ProgressDeadlineExceeded"


def test_pinned_digest_stays_while_the_source_moves_on():
    w = deployed({"source": {"modelCompressionRef": {"name": "mc"}, "digest": D1}})
    plan = w.step(mc(D2))
    assert plan.apply == []
    assert plan.delete == []
    assert plan.status["current"]["digest"] == D1


def test_rolling_update_replaces_after_the_new_revision_is_ready():
    w = deployed()
    w.step(mc(D2))
    assert w.by_role("candidate")["spec"]["replicas"] == 2
    assert w.by_role("stable")["spec"]["replicas"] == 2
    w.ready_all()
    plan = w.step(mc(D2))
    assert [d["metadata"]["annotations"][labels.ARTIFACT_DIGEST] for d in w.deployments.values()] == [D2]
    assert plan.status["current"]["revision"] == 2


def test_scale_and_autoscaling_bounds():
    w = deployed()
    w.md["spec"]["replicas"] = 5
    w.step(mc(D1))
    assert w.by_role("stable")["spec"]["replicas"] == 5
    body = md(autoscaling={"minReplicas": 2, "maxReplicas": 4, "metric": "CPU", "target": "70"}, replicas=9)
    assert b.replicas(body) == 4
    hpa = b.autoscaler(body)
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "ModelDeployment",
        "name": "sentiment",
    }
    assert hpa["spec"]["metrics"][0]["resource"]["target"] == {"type": "Utilization", "averageUtilization": 70}
    custom = b.autoscaler(md(autoscaling={"maxReplicas": 4, "metric": "InFlightRequests", "target": "8"}))
    assert custom["spec"]["metrics"][0]["pods"]["metric"]["name"] == "kiln_server_inflight_requests"


@pytest.mark.parametrize(
    ("n", "weight", "expected"),
    [(1, 10, (1, 1)), (4, 25, (1, 4)), (9, 10, (1, 9)), (10, 50, (10, 10)), (2, 50, (2, 2)), (3, 100, (3, 0))],
)
def test_step_replicas(n, weight, expected):
    assert life.step_replicas(n, weight) == expected


def test_server_deployment_is_hardened_and_wired():
    dep = b.deployment(
        md(), "1111111111", uri="file:///reg/a", digest=D1, number=1, role="stable", replicas=2, created=0
    )
    pod = dep["spec"]["template"]["spec"]
    [c] = pod["containers"]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert env["KILN_MODEL_URI"] == "file:///reg/a"
    assert env["KILN_MODEL_DIGEST"] == D1
    assert env["KILN_MODEL_NAME"] == "sentiment"
    assert env["KILN_SERVER_MAX_BATCH_SIZE"] == "16"
    assert env["KILN_SERVER_INTRA_OP_THREADS"] == "2"  # the CPU request, not the node's cores
    assert env["KILN_SERVER_INSTANCES"] == "1"
    two = b.deployment(
        md(runtime={"image": "x", "instances": 2, "intraOpThreads": 1}),
        "k",
        uri="file:///m",
        digest=None,
        number=1,
        role="stable",
        replicas=1,
        created=0,
    )
    two_env = {e["name"]: e.get("value") for e in two["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert (two_env["KILN_SERVER_INSTANCES"], two_env["KILN_SERVER_INTRA_OP_THREADS"]) == ("2", "1")
    assert c["readinessProbe"]["httpGet"]["path"] == "/v2/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"
    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert pod["securityContext"]["runAsNonRoot"] is True
    # Replicas spread over nodes when there are several, preferred only (one node still takes them all).
    (spread,) = pod["topologySpreadConstraints"]
    assert (spread["topologyKey"], spread["whenUnsatisfiable"], spread["maxSkew"]) == (
        "kubernetes.io/hostname",
        "ScheduleAnyway",
        1,
    )
    assert spread["labelSelector"]["matchLabels"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert spread["labelSelector"]["matchLabels"]["kiln.dev/revision"] == "1111111111"
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert dep["spec"]["selector"]["matchLabels"][labels.REVISION] == "1111111111"
    assert env["KILN_SERVER_GRPC_PORT"] == "8081"
    assert [(p["name"], p["containerPort"]) for p in c["ports"]] == [("http", 8080), ("grpc", 8081), ("metrics", 9090)]
    svc = b.service(md())
    assert svc["spec"]["selector"] == {labels.MODELDEPLOYMENT: "sentiment"}  # every revision in service
    # REST and gRPC on the Service; gRPC as h2c, so a Gateway or mesh balances calls, not connections
    ports = {p["name"]: p for p in b.service(md(service={"port": 80, "grpcPort": 9000}))["spec"]["ports"]}
    assert (ports["http"]["port"], ports["http"]["targetPort"]) == (80, "http")
    assert (ports["grpc"]["port"], ports["grpc"]["targetPort"], ports["grpc"]["appProtocol"]) == (
        9000,
        "grpc",
        "kubernetes.io/h2c",
    )
    assert b.revision_service(md(), "k")["spec"]["ports"] == b.service(md())["spec"]["ports"]
    assert b.pod_disruption_budget(md())["spec"]["maxUnavailable"] == 1
    gpu = md(runtime={"image": "x", "executionProvider": "CUDAExecutionProvider"}, resources={"gpus": 1})
    gdep = b.deployment(gpu, "k", uri="s3://bucket/m", digest=None, number=1, role="stable", replicas=1, created=0)
    gpod = gdep["spec"]["template"]["spec"]
    assert gpod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpod["tolerations"]
    assert {e["name"]: e.get("value") for e in gpod["containers"][0]["env"]}["KILN_SERVER_PROVIDER"] == "cuda"


def test_training_job_source_is_served_once_its_model_is_ready():
    body = md(source={"trainingJobRef": {"name": "train"}})
    running = {"status": {"phase": "Running", "artifact": {"uri": "file:///a", "digest": D1}}}
    found, reason, _ = life.resolve_source(body, running, None)
    assert found is None
    assert reason == "SourceNotReady"  # an artifact without ModelReady=True is not served
    ready = {
        "status": {
            "phase": "Succeeded",
            "artifact": {"uri": "file:///a", "digest": D1},
            "conditions": [{"type": "ModelReady", "status": "True"}],
        }
    }
    found, reason, _ = life.resolve_source(body, ready, None)
    assert found == {"uri": "file:///a", "digest": D1}
    assert reason == "SourceReady"
    found, reason, message = life.resolve_source(
        md(source={"modelCompressionRef": {"name": "mc"}, "digest": D2}), mc(D1), None
    )
    assert found is None
    assert reason == "SourceDigestMismatch"
    assert D2 in message


def test_gateway_route_carries_the_exact_canary_weights():
    gateway = {"parentRefs": [{"name": "public", "namespace": "gw"}], "hostnames": ["digits.example.com"]}
    w = deployed({"rollout": CANARY, "service": {"port": 8080, "gateway": gateway}})

    def weights() -> dict[str, int]:
        route = w.routes[-1]
        assert route["spec"]["parentRefs"][0]["name"] == "public"
        return {r["name"]: r["weight"] for r in route["spec"]["rules"][0]["backendRefs"]}

    w.step(mc(D1))
    assert weights() == {"sentiment-1111111111": 100}
    assert w.md["status"]["routeUrl"] == "http://digits.example.com"
    w.step(mc(D2))
    w.step(mc(D2))
    assert weights() == {"sentiment-1111111111": 100, "sentiment-2222222222": 0}  # not ready: no traffic
    w.ready_all()
    w.step(mc(D2))
    assert weights() == {"sentiment-1111111111": 50, "sentiment-2222222222": 50}
    assert w.md["status"]["canaryWeight"] == 50
    w.now += 10
    w.step(mc(D2), to_analysis(w, good()))  # step 1 (100%): its pods are not ready yet, 50% stays
    assert weights() == {"sentiment-1111111111": 50, "sentiment-2222222222": 50}
    w.ready_all()
    w.step(mc(D2))
    assert weights() == {"sentiment-1111111111": 0, "sentiment-2222222222": 100}
    w.now += 10
    plan = w.step(mc(D2), to_analysis(w, good()))
    assert weights() == {"sentiment-2222222222": 100}
    assert ("v1", "Service", "sentiment-1111111111") in plan.delete  # the old revision's Service goes with it


def test_scaled_to_zero_swaps_the_revision_without_a_canary():
    w = deployed({"rollout": CANARY})
    w.md["spec"]["replicas"] = 0
    w.step(mc(D1))
    assert w.by_role("stable")["spec"]["replicas"] == 0
    w.step(mc(D2))
    assert w.by_role("candidate")["spec"]["replicas"] == 0
    plan = w.step(mc(D2))
    assert plan.status["current"]["digest"] == D2
    assert len(w.deployments) == 1


def test_conditions_change_at_the_time_the_pass_is_given():
    from kiln_operator.status import rfc3339

    w = World(md())
    plan = w.step(mc(D1))
    assert {c["lastTransitionTime"] for c in plan.status["conditions"]} == {rfc3339(w.now)}


# ------------------------------------------------------------------------------------------------ monitoring


def pod(samples: float, **scores: float) -> PodDrift:
    return PodDrift(samples, 200, "artifact", scores, {}, {"low_confidence": 3, "input_out_of_range": 1})


def serving(spec: dict[str, Any] | None = None) -> World:
    w = World(md(**(spec or {})))
    w.step(mc(D1))
    w.ready_all()
    w.step(mc(D1))
    return w


def read(w: World, *pods: PodDrift, error: str | None = None) -> Any:
    due = life.monitoring_due(w.md, list(w.deployments.values()), w.now)
    assert due == 1, "a drift reading of revision 1 is due"
    return w.step(mc(D1), monitoring=life.Monitoring(due, tuple(pods), error))


def test_drift_over_threshold_turns_drifting_true_with_the_numbers_and_an_event_once():
    w = serving()
    first = w.plans[-1]
    assert cond(first.status, "Drifting")["status"] == "Unknown"  # not measured yet
    assert first.requeue_after is not None
    assert first.requeue_after <= 1.0
    plan = read(w, pod(600, prediction=0.05, confidence=0.04), pod(400, prediction=0.07, confidence=0.02))
    drifting = cond(plan.status, "Drifting")
    assert drifting["status"] == "False"
    assert drifting["reason"] == "WithinReference"
    mon = plan.status["monitoring"]
    assert mon["samples"] == 1000
    assert mon["pods"] == 2
    assert mon["reference"] == "artifact"
    pred = next(s for s in mon["signals"] if s["name"] == "prediction")
    assert pred["score"] == pytest.approx(0.6 * 0.05 + 0.4 * 0.07)  # weighted by samples
    assert pred["threshold"] == 0.2
    assert pred["drifting"] is False
    assert mon["anomalies"] == {"input_out_of_range": 2, "low_confidence": 6}
    assert not [e for e in plan.events if e[1].startswith("Drift")]
    assert life.monitoring_due(w.md, list(w.deployments.values()), w.now) is None  # read: not again at once
    assert plan.requeue_after == pytest.approx(60)

    w.now += 60
    plan = read(w, pod(1000, prediction=0.45, confidence=0.1))
    drifting = cond(plan.status, "Drifting")
    assert drifting["status"] == "True"
    assert drifting["reason"] == "DriftDetected"
    assert "prediction 0.450 > 0.2" in drifting["message"]
    assert "1000 samples" in drifting["message"]
    assert [e[:2] for e in plan.events] == [("Warning", "DriftDetected")]
    since = next(s for s in plan.status["monitoring"]["signals"] if s["name"] == "prediction")["since"]
    assert cond(plan.status, "Ready")["status"] == "True"  # drift never changes Ready
    assert plan.status["phase"] == "Ready"

    w.now += 60
    plan = read(w, pod(1000, prediction=0.5, confidence=0.1))
    assert cond(plan.status, "Drifting")["status"] == "True"
    assert not plan.events  # still drifting: no new Event
    assert next(s for s in plan.status["monitoring"]["signals"] if s["name"] == "prediction")["since"] == since

    w.now += 60
    plan = read(w, pod(1000, prediction=0.1, confidence=0.1))
    assert cond(plan.status, "Drifting")["status"] == "False"
    assert [e[:2] for e in plan.events] == [("Normal", "DriftResolved")]


def test_drift_verdict_waits_for_min_samples_and_uses_per_signal_thresholds():
    w = serving({"monitoring": {"minSamples": 500, "thresholds": {"confidence": 0.05}}})
    plan = read(w, pod(100, prediction=0.9))  # a small window says nothing
    drifting = cond(plan.status, "Drifting")
    assert drifting["status"] == "Unknown"
    assert drifting["reason"] == "NotEnoughSamples"
    assert "minSamples 500" in drifting["message"]
    assert "most: 100" in drifting["message"]
    w.now += 60
    plan = read(w, pod(100, prediction=0.9), pod(800, prediction=0.01, confidence=0.06))
    drifting = cond(plan.status, "Drifting")
    assert drifting["status"] == "True"
    assert "confidence 0.060 > 0.05" in drifting["message"]
    assert "prediction" not in drifting["message"]  # the small pod has no say


def test_drift_metrics_unavailable_or_monitoring_off():
    w = serving()
    plan = read(w, error="no metrics endpoint answered")
    drifting = cond(plan.status, "Drifting")
    assert drifting["status"] == "Unknown"
    assert drifting["reason"] == "MetricsUnavailable"
    assert "no metrics endpoint answered" in drifting["message"]
    w.md["spec"]["monitoring"] = {"enabled": False}
    assert life.monitoring_due(w.md, list(w.deployments.values()), w.now) is None
    plan = w.step(mc(D1))
    assert "monitoring" not in plan.status
    assert cond(plan.status, "Drifting")["reason"] == "MonitoringDisabled"


def test_monitoring_settings_reach_the_server_and_roll_the_pods():
    spec = {
        "monitoring": {
            "windowSamples": 500,
            "thresholds": {"prediction": 0.3, "confidence": 0.1},
            "payloadLog": {"rate": 0.1, "uri": "pvc://logs/payloads", "redact": ["text"]},
            "intervalSeconds": 30,
        }
    }
    w = World(md(**spec))
    [dep] = w.step(mc(D1)).apply
    [server] = dep["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["KILN_SERVER_MONITORING"] == "on"
    assert env["KILN_SERVER_DRIFT_WINDOW"] == "500"
    assert env["KILN_SERVER_DRIFT_THRESHOLDS"] == "confidence=0.1,prediction=0.3"
    assert env["KILN_SERVER_PAYLOAD_LOG_URI"] == "pvc://logs/payloads"
    assert env["KILN_SERVER_PAYLOAD_LOG_REDACT"] == "text"
    assert env["KILN_SERVER_REVISION"] == "1111111111"
    mount = next(m for m in server["volumeMounts"] if "logs" in m["name"])
    assert mount["readOnly"] is False  # the payload log writes there
    interval_only = copy.deepcopy(w.md)
    interval_only["spec"]["monitoring"]["intervalSeconds"] = 120
    assert b.template_hash(interval_only, None) == b.template_hash(w.md, None)  # the operator's own setting
    window = copy.deepcopy(w.md)
    window["spec"]["monitoring"]["windowSamples"] = 600
    assert b.template_hash(window, None) != b.template_hash(w.md, None)


def test_canary_fails_on_prediction_drift_from_the_stable_revision():
    analysis = {**CANARY["analysis"], "maxPredictionDrift": 0.2}
    same = {"pos": 60.0, "neg": 40.0}
    a = life.Analysis(
        1, 0, 60, candidate=Sample(50, 0, 5.0, same), stable=Sample(50, 0, 5.0, {"pos": 30.0, "neg": 20.0})
    )
    verdict, msg = life.verdict(analysis, a)
    assert verdict == "Pass"
    assert "prediction drift 0.0" in msg
    flipped = life.Analysis(1, 0, 60, candidate=Sample(50, 0, 5.0, {"pos": 5.0, "neg": 45.0}), stable=a.stable)
    verdict, msg = life.verdict(analysis, flipped)
    assert verdict == "Fail"
    assert "maxPredictionDrift 0.2" in msg
    none = life.Analysis(1, 0, 60, candidate=Sample(50, 0, 5.0), stable=a.stable)
    assert life.verdict(analysis, none)[0] == "Wait"
    assert life.verdict(CANARY["analysis"], none)[0] == "Pass"  # not asked for: not checked
