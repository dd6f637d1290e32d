"""The small CNN classifier of the quality report (its penultimate activations are the feature space), and
the augmentation of the downstream classifiers: small translations and horizontal flips."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class FeatureClassifier(nn.Module):
    """A small CNN; its penultimate activations are the feature space."""

    def __init__(self, channels: int, num_classes: int, width: int = 16, features: int = 128):
        super().__init__()

        def block(cin: int, cout: int, pool: nn.Module) -> list[nn.Module]:
            # max pooling and ReLU commute (both keep the order of values), so pooling first gives the same
            # outputs and gradients with the ReLU on a quarter of the values
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), pool, nn.ReLU()]
        # the last pooling is adaptive, so that any image size gives 4x4 maps
        self.body = nn.Sequential(*block(channels, width, nn.MaxPool2d(2)), *block(width, 2 * width, nn.MaxPool2d(2)),
                                  *block(2 * width, 4 * width, nn.AdaptiveMaxPool2d(4)),
                                  nn.Flatten(), nn.Linear(64 * width, features), nn.ReLU())
        self.head = nn.Linear(features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def shift_and_flip(images: torch.Tensor, shift: int, flip: bool, generator: torch.Generator) -> torch.Tensor:
    """Each image (N, C, H, W) moved by up to `shift` pixels each way (its border repeated into the gap) and,
    with `flip`, mirrored left-right with probability 1/2."""
    n, c, h, w = images.shape
    if shift > 0:
        padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
        dy, dx = (torch.randint(0, 2 * shift + 1, (n, 1), generator=generator) for _ in range(2))
        rows = (dy + torch.arange(h)).to(images.device)  # (N, H): the rows each image keeps
        cols = (dx + torch.arange(w)).to(images.device)
        # one gather over each padded plane, flattened: a quarter of the time of indexing by rows and columns
        kept = (rows[:, :, None] * (w + 2 * shift) + cols[:, None, :]).flatten(1)  # (N, H * W)
        images = padded.flatten(2).gather(2, kept[:, None, :].expand(n, c, h * w)).view(n, c, h, w)
    if flip:
        mirrored = (torch.rand(n, generator=generator) < 0.5).to(images.device)
        images = torch.where(mirrored[:, None, None, None], images.flip(-1), images)
    return images
