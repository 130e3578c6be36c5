"""The TrainingJob state machine without a cluster: children in, plan out."""

import json

import pytest

from kiln_operator import labels
from kiln_operator.builders import trainingjob as b
from kiln_operator.controller import material
from kiln_operator.lifecycle import pods as podstate
from kiln_operator.lifecycle import trainingjob as life
from kiln_operator.status import rfc3339

NOW = 1_800_000_000.0
T = rfc3339


def tj(**spec):
    status = spec.pop("status", {})
    return {
        "apiVersion": "kiln.dev/v1alpha1",
        "kind": "TrainingJob",
        "metadata": {"name": "run", "namespace": "team", "uid": "0123456789ab", "generation": 3},
        "spec": {"image": "kiln/trainer:1", "dataset": {"uri": "file:///data"}, **spec},
        "status": status,
    }


def job(attempt, *, ledger=None, conditions=(), suspend=False, created=NOW - 100, start=None, annotations=None):
    ann = {labels.LEDGER: (ledger or life.Ledger()).dump(), **(annotations or {})}
    status = {"conditions": [{"type": t, "status": "True", **extra} for t, extra in conditions]}
    if start is not None:
        status["startTime"] = T(start)
    return {
        "metadata": {
            "name": b.job_name("run", attempt),
            "labels": b.child_labels("run", attempt),
            "annotations": ann,
            "creationTimestamp": T(created),
        },
        "spec": {"suspend": suspend},
        "status": status,
    }


def pod(attempt, index, phase, *, started=NOW - 50, terminated=None, waiting=None, conditions=(), reason=None):
    status = {"phase": phase, "conditions": list(conditions)}
    if phase != "Pending":
        status["startTime"] = T(started)
    state = {}
    if terminated is not None:
        state = {"terminated": {"finishedAt": T(NOW - 10), **terminated}}
    elif waiting is not None:
        state = {"waiting": waiting}
    elif phase == "Running":
        state = {"running": {"startedAt": T(started)}}
    if state:
        status["containerStatuses"] = [{"name": "trainer", "state": state}]
    if reason:
        status["reason"] = reason
    return {
        "metadata": {
            "name": f"{b.job_name('run', attempt)}-{index}-x",
            "labels": b.child_labels("run", attempt),
            "annotations": {"batch.kubernetes.io/job-completion-index": str(index)},
        },
        "status": status,
    }


def cond(status, type_):
    return next(c for c in status["conditions"] if c["type"] == type_)


def test_a_new_trainingjob_gets_its_service_and_first_attempt():
    plan = life.decide(tj(), [], [], None, NOW)
    kinds = [(o["kind"], o["metadata"]["name"]) for o in plan.create]
    assert kinds == [("Job", "run-1")]  # one node: no Service (MASTER_ADDR is 127.0.0.1)
    multi = life.decide(tj(nodes=2), [], [], None, NOW)
    assert [(o["kind"], o["metadata"]["name"]) for o in multi.create] == [("Service", "run-svc"), ("Job", "run-1")]
    assert plan.status["phase"] == "Pending"
    assert plan.status["attempt"] == 1
    assert plan.status["observedGeneration"] == 3
    assert cond(plan.status, "Reconciling")["status"] == "True"
    assert json.loads(plan.create[-1]["metadata"]["annotations"][labels.LEDGER]) == {}


@pytest.mark.parametrize(
    ("spec", "phase", "reason"),
    [
        ({}, "Pending", "PodsStarting"),
        ({"suspend": True}, "Suspended", "Suspended"),
        ({"scheduling": {"queueName": "gpus"}}, "Pending", "WaitingForQuota"),
    ],
)
def test_the_first_status_already_says_what_the_new_job_is_doing(spec, phase, reason):
    """One status write for a new TrainingJob: the pass that creates the Job plans the status of the world with
    that Job in it, so the pass its watch event starts finds nothing to write."""
    first = life.decide(tj(**spec), [], [], None, NOW)
    assert first.status["phase"] == phase
    assert cond(first.status, "Ready")["reason"] == reason
    # kstatus: suspended as asked is Current (not converging), a starting or queued job is InProgress.
    assert cond(first.status, "Reconciling")["status"] == ("False" if phase == "Suspended" else "True")
    assert cond(first.status, "Stalled")["status"] == "False"
    assert first.events == []
    created = first.create[-1]
    created["metadata"]["creationTimestamp"] = T(NOW)
    again = life.decide(tj(**spec, status=first.status), [created], [], None, NOW + 1)
    assert again.create == []
    assert again.events == []
    assert material(again.status) == material(first.status)


