"""The digit classifier that scores generated images: ``DigitClassifier`` and ``load_classifier``.

Input: (N, 3, 32, 32) images in [-1, 1] (white digit on black, as ``reference.data`` makes them; pipeline
output in [0, 1] must be mapped with ``x * 2 - 1``). ``forward`` gives 10 digit logits; ``features`` gives
the 64-d penultimate features (after ReLU) used for the Frechet distance.

    from reference.classifier import load_classifier
    clf = load_classifier()                      # reference_models/digit_classifier/
    digits = clf(images).argmax(-1)
"""
from __future__ import annotations

import json
import os

import torch
from torch import nn

DEFAULT_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "reference_models", "digit_classifier")


def _conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU())


class DigitClassifier(nn.Module):
    """A small CNN: 32x32 -> [conv32, pool] -> [conv64 x2, pool] -> [conv128, pool] -> fc(64) -> fc(10)."""

    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        w = width
        self.body = nn.Sequential(
            _conv(3, w), nn.MaxPool2d(2),                            # 16x16
            _conv(w, 2 * w), _conv(2 * w, 2 * w), nn.MaxPool2d(2),   # 8x8
            _conv(2 * w, 4 * w), nn.MaxPool2d(2),                    # 4x4
            nn.Flatten(), nn.Dropout(0.2), nn.Linear(4 * w * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)
        self.config = dict(width=width, feature_dim=feature_dim, num_classes=num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate (64-d, post-ReLU) features of images in [-1, 1]."""
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Digit logits (N, 10) of images (N, 3, 32, 32) in [-1, 1]."""
        return self.head(self.body(x))


def save_classifier(model: DigitClassifier, path: str, extra: dict | None = None) -> None:
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**model.config, "input": "(N,3,32,32) in [-1,1]", **(extra or {})}, f, indent=2)


def load_classifier(path: str = DEFAULT_PATH) -> DigitClassifier:
    """Load the shipped classifier (eval mode, no grad)."""
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        cfg = json.load(f)
    model = DigitClassifier(cfg["width"], cfg["feature_dim"], cfg["num_classes"])
    model.load_state_dict(load_file(os.path.join(path, "model.safetensors")))
    return model.eval().requires_grad_(False)
