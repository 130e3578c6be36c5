"""Real training on CPU with the packaged digits: learning, artifact, resume after SIGKILL, SIGTERM, 2-process DDP."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

import numpy as np  # noqa: E402
from support.trainer import GRAY_SIGNALS, load_weights, published_profile, run_trainer, train_cmd, trainer_env  # noqa: E402
from support.waiting import wait_for  # noqa: E402

import kiln_artifacts as ka  # noqa: E402
from kiln_artifacts import profile, samples  # noqa: E402
from kiln_artifacts.contract import ExitCode, parse_progress_log  # noqa: E402

COMMON = ["--learning-rate", "0.003", "--batch-size", "16", "--seed", "7", "--precision", "fp32"]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = tmp_path_factory.mktemp("data") / "digits"
    return samples.publish_dataset("digits", f"file://{dest}").uri


@pytest.fixture(scope="module")
def digits_train_only(digits: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The digits without their test split, as a plain folder (the trainer accepts hand-made data)."""
    import shutil

    src, dest = ka.load(digits).root, tmp_path_factory.mktemp("data") / "digits-train"
    dest.mkdir()
    for name in (*samples.IDX_FILES["train"], "dataset.json"):
        shutil.copyfile(src / name, dest / name)
    return f"file://{dest}"


def test_trains_and_publishes_the_model(tmp_path: Path, digits: str) -> None:
    out, ck = tmp_path / "model", tmp_path / "ck"
    code, message, log = run_trainer(
        tmp_path,
        *COMMON,
        "--dataset-uri", digits, "--output-uri", f"file://{out}", "--checkpoint-uri", f"file://{ck}",
        "--max-steps", "60", "--checkpoint-every-steps", "10", "--checkpoint-keep", "2",
    )  # fmt: skip
    assert code == ExitCode.SUCCEEDED, log
    # An untrained 10-class model has a loss of ~2.3 and ~10 % accuracy; 60 steps must do far better.
    assert message["metrics"]["eval_loss"] < 0.8, message
    assert message["metrics"]["eval_accuracy"] > 0.8, message
    art = ka.load(f"file://{out}")
    assert message["artifact"] == {"uri": f"file://{out}", "digest": art.digest}
    m = art.manifest
    assert (m.kind, m.format, m.task) == ("model", "safetensors", "image-classification")
    assert m.lineage.dataset.uri == digits
    assert m.lineage.dataset.revision == ka.load(digits).digest
    assert m.lineage.hyperparameters["maxSteps"] == 60
    assert "torch" in m.lineage.libraries
    assert m.metrics["eval_accuracy"] == message["metrics"]["eval_accuracy"]
    _check_profile(f"file://{out}", digits, message["metrics"]["eval_accuracy"])
    # keep=2: only the two newest complete checkpoints remain, the last one at the final step.
    assert sorted(p.name for p in ck.iterdir() if p.name.startswith("step-")) == ["step-00000050", "step-00000060"]
    progress = json.loads((ck / "progress.json").read_text())
    assert progress["phase"] == "Succeeded"
    assert progress["step"] == progress["totalSteps"] == 60
    assert progress["samplesPerSecond"] > 0
    assert progress["heartbeat"].endswith("Z")
    # The same report in the log, as the operator reads it where it cannot read the checkpoint store.
    logged = parse_progress_log(log)
    assert logged is not None, log
    assert logged["totalSteps"] == 60, logged
    assert 0 < logged["step"] <= 60, logged


def _check_profile(uri: str, digits: str, accuracy: float) -> None:
    """The reference profile of the test split, against the test images and labels read here."""
    x, y = samples.load_idx_dataset(ka.load(digits).root, "test")
    prof = published_profile(uri, "image-classification", len(y), GRAY_SIGNALS)
    assert prof.source["split"] == "test"
    assert prof.signals["prediction"].labels == tuple(str(i) for i in range(10))
    # Each misclassified image moves one count from its label's bin to another's.
    predicted, actual = np.array(prof.signals["prediction"].counts), np.bincount(y, minlength=10)
    assert np.abs(predicted - actual).sum() <= 2 * round((1 - accuracy) * len(y))
    # The pixels as fed to the model (x / 127.5 - 1), summarised here: the same bins and counts.
    pixels = (x.astype(np.float32) / np.float32(127.5) - np.float32(1.0))[:, None]
    expected = profile.build("image-classification", profile.image_features(pixels), labels=[])
    for name in ("channel0_mean", "channel0_std"):
        assert prof.signals[name] == expected.signals[name], name