def test_the_default_locations_come_from_the_artifact_root():
    plan = life.decide(tj(), [], [], None, NOW, life.Config(artifact_root="s3://kiln/models"))
    env = {e["name"]: e.get("value") for e in plan.create[-1]["spec"]["template"]["spec"]["containers"][0]["env"]}
    spec = json.loads(env["KILN_TRAINING_SPEC"])
    assert spec["output"]["uri"] == "s3://kiln/models/team/run-01234567/model"
    assert spec["checkpoint"]["uri"] == "s3://kiln/models/team/run-01234567/model-checkpoints"


def test_all_pods_running_is_running_with_progress():
    progress = {"step": 50, "totalSteps": 200, "loss": 0.5, "heartbeat": T(NOW - 5), "etaSeconds": 30}
    progress["resumedFromStep"] = 40
    plan = life.decide(tj(status={"phase": "Pending"}), [job(1)], [pod(1, 0, "Running")], progress, NOW)
    assert plan.status["phase"] == "Running"
    assert plan.status["progress"] == {
        "step": 50,
        "totalSteps": 200,
        "resumedFromStep": 40,
        "percent": 25,
        "loss": 0.5,
        "heartbeatTime": T(NOW - 5),
        "eta": T(NOW + 25),
    }
    assert ("Normal", "Running") in [(t, r) for t, r, _ in plan.events]
    assert cond(plan.status, "Running")["status"] == "True"


def test_success_records_the_artifact_and_model_ready():
    report = {
        "exitCode": 0,
        "reason": "Succeeded",
        "step": 600,
        "totalSteps": 600,
        "metrics": {"eval_accuracy": 0.97},
        "artifact": {"uri": "s3://m/run", "digest": "sha256:" + "ab" * 32},
    }
    pods = [pod(1, 0, "Succeeded", terminated={"exitCode": 0, "message": json.dumps(report)})]
    plan = life.decide(tj(status={"phase": "Running"}), [job(1, conditions=[("Complete", {})])], pods, None, NOW)
    assert plan.status["phase"] == "Succeeded"
    assert plan.status["artifact"] == {
        "uri": "s3://m/run",
        "digest": "sha256:" + "ab" * 32,
        "shortDigest": "ab" * 6,
        "format": "hf-transformers",
        "metrics": {"eval_accuracy": 0.97},
    }
    assert cond(plan.status, "ModelReady")["status"] == "True"
    assert cond(plan.status, "Ready")["status"] == "True"
    assert cond(plan.status, "Reconciling")["status"] == "False"


def test_a_failed_rank_replaces_the_whole_group_and_passes_the_resume_point():
    checkpoint = {"step": 100, "uri": "s3://c/run/step-00000100", "time": T(NOW - 60)}
    message = json.dumps({"exitCode": 4, "reason": "Infrastructure", "message": "rendezvous timed out"})
    pods = [
        pod(1, 0, "Running"),
        pod(1, 1, "Failed", terminated={"exitCode": 4, "message": message}),
    ]
    current = tj(status={"phase": "Running", "lastCheckpoint": checkpoint}, nodes=2)
    plan = life.decide(current, [job(1)], pods, None, NOW)
    assert plan.status["phase"] == "Restarting"
    assert plan.status["restarts"] == {"infrastructure": 1, "user": 0}
    assert plan.status["failure"]["class"] == "Infrastructure"
    assert "rendezvous timed out" in plan.status["failure"]["message"]
    assert plan.deleted("Job") == ["run-1"]
    new = plan.create[-1]
    assert new["metadata"]["name"] == "run-2"
    assert new["metadata"]["annotations"]["kiln.dev/resume-from"] == "s3://c/run/step-00000100"
    ledger = life.Ledger.load(new["metadata"]["annotations"][labels.LEDGER])
    assert (ledger.infrastructure, ledger.user, ledger.preemptions) == (1, 0, 0)
    assert ledger.previous["class"] == "Infrastructure"


