"""The model architectures Kiln defines itself (the trainer builds and trains them, the compressor exports them).

Needs torch (the trainer and compressor extras): the operator never imports this module.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


class KilnCNN(nn.Module):
    """Two conv blocks and an MLP head; adaptive pooling makes it work for 8x8 digits and 28x28 Fashion-MNIST."""

    def __init__(self, num_classes: int, in_channels: int = 1, width: int = 32) -> None:
        super().__init__()
        self.config = {
            "architecture": "KilnCNN",
            "num_classes": num_classes,
            "in_channels": in_channels,
            "width": width,
        }
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * 16, 128), nn.ReLU(), nn.Linear(128, num_classes))

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixel_values))


def build_image_model(num_classes: int, base: Path | None) -> KilnCNN:
    """A fresh KilnCNN, or the one saved in ``base`` (config.json + model.safetensors) with a head for
    ``num_classes``."""
    if base is None:
        return KilnCNN(num_classes)
    from safetensors.torch import load_file

    config = json.loads((base / "config.json").read_text())
    model = KilnCNN(int(config["num_classes"]), int(config.get("in_channels", 1)), int(config.get("width", 32)))
    model.load_state_dict(load_file(str(base / "model.safetensors")))
    if model.config["num_classes"] != num_classes:
        model.head[-1] = nn.Linear(128, num_classes)  # a new head for a data set with other classes
        model.config["num_classes"] = num_classes
    return model
