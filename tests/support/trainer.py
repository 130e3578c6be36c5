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
