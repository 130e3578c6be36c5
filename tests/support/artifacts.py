"""Helpers of the kiln_artifacts tests: a small model-like folder and what a store holds. The store fixtures
(s3_server, s3_bucket, store, cache) are in tests/unit/conftest.py."""

from __future__ import annotations

import random
from pathlib import Path


def make_model(folder: Path, seed: int = 0, big: int = 300_000) -> Path:
    """A small model-like folder: a config, a nested tokenizer file and a weights file."""
    rng = random.Random(seed)
    (folder / "tokenizer").mkdir(parents=True)
    (folder / "config.json").write_text(f'{{"model_type": "bert", "seed": {seed}}}\n')
    (folder / "tokenizer" / "vocab.txt").write_text("\n".join(f"tok{i}" for i in range(200)))
    (folder / "model.safetensors").write_bytes(rng.randbytes(big))
    return folder


def local_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def s3_keys(uri: str) -> set[str]:
    from kiln_artifacts.storage import resolve

    loc = resolve(uri)
    try:
        return {k[len(loc.path) + 1 :] for k in loc.fs.find(loc.path + "/")}
    except FileNotFoundError:
        return set()
