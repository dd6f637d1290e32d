"""The small CNN classifier of the quality report; its penultimate activations are the feature space."""
from __future__ import annotations

import torch
import torch.nn as nn


class FeatureClassifier(nn.Module):
    """A small CNN; its penultimate activations are the feature space."""

    def __init__(self, channels: int, num_classes: int, width: int = 16, features: int = 128):
        super().__init__()

        def block(cin: int, cout: int, pool: nn.Module) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(), pool]
        # the last pooling is adaptive, so that any image size gives 4x4 maps
        self.body = nn.Sequential(*block(channels, width, nn.MaxPool2d(2)), *block(width, 2 * width, nn.MaxPool2d(2)),
                                  *block(2 * width, 4 * width, nn.AdaptiveMaxPool2d(4)),
                                  nn.Flatten(), nn.Linear(64 * width, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))
