"""The base model by URI: a folder to fine-tune, checked before training (the data set: kiln_artifacts.datasets)."""

from __future__ import annotations

import json
from typing import Any

from kiln_artifacts.contract import UserError
from kiln_artifacts.datasets import Source, resolve


def check_model_dir(uri: str, task: str, wait_seconds: float = 0) -> tuple[Source, dict[str, Any]]:
    """The base model: a folder with config.json and weights (transformers, or a Kiln CNN for images)."""
    src = resolve(uri, "model.uri", wait_seconds)
    try:
        config = json.loads((src.path / "config.json").read_text())
    except FileNotFoundError:
        raise UserError(f"model.uri {uri}: not a model directory (no config.json)") from None
    except ValueError as e:
        raise UserError(f"model.uri {uri}: config.json is not valid JSON: {e}") from None
    weights = ("model.safetensors", "pytorch_model.bin")
    if not any((src.path / w).is_file() for w in weights):
        raise UserError(f"model.uri {uri}: not a model directory (no {' or '.join(weights)})")
    if task == "text-classification":
        if "model_type" not in config:
            raise UserError(f"model.uri {uri}: config.json has no model_type (not a transformers model)")
        if not (src.path / "tokenizer.json").is_file() and not (src.path / "vocab.txt").is_file():
            raise UserError(f"model.uri {uri}: no tokenizer (tokenizer.json or vocab.txt)")
    elif config.get("architecture") != "KilnCNN":
        raise UserError(f"model.uri {uri}: image-classification fine-tunes a KilnCNN model, got {config!r:.80}")
    return src, config
