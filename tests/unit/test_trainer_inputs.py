"""Bad inputs fail fast, with a message naming the input and the rule, and the user-error exit code."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import kiln_artifacts as ka

pytest.importorskip("torch")

from kiln_artifacts import samples
from kiln_artifacts.contract import ExitCode, UserError
from kiln_trainer.config import parse_config
from kiln_trainer.loop import main


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> str:
    dest = tmp_path_factory.mktemp("data") / "digits"
    samples.publish_dataset("digits", f"file://{dest}")
    return f"file://{dest}"


def run(tmp_path: Path, *args: str) -> tuple[int, dict]:
    log = tmp_path / "term"
    code = main([*args, "--termination-log", str(log)])
    return code, json.loads(log.read_text())


def idx_folder(folder: Path, labels: bytes, fmt: str = "idx") -> str:
    folder.mkdir(parents=True)
    samples.write_idx(folder / "train-images-idx3-ubyte.gz", (len(labels), 8, 8), bytes(64 * len(labels)))
    samples.write_idx(folder / "train-labels-idx1-ubyte.gz", (len(labels),), labels)
    (folder / "dataset.json").write_text(json.dumps({"format": fmt, "classes": ["a", "b", "c"]}))
    return f"file://{folder}"


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda tmp, d: ["--dataset-uri", f"file://{tmp}/missing"], "dataset.uri file://{tmp}/missing: not found"),
        (lambda tmp, d: ["--dataset-uri", idx_folder(tmp / "csv", b"\0\1", fmt="csv")], "format 'csv' is not one of"),
        (
            lambda tmp, d: ["--dataset-uri", idx_folder(tmp / "l", b"\0\1\7")],
            "train label 7 at index 2 is out of range 0..2",
        ),
        (
            lambda tmp, d: ["--dataset-uri", d, "--model-uri", f"file://{tmp}"],
            "model.uri file://{tmp}: not a model directory (no config.json)",
        ),
        (
            lambda tmp, d: ["--dataset-uri", d, "--batch-size", "2000"],
            "hyperparameters.batchSize: batchSize x WORLD_SIZE",
        ),
        (lambda tmp, d: ["--dataset-uri", d, "--epochs", "1", "--max-steps", "3"], "set epochs or maxSteps, not both"),
        (lambda tmp, d: ["--dataset-uri", d, "--precision", "fp8"], "hyperparameters.precision: must be one of"),
        (lambda tmp, d: ["--dataset-uri", d, "--learning-rate", "0"], "hyperparameters.learningRate: must be a number"),
        (lambda tmp, d: ["--dataset-uri", d, "--extra", "warmup=3"], "hyperparameters.extra: unknown key(s) warmup"),
        (lambda tmp, d: ["--dataset-uri", d, "--extra", "task=text-classification"], "holds image-classification"),
        (lambda tmp, d: ["--dataset-uri", "http://x/y"], "dataset.uri"),
        (
            lambda tmp, d: ["--dataset-uri", d, "--output-uri", "hf://org/name"],
            "output.uri: hf://org/name: must be writable",
        ),
    ],
    ids=[
        "missing",
        "format",
        "labels",
        "not-a-model",
        "batch",
        "epochs+steps",
        "precision",
        "lr",
        "extra",
        "task",
        "uri",
        "read-only-output",
    ],
)
def test_bad_input_is_a_user_error(tmp_path: Path, digits: str, make, expected: str) -> None:
    code, message = run(tmp_path, *make(tmp_path, digits))
    assert code == ExitCode.USER_ERROR
    assert message["reason"] == "UserError"
    assert expected.format(tmp=tmp_path) in message["message"]


def test_spec_from_env_uses_the_trainingjob_names() -> None:
    spec = {
        "dataset": {"uri": "pvc://data/digits"},
        "output": {"uri": "s3://models/run-1"},
        "hyperparameters": {"learningRate": 0.01, "maxSteps": 7, "batchSize": 8, "precision": "fp16", "seed": 0},
        "checkpoint": {"uri": "pvc://ckpt/run-1", "everySteps": 5, "everyMinutes": 2, "keep": 1},
        "resume": {"policy": "Never"},
    }
    cfg = parse_config(["--batch-size", "4"], {"KILN_TRAINING_SPEC": json.dumps(spec)})
    assert (cfg.dataset_uri, cfg.output_uri, cfg.checkpoint_uri) == (
        "pvc://data/digits",
        "s3://models/run-1",
        "pvc://ckpt/run-1",
    )
    assert cfg.learning_rate == 0.01
    assert cfg.max_steps == 7
    assert cfg.epochs is None
    assert cfg.batch_size == 4  # a flag overrides the spec
    assert cfg.seed == 0
    assert cfg.precision == "fp16"
    assert cfg.resume == "Never"
    assert (cfg.checkpoint_every_steps, cfg.checkpoint_every_minutes, cfg.checkpoint_keep) == (5, 2.0, 1)
    with pytest.raises(UserError, match=r"training spec: unknown field\(s\) hyperparams"):
        parse_config([], {"KILN_TRAINING_SPEC": json.dumps({"dataset": {"uri": "file:///d"}, "hyperparams": {}})})
    with pytest.raises(UserError, match=r"dataset.uri: is required"):
        parse_config([], {})


def test_failure_classes() -> None:
    import torch

    from kiln_trainer.loop import classify

    assert classify(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")) == ExitCode.OUT_OF_MEMORY
    assert classify(MemoryError()) == ExitCode.OUT_OF_MEMORY
    assert classify(torch.distributed.DistNetworkError("peer closed")) == ExitCode.INFRASTRUCTURE
    assert classify(ValueError("a bug")) == ExitCode.UNKNOWN


def test_pet_variables_map_to_env_rendezvous() -> None:
    from kiln_trainer.loop import dist_from_env, map_pet_env

    env = {"PET_NNODES": "3", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "job-0.job", "PET_MASTER_PORT": "29500"}
    map_pet_env(env)
    d = dist_from_env(env)
    assert (d.rank, d.world, d.local_rank) == (2, 3, 0)
    assert (env["MASTER_ADDR"], env["MASTER_PORT"]) == ("job-0.job", "29500")
    with pytest.raises(UserError, match="PET_NPROC_PER_NODE > 1 needs torchrun"):
        map_pet_env({"PET_NNODES": "2", "PET_NPROC_PER_NODE": "8"})
    with pytest.raises(UserError, match="MASTER_ADDR and MASTER_PORT: required when WORLD_SIZE > 1"):
        dist_from_env({"WORLD_SIZE": "2", "RANK": "1"})
    with pytest.raises(UserError, match=r"RANK: must be in 0\.\.WORLD_SIZE-1"):
        dist_from_env({"WORLD_SIZE": "2", "RANK": "2", "MASTER_ADDR": "a", "MASTER_PORT": "1"})


def test_rendezvous_failure_is_an_infrastructure_error(tmp_path: Path, digits: str, monkeypatch) -> None:
    import socket

    with socket.socket() as s:  # a port nobody listens on: rank 1 never reaches rank 0's store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for k, v in {**env, "KILN_DIST_TIMEOUT_SECONDS": "3"}.items():
        monkeypatch.setenv(k, v)
    code, message = run(tmp_path, "--dataset-uri", digits, "--max-steps", "1")
    assert code == ExitCode.INFRASTRUCTURE
    assert message["reason"] == "Infrastructure"
    assert message["message"].startswith(f"rendezvous with 127.0.0.1:{port} failed")


def test_dockerfile_matches_the_program() -> None:
    # No Docker engine here to build it: check what the image relies on instead.
    repo = Path(__file__).resolve().parents[2]
    text = (repo / "images/trainer/Dockerfile").read_text()
    assert 'pip install --no-cache-dir ".[trainer]"' in text
    assert 'ENTRYPOINT ["python", "-m", "kiln_trainer"]' in text
    assert (repo / "images/trainer/kiln_trainer/__main__.py").is_file()
    assert "COPY images/trainer/kiln_trainer ./images/trainer/kiln_trainer" in text
    users = [line.split()[1] for line in text.splitlines() if line.startswith("USER ")]
    assert users == ["65532:65532"]  # non-root in the final stage


def test_an_input_published_while_the_trainer_waits_is_used(tmp_path: Path, digits: str) -> None:
    """A pipeline applied at once: the dataset step publishes while the trainer already runs. The trainer waits (up
    to inputWaitSeconds) and trains on it; without the wait, or past it, the absent input is a user error."""
    import threading

    from kiln_artifacts import datasets as data

    late = f"file://{tmp_path}/late"
    publisher = threading.Timer(1.0, samples.publish_dataset, ("digits", late))
    publisher.start()
    try:
        dataset = data.load_dataset(late, None, wait_seconds=60)
    finally:
        publisher.join()
    assert dataset.source.digest == ka.load(digits).digest
    with pytest.raises(UserError, match=r"not found after waiting 0\.3 s"):
        data.load_dataset(f"file://{tmp_path}/never", None, wait_seconds=0.3)
    code, message = run(tmp_path, "--dataset-uri", f"file://{tmp_path}/never", "--extra", "inputWaitSeconds=x")
    assert code == ExitCode.USER_ERROR
    assert "inputWaitSeconds" in message["message"]


def test_the_step_is_reported_even_when_checkpoints_come_more_often_than_reports(tmp_path: Path) -> None:
    from support.waiting import wait_for

    from kiln_trainer.report import ProgressReporter

    path = tmp_path / "progress.json"
    reporter = ProgressReporter(path, 100, interval=0.2)
    reporter.update(force=True, step=0)
    assert reporter.due()  # the first periodic report goes out at the first step
    reporter.update(step=1)
    assert json.loads(path.read_text())["step"] == 1
    assert not reporter.due()

    def checkpointing() -> bool:  # a checkpoint write at every step, far more often than the interval
        reporter.update(force=True, lastCheckpoint={"step": 2, "uri": "file:///ck/step-2"})
        return reporter.due()

    wait_for(checkpointing, what="the periodic report due despite the checkpoint writes", timeout=10, interval=0.01)
    reporter.update(step=50)
    written = json.loads(path.read_text())
    assert (written["step"], written["lastCheckpoint"]["step"]) == (50, 2)
