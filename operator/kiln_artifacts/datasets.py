"""Data sets by URI, in the formats the workloads read: checked and loaded into memory.

Data sets are kiln artifacts (``load`` verifies them); a local folder without a manifest is accepted too, for
hand-made data. Formats, named by ``format`` in ``dataset.json``:

- ``idx`` (image-classification): the MNIST layout of ``kiln_artifacts.samples``.
- ``jsonl`` (text-classification): ``train.jsonl`` / ``test.jsonl``, one ``{"text": str, "label": int}`` a line.

Errors name the input as the TrainingJob does (``dataset.uri``); the numpy arrays need numpy (the workload extras).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import samples
from .contract import InfrastructureError, UserError
from .errors import (
    ArtifactError,
    ArtifactNotFoundError,
    CredentialsError,
    IntegrityError,
    InvalidManifestError,
    InvalidURIError,
)
from .load import load
from .uri import parse_uri

log = logging.getLogger(__name__)
_INPUT_POLL_SECONDS = 5.0


@dataclass(frozen=True)
class Source:
    """A resolved input: its local folder and, when it is an artifact, its digest."""

    uri: str
    path: Path
    digest: str | None


@dataclass
class Dataset:
    task: str
    classes: list[str]
    train_x: Any  # numpy uint8 [n, h, w] for images; list[str] for text
    train_y: Any  # numpy int64 [n]
    test_x: Any | None
    test_y: Any | None
    source: Source


def resolve(uri: str, field: str, wait_seconds: float = 0) -> Source:
    """Load (and verify) the artifact at ``uri``; a plain local folder is accepted as is. An artifact not published
    yet is waited for up to ``wait_seconds`` (publication is atomic: once its manifest is there, it is complete)."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            art = load(uri)
            return Source(uri, art.root, art.digest)
        except ArtifactNotFoundError as e:
            local = parse_uri(uri).local_path()
            if local is not None and local.is_dir():
                return Source(uri, local, None)
            left = deadline - time.monotonic()
            if left <= 0:
                waited = f" after waiting {wait_seconds:g} s" if wait_seconds else ""
                raise UserError(f"{field} {uri}: not found{waited} ({e})") from None
        except (IntegrityError, InvalidManifestError) as e:
            raise UserError(f"{field} {uri}: {e}") from None
        except InvalidURIError as e:
            raise UserError(f"{field}: {e}") from None
        except (CredentialsError, OSError) as e:
            raise InfrastructureError(f"{field} {uri}: storage unreachable: {type(e).__name__}: {e}") from None
        log.info("waiting for %s %s to be published (%.0f s left)", field, uri, left)
        time.sleep(min(_INPUT_POLL_SECONDS, left))


def load_dataset(uri: str, task: str | None, wait_seconds: float = 0) -> Dataset:
    import numpy as np

    src = resolve(uri, "dataset.uri", wait_seconds)
    info_path = src.path / "dataset.json"
    try:
        info = json.loads(info_path.read_text())
    except FileNotFoundError:
        raise UserError(f"dataset.uri {uri}: no dataset.json (format idx or jsonl, see docs/trainer.md)") from None
    except ValueError as e:
        raise UserError(f"dataset.uri {uri}: dataset.json is not valid JSON: {e}") from None
    fmt = info.get("format")
    classes = info.get("classes")
    if not isinstance(classes, list) or len(classes) < 2:
        raise UserError(f"dataset.uri {uri}: dataset.json 'classes' must list at least 2 classes")
    formats = {"idx": "image-classification", "jsonl": "text-classification"}
    if fmt not in formats:
        raise UserError(f"dataset.uri {uri}: format {fmt!r} is not one of {', '.join(formats)}")
    if task is not None and task != formats[fmt]:
        raise UserError(f"dataset.uri {uri}: format {fmt} holds {formats[fmt]} data, not {task}")
    splits: dict[str, tuple[Any, Any]] = {}
    for split in ("train", "test"):
        if fmt == "idx":
            if not (src.path / samples.IDX_FILES[split][0]).is_file():
                continue
            try:
                x, y = samples.load_idx_dataset(src.path, split)
            except ArtifactError as e:
                raise UserError(f"dataset.uri {uri}: {split} split: {e}") from None
            if x.ndim != 3:
                raise UserError(f"dataset.uri {uri}: {split} images must be [n, height, width], got {x.shape}")
        else:
            path = src.path / f"{split}.jsonl"
            if not path.is_file():
                continue
            x, labels = [], []
            for n, line in enumerate(path.read_text().splitlines(), 1):
                try:
                    row = json.loads(line)
                    text, label = row["text"], row["label"]
                except (ValueError, KeyError, TypeError):
                    raise UserError(f"dataset.uri {uri}: {split}.jsonl line {n}: must be {{text, label}}") from None
                if not isinstance(text, str) or isinstance(label, bool) or not isinstance(label, int):
                    raise UserError(f"dataset.uri {uri}: {split}.jsonl line {n}: text must be a string, label an int")
                x.append(text)
                labels.append(label)
            y = np.asarray(labels, dtype=np.int64)
        if len(y) == 0:
            raise UserError(f"dataset.uri {uri}: {split} split is empty")
        bad = np.flatnonzero((y < 0) | (y >= len(classes)))
        if bad.size:
            raise UserError(
                f"dataset.uri {uri}: {split} label {int(y[bad[0]])} at index {int(bad[0])} is out of range "
                f"0..{len(classes) - 1} ({bad.size} labels out of range)"
            )
        splits[split] = (x, y)
    if "train" not in splits:
        raise UserError(f"dataset.uri {uri}: no train split")
    test = splits.get("test", (None, None))
    return Dataset(formats[fmt], [str(c) for c in classes], *splits["train"], *test, source=src)