def test_resume_after_sigkill_reaches_the_uninterrupted_state(tmp_path: Path, digits: str) -> None:
    args = [*COMMON, "--dataset-uri", digits, "--max-steps", "240", "--checkpoint-every-steps", "20"]
    code, _, log = run_trainer(tmp_path, *args, "--output-uri", f"file://{tmp_path}/ref")
    assert code == ExitCode.SUCCEEDED, log

    ck = tmp_path / "ck"
    resumed = [*args, "--output-uri", f"file://{tmp_path}/resumed", "--checkpoint-uri", f"file://{ck}"]
    p = subprocess.Popen(
        train_cmd(*resumed), env=trainer_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        # Any complete checkpoint: older ones are pruned as the run goes (checkpoint.keep), so the first may be gone
        # by the time a slower poll looks for it.
        wait_for(lambda: any(ck.glob(f"step-*/{ka.MANIFEST_NAME}")) or p.poll() is not None,
                 what="a first checkpoint", timeout=60, interval=0.02)  # fmt: skip
        p.kill()
    finally:
        p.wait(timeout=30)
    assert p.returncode == -signal.SIGKILL, "the run finished before it was killed; make it longer"
    killed_at = max(int(d.name[5:]) for d in ck.iterdir() if (d / ka.MANIFEST_NAME).exists())
    assert killed_at < 240

    code, _message, log = run_trainer(tmp_path, *resumed)
    assert code == ExitCode.SUCCEEDED, log
    assert f"resumed from file://{ck}/step-{killed_at:08d}" in log
    ref, got = load_weights(tmp_path / "ref"), load_weights(tmp_path / "resumed")
    assert ref.keys() == got.keys()
    for name in ref:  # same data position, optimizer, scheduler and RNG: the same final weights
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)


def test_resume_from_uri_starts_a_new_job_from_another_jobs_checkpoint(tmp_path: Path, digits_train_only: str) -> None:
    args = [*COMMON, "--dataset-uri", digits_train_only, "--max-steps", "40", "--checkpoint-every-steps", "20"]
    first = tmp_path / "first-ck"
    code, _, log = run_trainer(
        tmp_path, *args, "--checkpoint-uri", f"file://{first}", "--output-uri", f"file://{tmp_path}/a"
    )
    assert code == ExitCode.SUCCEEDED, log
    # A new job (empty checkpoint location) told to start from the first job's step 20 ends where that job ended.
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"resume": {"fromUri": f"file://{first}/step-00000020"}}))
    second = [*args, "--spec", str(spec), "--checkpoint-uri", f"file://{tmp_path}/second-ck"]
    code, _, log = run_trainer(tmp_path, *second, "--output-uri", f"file://{tmp_path}/b")
    assert code == ExitCode.SUCCEEDED, log
    assert f"resumed from file://{first}/step-00000020 (step 20)" in log
    ref, got = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-6, msg=name)
    # No test split, no evaluation: the model is published without a reference profile, and says so by its absence.
    art = ka.load(f"file://{tmp_path}/b", verify="full")
    assert profile.PROFILE_FILE not in art.files
    assert profile.PROFILE_ANNOTATION not in art.manifest.annotations
    spec.write_text(json.dumps({"resume": {"fromUri": f"file://{first}/step-00000020", "from": "x"}}))
    code, message, _ = run_trainer(tmp_path, *second)
    assert code == ExitCode.USER_ERROR
    assert "resume: unknown field(s) from" in message["message"]


