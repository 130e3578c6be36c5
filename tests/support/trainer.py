"""Helpers for the trainer tests: the packaged digits as a dataset artifact, and running the trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def trainer_env(tmp: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        KILN_TERMINATION_LOG=str(tmp / "termination-log"),
        OMP_NUM_THREADS="1",  # two cores: keep concurrent processes from oversubscribing them
        HF_HUB_OFFLINE="1",
    )
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "KILN_TRAINING_SPEC"):
        env.pop(name, None)
    return env


def train_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "kiln_trainer", *args]


def run_trainer(tmp: Path, *args: str, timeout: float = 120) -> tuple[int, dict[str, Any], str]:
    """Run the trainer to the end: (exit code, termination message, output)."""
    log = tmp / "termination-log"
    log.unlink(missing_ok=True)
    p = subprocess.run(train_cmd(*args), env=trainer_env(tmp), capture_output=True, text=True, timeout=timeout)
    message = json.loads(log.read_text()) if log.exists() else {}
    return p.returncode, message, p.stdout + p.stderr


def load_weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


TEXT_SIGNALS = {"prediction", "confidence", "tokens", "unknown_tokens"}
GRAY_SIGNALS = {"prediction", "confidence", "channel0_mean", "channel0_std"}


def published_profile(uri: str, task: str, samples: int, signals: set[str]) -> Any:
    """The reference profile of a published model artifact (trainer or compressor), after the checks every one
    must pass: listed in the manifest (so covered by the digest) and verified with it, named by the annotation,
    valid, one count per evaluation sample in every signal, kilobytes."""
    import kiln_artifacts as ka
    from kiln_artifacts import profile

    art = ka.load(uri, verify="full")
    assert profile.PROFILE_FILE in art.files
    assert art.manifest.annotations[profile.PROFILE_ANNOTATION] == profile.PROFILE_FILE
    path = art.path(profile.PROFILE_FILE)
    assert path.stat().st_size < 16_000
    prof = profile.Profile.from_json(json.loads(path.read_text()))
    assert (prof.task, prof.samples) == (task, samples)
    assert set(prof.signals) == signals
    for name, signal in prof.signals.items():
        assert sum(signal.counts) == samples, name
    conf = prof.signals["confidence"]
    assert 1 / len(prof.signals["prediction"].labels) - 1e-9 <= conf.min <= conf.max <= 1 + 1e-9
    assert prof.source["from"] == "evaluation"
    assert prof.source["dataset"] == art.manifest.lineage.dataset.uri
    assert prof.source["datasetDigest"] == art.manifest.lineage.dataset.revision
    return prof
