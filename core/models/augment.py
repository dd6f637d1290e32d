"""Data augmentation of image batches in [-1, 1], drawn from an explicit generator so that a run is the same
for the same seed and a resumed run replays it: horizontal flips, small translations (the edge pixels
repeated into the gap) and colour jitter (brightness, contrast, saturation). Small datasets need it in every
stage that sees images (DiffAugment and FastGAN show how much it helps generators trained on a few hundred
images)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def uniform(count: int, spread: float, generator: torch.Generator) -> torch.Tensor:
    """`count` numbers uniform in [-spread, spread], shaped to scale a batch of images."""
    return ((torch.rand(count, generator=generator) * 2 - 1) * spread).view(-1, 1, 1, 1)


def translate(images: torch.Tensor, shift: int, generator: torch.Generator) -> torch.Tensor:
    """Each image moved by up to `shift` pixels along each axis."""
    n, _, h, w = images.shape
    offsets = torch.randint(0, 2 * shift + 1, (n, 2), generator=generator)
    padded = F.pad(images, (shift, shift, shift, shift), mode="replicate")
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets.tolist())])


def jitter_colour(images: torch.Tensor, spread: float, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and (for colour images) saturation, each scaled by up to `spread`."""
    n = len(images)
    images = images + uniform(n, spread, generator)
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * (1 + uniform(n, spread, generator)) + mean
    if images.shape[1] == 3:
        grey = images.mean(dim=1, keepdim=True)
        images = (images - grey) * (1 + uniform(n, spread, generator)) + grey
    return images.clamp(-1, 1)


def augment(images: torch.Tensor, generator: torch.Generator, *, flip: bool, shift: int,
            jitter: float) -> torch.Tensor:
    """A batch (N, C, H, W) augmented; the identity when every setting is off."""
    device = images.device
    images = images.cpu()
    if flip:
        flipped = torch.rand(len(images), generator=generator) < 0.5
        images = torch.where(flipped.view(-1, 1, 1, 1), images.flip(-1), images)
    if shift > 0:
        images = translate(images, shift, generator)
    if jitter > 0:
        images = jitter_colour(images, jitter, generator)
    return images.to(device)


def augmentation_generator(seed: int, *keys: int) -> torch.Generator:
    """A generator for one batch or one image copy, from the run's seed and the batch's (or copy's) keys."""
    value = seed
    for key in keys:
        value = value * 1_000_003 + key
    return torch.Generator().manual_seed(value % (2 ** 63))


# ---------------------------------------------------------------- how much augmentation a run gets

def passes_over(training_images: int, max_steps: int, max_epoch: int, batch_size: int) -> float:
    """How many times a run sees its training images."""
    passes = float(max_epoch)
    if max_steps and training_images:
        passes = min(passes, max_steps * min(batch_size, training_images) / training_images)
    return passes


def copies_for(asked: int | str, training_images: int, augments: bool, target: int = 8000, most: int = 8) -> int:
    """The copies to make: a number as asked, or "auto": enough for about `target` training maps, at most
    `most`, and none when the autoencoder's config augments nothing (its copies would be the originals)."""
    if asked != "auto":
        return int(asked)
    if not augments or training_images == 0:
        return 0
    return max(0, min(most, math.ceil(target / training_images) - 1))