def test_sigterm_writes_a_final_checkpoint_and_exits_preempted(tmp_path: Path, digits: str) -> None:
    ck = tmp_path / "ck"
    args = [*COMMON, "--dataset-uri", digits, "--max-steps", "1000000", "--checkpoint-uri", f"file://{ck}"]
    args += ["--extra", "progressIntervalSeconds=0"]
    p = subprocess.Popen(train_cmd(*args), env=trainer_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def stepping() -> bool:
            path = ck / "progress.json"
            return p.poll() is not None or (path.exists() and json.loads(path.read_text())["step"] >= 5)

        wait_for(stepping, what="training to reach step 5", timeout=60)
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=60) == ExitCode.PREEMPTED, p.stderr.read().decode() if p.stderr else ""
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["reason"] == "Preemption"
    step = message["step"]
    assert message["lastCheckpoint"]["uri"] == f"file://{ck}/step-{step:08d}"
    ka.load(message["lastCheckpoint"]["uri"])  # complete and verified
    assert json.loads((ck / "progress.json").read_text())["phase"] == "Preempted"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_ddp_matches_one_process_with_the_same_global_batch(tmp_path: Path, digits: str) -> None:
    args = ["--learning-rate", "0.003", "--seed", "3", "--precision", "fp32", "--dataset-uri", digits]
    # Few steps: Adam divides by sqrt(v), which amplifies float summation-order differences over long runs.
    args += ["--max-steps", "4"]
    code, _, log = run_trainer(tmp_path, *args, "--batch-size", "32", "--output-uri", f"file://{tmp_path}/one")
    assert code == ExitCode.SUCCEEDED, log

    env = trainer_env(tmp_path)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "kiln_trainer"]
    # 2 processes x batch 8 x 2 accumulated micro-batches: the same 32 examples per step as 1 x 32.
    cmd += [*args, "--batch-size", "8", "--gradient-accumulation-steps", "2", "--output-uri", f"file://{tmp_path}/two"]
    cmd += ["--checkpoint-uri", f"file://{tmp_path}/ck", "--checkpoint-every-steps", "2"]  # collective checkpoints
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    one, two = load_weights(tmp_path / "one"), load_weights(tmp_path / "two")
    # Gradients averaged over 2 x 2 x 8 equal the mean over 32 up to summation order; Adam's first steps move each
    # weight by ~lr (3e-3) whatever the gradient's size, so other data would differ by ~1e-3, far above 3e-4.
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=0, atol=3e-4, msg=name)
    assert ka.load(f"file://{tmp_path}/two").manifest.metrics["steps"] == 4
    # Rank 0 alone evaluates, and so writes the whole test split's profile.
    published_profile(f"file://{tmp_path}/two", "image-classification", 359, GRAY_SIGNALS)
    assert sorted(p.name for p in (tmp_path / "ck").glob("step-*")) == ["step-00000002", "step-00000004"]


def test_sigterm_under_torchrun_stops_both_ranks_at_one_checkpoint(tmp_path: Path, digits: str) -> None:
    ck = tmp_path / "ck"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2"]
    cmd += ["--master-addr", "127.0.0.1", "--master-port", str(_free_port()), "-m", "kiln_trainer"]
    cmd += [*COMMON, "--dataset-uri", digits, "--max-steps", "1000000", "--checkpoint-uri", f"file://{ck}"]
    cmd += ["--extra", "progressIntervalSeconds=0"]
    p = subprocess.Popen(cmd, env=trainer_env(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:

        def stepping() -> bool:
            path = ck / "progress.json"
            return p.poll() is not None or (path.exists() and json.loads(path.read_text())["step"] >= 5)

        wait_for(stepping, what="training to reach step 5", timeout=90)
        p.send_signal(signal.SIGTERM)  # the kubelet signals the container's torchrun, which forwards it
        # torchrun exits with its own code (1), not the workers': the termination message carries the class.
        assert p.wait(timeout=60) == 1
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    message = json.loads((tmp_path / "termination-log").read_text())
    assert message["reason"] == "Preemption", message
    assert message["exitCode"] == ExitCode.PREEMPTED
    # Both ranks stopped after the same step: exactly one final checkpoint, at the step in the message.
    assert [d.name for d in ck.glob("step-*")] == [f"step-{message['step']:08d}"]
    ka.load(message["lastCheckpoint"]["uri"])