@pytest.mark.parametrize(
    ("pod_status", "cls", "reason"),
    [
        (
            {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}]},
            "Preemption",
            "PreemptionByScheduler",
        ),
        (
            {"conditions": [{"type": "DisruptionTarget", "status": "True", "reason": "DeletionByTaintManager"}]},
            "Infrastructure",
            "DeletionByTaintManager",
        ),
        ({"terminated": {"exitCode": 137, "reason": "OOMKilled"}}, "OutOfMemory", "OOMKilled"),
        ({"terminated": {"exitCode": 2, "message": "Traceback...\nValueError: bad"}}, "UserError", "UserError"),
        ({"terminated": {"exitCode": 5}}, "Preemption", "Preemption"),
        ({"terminated": {"exitCode": 1}}, "Unknown", "Error"),
        ({"terminated": {"exitCode": 143}}, "Infrastructure", "Killed"),
    ],
)
def test_failure_classes(pod_status, cls, reason):
    p = pod(1, 0, "Failed", terminated=pod_status.get("terminated"), conditions=pod_status.get("conditions", ()))
    failure = podstate.classify(
        job(1), [p], container=b.CONTAINER, oom_hint=life.oom_hint({"resources": {"memory": "8Gi"}})
    )
    assert (failure.cls, failure.reason) == (cls, reason)
    if cls == "OutOfMemory":
        assert "raise resources.memory (now 8Gi)" in failure.message
    if reason == "UserError":
        assert failure.log_tail == "Traceback...\nValueError: bad"


def test_preemption_never_spends_a_budget():
    evicted = pod(1, 0, "Failed", reason="Evicted", conditions=[{"type": "DisruptionTarget", "status": "True"}])
    spent = life.Ledger(user=1, infrastructure=5)
    plan = life.decide(
        tj(runPolicy={"maxUserRetries": 1, "maxInfraRetries": 5}), [job(1, ledger=spent)], [evicted], None, NOW
    )
    assert plan.status["phase"] == "Restarting"
    assert plan.status["preemptions"] == 1
    assert plan.status["restarts"] == {"infrastructure": 5, "user": 1}


def test_user_errors_fail_after_their_own_budget_with_the_message():
    message = json.dumps({"exitCode": 2, "reason": "UserError", "message": "dataset.uri: no train split"})
    failed = pod(2, 0, "Failed", terminated={"exitCode": 2, "message": message})
    plan = life.decide(tj(status={"phase": "Running"}), [job(2, ledger=life.Ledger(user=1))], [failed], None, NOW)
    assert plan.status["phase"] == "Failed"
    assert plan.status["failure"]["class"] == "UserError"
    assert "dataset.uri: no train split" in plan.status["failure"]["message"]
    assert "maxUserRetries=1 used up" in plan.status["failure"]["message"]
    assert not plan.create
    assert cond(plan.status, "Stalled")["status"] == "True"
    assert plan.want_log_tail == failed["metadata"]["name"]


def test_unschedulable_is_pending_with_the_scheduler_message_then_the_startup_deadline_fails_it():
    unscheduled = pod(
        1,
        0,
        "Pending",
        conditions=[
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes are available: 3 Insufficient nvidia.com/gpu.",
            }
        ],
    )
    body = tj(runPolicy={"startupDeadlineSeconds": 300})
    plan = life.decide(body, [job(1, created=NOW - 100)], [unscheduled], None, NOW)
    assert plan.status["phase"] == "Pending"
    assert cond(plan.status, "Ready")["reason"] == "Unschedulable"
    assert "Insufficient nvidia.com/gpu" in cond(plan.status, "Ready")["message"]
    assert plan.requeue_after == pytest.approx(200)
    late = life.decide(body, [job(1, created=NOW - 301)], [unscheduled], None, NOW)
    assert late.status["phase"] == "Failed"
    assert late.status["failure"]["reason"] == "StartupDeadlineExceeded"
    assert late.deleted("Job") == ["run-1"]


