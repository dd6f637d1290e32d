"""Weight sharing and int8 quantization (seed 000, after Deep Compression): a weight tensor's values are
grouped into N clusters sharing their centroid, then the centroids are quantized to int8, each phase
trainable with the sharing kept (a parametrization of the module's weight)."""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from core.models.clustering import kmeans_1d


def int8_scale(centroids: torch.Tensor) -> torch.Tensor:
    return centroids.detach().abs().max().clamp_min(1e-12) / 127


def quantize_int8(centroids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 codes and the scale that maps them back: |codes * scale - centroids| <= scale / 2."""
    scale = int8_scale(centroids)
    return torch.round(centroids.detach() / scale).clamp(-127, 127).to(torch.int8), scale


def fake_quantize(centroids: torch.Tensor) -> torch.Tensor:
    """The int8 round trip in the forward pass, the identity in the backward (straight-through)."""
    scale = int8_scale(centroids)
    rounded = torch.round(centroids / scale).clamp(-127, 127) * scale
    return centroids + (rounded - centroids).detach()


def row_shape(weight_shape: torch.Size, per_channel: bool) -> tuple[int, ...]:
    """Shape of a tensor's scale, broadcastable against it: one per output channel (dim 0) or one."""
    if per_channel and len(weight_shape) > 1:
        return (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
    return (1,) * max(1, len(weight_shape))


class SharedWeight(nn.Module):
    """A weight computed as row_scale * centroids[indices] (a parametrization: it replaces the module's
    own weight). Only the centroids and row scales train; the assignments stay fixed, so the weight
    keeps at most N distinct values (per output channel with per-channel scales)."""

    def __init__(self, indices: torch.Tensor, centroids: torch.Tensor, row_scale: torch.Tensor):
        super().__init__()
        self.register_buffer("indices", indices.to(torch.uint8))  # at most 256 clusters
        self.centroids = nn.Parameter(centroids.float())
        self.row_scale = nn.Parameter(row_scale.float())
        self.quantize = False  # set for the second phase

    def forward(self, original: torch.Tensor | None = None) -> torch.Tensor:  # the original is not used
        values = fake_quantize(self.centroids) if self.quantize else self.centroids
        return values[self.indices.long()] * self.row_scale

    def codes(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indices, int8 centroids, float scale per row) such that the weight is centroids[indices] * scale."""
        q, scale = quantize_int8(self.centroids)
        return self.indices.long().cpu(), q.cpu(), (self.row_scale.detach() * scale).float().flatten().cpu()


def cluster_weight(weight: torch.Tensor, *, clusters: int, per_channel: bool, init: str, iters: int,
                   generator: torch.Generator) -> SharedWeight:
    weight = weight.detach().float().cpu()
    shape = row_shape(weight.shape, per_channel)
    row_scale = weight.abs().amax(dim=tuple(range(1, weight.dim())), keepdim=True).clamp_min(1e-12) \
        if per_channel and weight.dim() > 1 else torch.ones(shape)
    centroids, indices = kmeans_1d(weight / row_scale, clusters, init, iters, generator)
    return SharedWeight(indices.view(weight.shape), centroids, row_scale.view(shape))


def share_weights(model: nn.Module, names: list[str], *, clusters: int, per_channel: bool, init: str, iters: int,
                  seed: int) -> dict[str, SharedWeight]:
    """Replace each named weight by a SharedWeight clustered from it, in place."""
    generator = torch.Generator().manual_seed(seed)
    shared = {}
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        weight = getattr(module, attr)
        shared[name] = cluster_weight(weight, clusters=clusters, per_channel=per_channel, init=init, iters=iters,
                                      generator=generator).to(weight.device)
        parametrize.register_parametrization(module, attr, shared[name], unsafe=True)
        getattr(module.parametrizations, attr).original.requires_grad_(False)
    return shared


def set_quantize(shared: dict[str, SharedWeight], on: bool) -> None:
    for weight in shared.values():
        weight.quantize = on


def plain_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under their ordinary names, leaving out the parametrized ones."""
    return {name: t for name, t in model.state_dict().items() if ".parametrizations." not in name}
