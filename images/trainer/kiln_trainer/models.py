"""The models the trainer builds: a small CNN from scratch for images (KilnCNN, kiln_artifacts.models, which the
compressor reads too), a transformers encoder for text.

Both are wrapped so that ``model(**batch)`` returns logits, which keeps the loop and DDP task-agnostic.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln_artifacts.models import KilnCNN


class TextClassifier(nn.Module):
    """A transformers sequence-classification model returning plain logits."""

    def __init__(self, hf_model: nn.Module) -> None:
        super().__init__()
        self.hf = hf_model

    def forward(self, **inputs: torch.Tensor) -> torch.Tensor:
        return self.hf(**inputs).logits


def image_batch(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """uint8 [n, h, w] -> normalised float [n, 1, h, w] (done per batch: the data set stays uint8 in memory)."""
    return {"pixel_values": images.unsqueeze(1).float().div_(127.5).sub_(1.0)}


def build_text_model(base: Path, classes: list[str]) -> TextClassifier:
    from transformers import AutoModelForSequenceClassification

    hf = AutoModelForSequenceClassification.from_pretrained(
        str(base),
        num_labels=len(classes),
        id2label=dict(enumerate(classes)),
        label2id={c: i for i, c in enumerate(classes)},
        local_files_only=True,
    )
    return TextClassifier(hf)


def load_tokenizer(base: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(base), local_files_only=True)


def tokenize(tok: Any, texts: list[str], max_length: int) -> dict[str, torch.Tensor]:
    enc = tok(texts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
    return {k: v for k, v in enc.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def save_model(model: nn.Module, folder: Path, classes: list[str], base: Path | None) -> str:
    """Write the trained model into ``folder``; returns the artifact format."""
    folder.mkdir(parents=True, exist_ok=True)
    if isinstance(model, KilnCNN):
        from safetensors.torch import save_file

        save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps({**model.config, "classes": classes}, indent=2) + "\n")
        return "safetensors"
    assert isinstance(model, TextClassifier)
    model.hf.save_pretrained(str(folder))
    if base is not None:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(str(base), local_files_only=True).save_pretrained(str(folder))
    return "hf-transformers"


def state_summary(model: nn.Module) -> dict[str, Any]:
    return {"parameters": sum(p.numel() for p in model.parameters())}