def test_an_image_that_cannot_be_pulled_is_the_pending_reason():
    stuck = pod(1, 0, "Pending", waiting={"reason": "ImagePullBackOff", "message": "Back-off pulling image x"})
    plan = life.decide(tj(), [job(1)], [stuck], None, NOW)
    assert cond(plan.status, "Ready")["reason"] == "ImagePullBackOff"


def test_a_silent_trainer_misses_the_progress_deadline():
    body = tj(status={"phase": "Running"}, runPolicy={"progressDeadlineSeconds": 120})
    stale = {"step": 10, "heartbeat": T(NOW - 200)}
    plan = life.decide(body, [job(1)], [pod(1, 0, "Running", started=NOW - 300)], stale, NOW)
    assert plan.status["phase"] == "Restarting"
    assert plan.status["failure"]["reason"] == "ProgressDeadlineExceeded"
    assert plan.status["restarts"]["infrastructure"] == 1
    fail = tj(status={"phase": "Running"}, runPolicy={"progressDeadlineSeconds": 120, "onProgressDeadline": "Fail"})
    assert (
        life.decide(fail, [job(1)], [pod(1, 0, "Running", started=NOW - 300)], stale, NOW).status["phase"] == "Failed"
    )
    fresh = {"step": 10, "heartbeat": T(NOW - 20)}
    plan = life.decide(body, [job(1)], [pod(1, 0, "Running", started=NOW - 300)], fresh, NOW)
    assert plan.status["phase"] == "Running"
    # Without a readable progress source there is no deadline to miss.
    assert (
        life.decide(body, [job(1)], [pod(1, 0, "Running", started=NOW - 300)], None, NOW).status["phase"] == "Running"
    )


def test_suspend_is_mirrored_onto_a_job_without_a_queue():
    plan = life.decide(tj(suspend=True, status={"phase": "Running"}), [job(1)], [pod(1, 0, "Running")], None, NOW)
    assert plan.patched("Job") == [("run-1", {"spec": {"suspend": True}})]
    plan = life.decide(tj(status={"phase": "Suspended"}), [job(1, suspend=True)], [], None, NOW)
    assert plan.patched("Job") == [("run-1", {"spec": {"suspend": False}})]


JOB_UID = "job-uid-1"


def queued_job(attempt=1, **kw):
    out = job(attempt, **kw)
    out["metadata"]["uid"] = JOB_UID
    return out


def workload(*, active=True, evictions=(), conditions=(), uid=JOB_UID):
    return {
        "metadata": {"name": "job-run-1-abcde", "labels": {labels.KUEUE_JOB_UID: uid}},
        "spec": {"active": active},
        "status": {
            "conditions": [{"type": t, "status": st, **extra} for t, st, extra in conditions],
            "schedulingStats": {"evictions": [{"reason": r, "underlyingCause": "", "count": n} for r, n in evictions]},
        },
    }


