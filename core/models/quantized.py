"""Weight sharing and int8 quantization (seed 000, after Deep Compression): a weight tensor's values are
grouped into N clusters sharing their centroid, then the centroids are quantized to int8, each phase
trainable with the sharing kept (a parametrization of the module's weight)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
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


# ---------------------------------------------------------------- int8 execution of a compressed model

class Int8Linear(nn.Module):
    """A linear layer whose weight stays int8 in memory, with a float scale per output row (or one for the
    whole tensor): y = x @ (int8 * scale)ᵀ + bias. The weight is widened for each call, since no int8
    kernel beats float32 on a CPU without VNNI (bench/int8.py); widened first, the outputs are exactly
    those of the float model that the artifact decodes to, and of the export's DequantizeLinear + Gemm."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
        super().__init__()
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("weight_scale", scale.float().flatten())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype)[:, None]
        return F.linear(x, weight, None if self.bias is None else self.bias.to(x.dtype))


class Int8Embedding(nn.Module):
    """An embedding table kept in int8, with a float scale per row (or one): rows scaled as looked up."""

    def __init__(self, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("weight_scale", scale.float().flatten())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        scale = self.weight_scale[ids] if len(self.weight_scale) > 1 else self.weight_scale
        return self.weight[ids].float() * scale[..., None]


class Int8Conv2d(nn.Module):
    """A convolution whose weight stays int8 in memory (a float scale per output channel, or one); it is
    widened to float for each call, since PyTorch has no int8 convolution on the CPU outside the
    deprecated torch.ao path."""

    def __init__(self, conv: nn.Conv2d, weight: torch.Tensor, scale: torch.Tensor):
        super().__init__()
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.register_buffer("weight", weight.to(torch.int8))
        self.register_buffer("weight_scale", scale.float().flatten())
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to(x.dtype) * self.weight_scale.to(x.dtype).view(-1, 1, 1, 1)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def int8_module(module: nn.Module, weight: torch.Tensor, scale: torch.Tensor) -> nn.Module:
    """The int8 counterpart of a Linear, Embedding or Conv2d, holding `weight` (int8) and `scale`."""
    if isinstance(module, nn.Linear):
        return Int8Linear(weight, scale, module.bias)
    if isinstance(module, nn.Embedding):
        return Int8Embedding(weight, scale)
    if isinstance(module, nn.Conv2d):
        return Int8Conv2d(module, weight, scale)
    raise TypeError(f"no int8 form of {type(module).__name__}")


def use_int8_weights(model: nn.Module, weights: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Replace, in place, each module whose `weight` is named in `weights` (name -> (int8 weight, scale))
    by its int8 counterpart. The modules' other tensors (biases) are kept as they are."""
    for name, (weight, scale) in weights.items():
        module_name, _, attr = name.rpartition(".")
        if attr != "weight":
            raise TypeError(f"{name}: only a module's weight runs in int8")
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child, int8_module(parent.get_submodule(child), weight, scale))
