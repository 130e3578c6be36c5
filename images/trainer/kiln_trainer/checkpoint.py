"""Checkpoints as kiln artifacts: ``<checkpoint.uri>/step-<8 digits>/state.pt`` plus its kiln-manifest.json.

kiln_artifacts.publish makes each one atomic (staging folder + rename locally, manifest-last on S3), so a
checkpoint exists only when complete; resume takes the highest step among complete ones.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

import kiln_artifacts as ka
from kiln_artifacts.contract import InfrastructureError

log = logging.getLogger("kiln_trainer")
NAME = re.compile(r"step-(\d{8,})$")
STATE_FILE = "state.pt"


@dataclass(frozen=True)
class Checkpoint:
    step: int
    uri: str


def name_for(step: int) -> str:
    return f"step-{step:08d}"


def list_checkpoints(base: str) -> list[Checkpoint]:
    """Complete checkpoints directly under ``base``, lowest step first."""
    try:
        found = ka.list_artifacts(base)
    except ka.ArtifactNotFoundError:
        return []
    except (ka.CredentialsError, OSError) as e:
        raise InfrastructureError(f"checkpoint.uri {base}: storage unreachable: {type(e).__name__}: {e}") from None
    out = []
    prefix = base.rstrip("/") + "/"
    for info in found:
        rel = info.uri[len(prefix) :] if info.uri.startswith(prefix) else ""
        m = NAME.fullmatch(rel)
        if m and info.manifest.kind == "checkpoint":
            out.append(Checkpoint(int(m.group(1)), info.uri))
    return sorted(out, key=lambda c: c.step)


def load_state(ckpt: Checkpoint) -> dict[str, Any]:
    art = ka.load(ckpt.uri)  # full verification: a damaged checkpoint fails here, not halfway through training
    return torch.load(art.path(STATE_FILE), map_location="cpu", weights_only=False)


def save(base: str, step: int, state: dict[str, Any], keep: int, hyperparameters: dict[str, Any]) -> Checkpoint:
    """Publish the checkpoint of ``step``, then delete all but the newest ``keep``."""
    uri = f"{base.rstrip('/')}/{name_for(step)}"
    tmp = Path(tempfile.mkdtemp(prefix="kiln-ckpt-"))
    try:
        torch.save(state, tmp / STATE_FILE)
        try:
            ka.publish(
                tmp,
                uri,
                kind="checkpoint",
                format="pytorch",
                metrics={"step": float(step)},
                lineage=ka.Lineage(hyperparameters=hyperparameters),
            )
        except ka.ArtifactExistsError:
            # Same step already checkpointed (a resumed run repeating it): the existing one is complete.
            log.warning("checkpoint %s exists with other bytes; keeping the existing one", uri)
    except (ka.CredentialsError, OSError) as e:
        raise InfrastructureError(f"checkpoint.uri {base}: cannot write: {type(e).__name__}: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in list_checkpoints(base)[:-keep]:
        ka.delete(old.uri)
    return Checkpoint(step, uri)