def test_a_queued_job_is_never_suspended_or_resumed_by_kiln_but_through_its_workload():
    queued = {"scheduling": {"queueName": "gpus"}}
    running = life.decide(
        tj(suspend=True, status={"phase": "Running"}, **queued),
        [queued_job(1)],
        [pod(1, 0, "Running")],
        None,
        NOW,
        workload=workload(),
    )
    # Kueue unsuspends whatever it admitted: suspending the Job would fight it; deactivating asks it to stop.
    assert running.patched("Job") == []
    assert running.patched("Workload") == [("job-run-1-abcde", {"spec": {"active": False}})]
    resumed = life.decide(
        tj(status={"phase": "Suspended"}, **queued),
        [queued_job(1, suspend=True)],
        [],
        None,
        NOW,
        workload=workload(active=False, evictions=[("Deactivated", 1)]),
    )
    assert resumed.patched("Job") == []
    assert resumed.patched("Workload") == [("job-run-1-abcde", {"spec": {"active": True}})]
    assert resumed.status["preemptions"] == 0  # asked for, not done to the job
    # Waiting for quota: nothing to patch, and Kueue's own reason in the message.
    waiting = life.decide(
        tj(**queued),
        [queued_job(1, suspend=True)],
        [],
        None,
        NOW,
        workload=workload(conditions=[("QuotaReserved", "False", {"message": "insufficient unused quota for cpu"})]),
    )
    assert waiting.patch == []
    assert waiting.status["phase"] == "Pending"
    ready = cond(waiting.status, "Ready")
    assert ready["reason"] == "WaitingForQuota"
    assert "queue gpus: insufficient unused quota for cpu" in ready["message"]
    assert waiting.requeue_after == life.QUEUE_POLL_SECONDS  # Kueue's words change on the Workload: look again
    silent = life.decide(tj(**queued), [queued_job(1, suspend=True)], [], None, NOW, workload=workload())
    assert silent.requeue_after == 2.0  # Kueue has not said why yet
    # Suspended before Kueue made the Workload: look again in a moment, so it is deactivated before admission.
    early = life.decide(tj(suspend=True, **queued), [queued_job(1, suspend=True)], [], None, NOW)
    assert early.status["phase"] == "Suspended"
    assert early.requeue_after == 1.0
    # Another Job's Workload (the attempt before) is not this attempt's.
    stale = life.decide(tj(suspend=True, **queued), [queued_job(1)], [], None, NOW, workload=workload(uid="other"))
    assert stale.patched("Workload") == []


def test_a_queued_job_that_starts_suspended_gets_no_job_until_resumed():
    # Kueue would admit a Job the moment its Workload exists, before Kiln could deactivate it: no Job at all.
    queued = {"scheduling": {"queueName": "gpus"}}
    parked = life.decide(tj(suspend=True, **queued), [], [], None, NOW)
    assert parked.create == []
    assert parked.status["phase"] == "Suspended"
    assert parked.status["attempt"] == 0
    assert cond(parked.status, "Ready")["reason"] == "Suspended"
    assert "created, and queued, when it is resumed" in cond(parked.status, "Ready")["message"]
    resumed = life.decide(tj(status=parked.status, **queued), [], [], None, NOW)
    (created,) = [o for o in resumed.create if o["kind"] == "Job"]
    assert created["spec"]["suspend"] is True  # for Kueue to admit
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpus"
    assert resumed.status["attempt"] == 1
    # Without a queue Kiln owns the Job's suspend: the Job is created, suspended.
    plain = life.decide(tj(suspend=True), [], [], None, NOW)
    (job,) = [o for o in plain.create if o["kind"] == "Job"]
    assert job["spec"]["suspend"] is True


def test_kueue_preemption_is_a_preemption_that_spends_no_budget_and_keeps_the_attempt():
    queued = {"scheduling": {"queueName": "gpus"}}
    evicted = workload(
        evictions=[("Preempted", 1)],
        conditions=[
            (
                "Evicted",
                "True",
                {
                    "reason": "Preempted",
                    "message": "Preempted to accommodate a workload (UID: u2) due to prioritization",
                    "lastTransitionTime": T(NOW - 30),
                },
            )
        ],
    )
    body = tj(status={"phase": "Running", "attempt": 1, "preemptions": 0}, **queued)
    # The trainer checkpointed on SIGTERM and exited non-zero: stopped by the suspension, not failed.
    stopped = pod(1, 0, "Failed", terminated={"exitCode": 143, "reason": "Error"})
    plan = life.decide(body, [queued_job(1, suspend=True)], [stopped], None, NOW, workload=evicted)
    assert plan.create == []  # the same Job resumes when Kueue admits it again
    assert plan.delete == []
    assert plan.patch == []  # and Kiln leaves its suspend to Kueue
    st = plan.status
    assert st["attempt"] == 1
    assert st["preemptions"] == 1
    assert st["restarts"] == {"infrastructure": 0, "user": 0}
    assert st["failure"]["class"] == "Preemption"
    assert st["failure"]["reason"] == "Preempted"
    assert st["failure"]["time"] == T(NOW - 30)  # Kueue's time: the same on every pass
    assert st["phase"] == "Pending"
    assert cond(st, "Ready")["reason"] == "Preempted"
    assert [(t, r) for t, r, _ in plan.events] == [("Warning", "Preempted")]
    # Admitted again and running: still one preemption (Kueue's count), no new event.
    again = tj(status={**st, "phase": "Pending"}, **queued)
    readmitted = workload(evictions=[("Preempted", 1)], conditions=[("Evicted", "False", {"reason": "Admitted"})])
    plan = life.decide(again, [queued_job(1)], [pod(1, 0, "Running")], None, NOW, workload=readmitted)
    assert plan.status["phase"] == "Running"
    assert plan.status["preemptions"] == 1
    assert plan.events == [("Normal", "Running", "attempt 1: 1 pod(s) running")]
    # A later replacement carries Kueue's count on in the ledger of the next attempt.
    failed = queued_job(1, conditions=[("Failed", {"reason": "BackoffLimitExceeded"})])
    crashed = pod(1, 0, "Failed", terminated={"exitCode": 1, "reason": "Error"})
    plan = life.decide(again, [failed], [crashed], None, NOW, workload=readmitted)
    (nxt,) = [o for o in plan.create if o["kind"] == "Job"]
    assert life.Ledger.load(nxt["metadata"]["annotations"][labels.LEDGER]).preemptions == 1
    assert plan.status["preemptions"] == 1


def test_a_finished_job_cleans_up_its_children_after_the_ttl_and_itself_after_its_own():
    done = {"phase": "Succeeded", "completionTime": T(NOW - 100), "conditions": []}
    body = tj(status=done, runPolicy={"childrenTtlSecondsAfterFinished": 60, "ttlSecondsAfterFinished": 500})
    plan = life.decide(body, [job(1)], [], None, NOW)
    assert plan.deleted("Job") == ["run-1"]
    assert plan.deleted("Service") == ["run-svc"]
    assert not plan.delete_self
    assert plan.requeue_after == pytest.approx(400)
    assert not plan.create
    later = life.decide(body, [], [], None, NOW + 500)
    assert later.delete_self


def test_the_ledger_comes_from_the_newest_job_not_from_a_stale_status():
    # Status still says attempt 1 (our patch not seen yet); the Jobs say attempt 2 exists: nothing is re-counted.
    stale = tj(status={"phase": "Running", "attempt": 1, "restarts": {"infrastructure": 0, "user": 0}})
    failed = pod(1, 0, "Failed", terminated={"exitCode": 4})
    plan = life.decide(
        stale, [job(1, conditions=[("Failed", {})]), job(2, ledger=life.Ledger(infrastructure=1))], [failed], None, NOW
    )
    assert not plan.create
    assert plan.deleted("Job") == ["run-1"]
    assert plan.status["attempt"] == 2
    assert plan.status["restarts"]["infrastructure"] == 1


def test_gpu_seconds_add_up_over_attempts():
    body = tj(resources={"gpus": 4}, status={"phase": "Running"})
    plan = life.decide(
        body, [job(2, ledger=life.Ledger(gpu_seconds=1000))], [pod(2, 0, "Running", started=NOW - 50)], None, NOW
    )
    assert plan.status["gpuSeconds"] == 1000 + 50 * 4


def test_conditions_change_at_the_time_the_pass_is_given():
    plan = life.decide(tj(), [], [], None, NOW)
    assert {c["lastTransitionTime"] for c in plan.status["conditions"]} == {T(NOW)}
