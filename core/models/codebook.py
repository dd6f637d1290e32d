"""Self-organizing-map codebooks over P x P patches of feature maps, and their pruning.

A feature map (C, H, W) is cut into (H/P_h)(W/P_w) patches, each flattened to P_h*P_w*C; the codebook's
units live on a 2-D grid, and a patch's token is the index of its best matching unit (BMU). Training
minimises the neighbourhood-weighted squared distance between patches and units, whose gradient is the
classic SOM update; the neighbourhood radius shrinks by one every neighbourhood_step steps until only
the BMU moves (k-means). Units start from the data (k-means++), and units left unused are moved onto
live patches, so that the codebook is used rather than assumed."""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch
import torch.distributed as dist
import torch.nn as nn

from core.config import option
from core.models.clustering import kmeans_plus_plus


WHOLE_MAP = "map"  # a patch as large as the feature map: one token per image (the condition codebook)


@dataclass
class CodebookConfig:
    """The feature map's shape (image_H/W/C, the seed's names) is taken from the data when left out; a
    patch size of "map" is the whole map."""
    model_lr: float = option(5e-3, low=1e-7, high=10.0)
    image_H: int | None = option(None, low=1, high=4096, doc="feature map height (null: from the data)")
    image_W: int | None = option(None, low=1, high=4096, doc="feature map width (null: from the data)")
    image_C: int | None = option(None, low=1, high=4096, doc="feature map channels (null: from the data)")
    patch_H: int | str = option(8, low=1, high=4096, doc='patch height, or "map" for the whole map')
    patch_W: int | str = option(8, low=1, high=4096, doc='patch width, or "map" for the whole map')
    num_embeddings: int = option(256, low=2, high=16384)
    neighbourhood_step: int = option(200, low=1, high=10**9, doc="steps between shrinks of the radius")
    neighbourhood_radius: float = option(2.0, low=0.0, high=4096.0, doc="starting radius on the unit grid")
    dead_unit_step: int = option(100, low=0, high=10**9, doc="re-seed units unused for N steps (0: never)")
    warmup_steps: int = option(0, low=0, high=10**7)

    def check(self) -> str | None:
        for name in ("patch_H", "patch_W"):
            if isinstance(getattr(self, name), str) and getattr(self, name) != WHOLE_MAP:
                return f"'{name}' is {getattr(self, name)!r}: a number, or \"{WHOLE_MAP}\" for the whole map"
        sizes = (self.image_H, self.image_W, self.patch_H, self.patch_W)
        if all(isinstance(v, int) for v in sizes) and (self.image_H % self.patch_H or self.image_W % self.patch_W):
            return (f"patch {self.patch_H}x{self.patch_W} does not tile the feature map "
                    f"{self.image_H}x{self.image_W}")
        return None

    @property
    def is_resolved(self) -> bool:
        """Every size is a number (a codebook can be built from it)."""
        return all(isinstance(getattr(self, k), int) for k in ("image_H", "image_W", "image_C", "patch_H", "patch_W"))

    def mismatch(self, fmap_shape: tuple[int, int, int]) -> str | None:
        """What, of the sizes given, contradicts feature maps of shape (C, H, W)."""
        given = {k: getattr(self, k) for k in ("image_C", "image_H", "image_W") if getattr(self, k) is not None}
        wrong = [f"{k} {v}" for (k, v), actual in zip(given.items(), fmap_shape) if v != actual]
        return ", ".join(wrong) or None

    def resolved(self, fmap_shape: tuple[int, int, int]) -> "CodebookConfig":
        """This config with the map's sizes filled in from its shape (C, H, W), and "map" patches made
        numbers."""
        channels, height, width = fmap_shape
        return replace(self, image_C=channels, image_H=height, image_W=width,
                       patch_H=height if self.patch_H == WHOLE_MAP else self.patch_H,
                       patch_W=width if self.patch_W == WHOLE_MAP else self.patch_W)

    @property
    def fmap_shape(self) -> tuple[int, int, int]:
        return self.image_C, self.image_H, self.image_W

    @property
    def patch_dim(self) -> int:
        return self.patch_H * self.patch_W * self.image_C

    @property
    def num_patches(self) -> int:
        return (self.image_H // self.patch_H) * (self.image_W // self.patch_W)


def patchify(fmaps: torch.Tensor, patch_h: int, patch_w: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, L, patch_h*patch_w*C), patches in row-major order."""
    n, c, h, w = fmaps.shape
    x = fmaps.reshape(n, c, h // patch_h, patch_h, w // patch_w, patch_w)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(n, (h // patch_h) * (w // patch_w), patch_h * patch_w * c)


def unpatchify(patches: torch.Tensor, shape: tuple[int, int, int], patch_h: int, patch_w: int) -> torch.Tensor:
    """(N, L, patch_h*patch_w*C) -> (N, C, H, W): the inverse of patchify."""
    c, h, w = shape
    n = patches.shape[0]
    x = patches.reshape(n, h // patch_h, w // patch_w, patch_h, patch_w, c)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(n, c, h, w)


def grid_shape(units: int) -> tuple[int, int]:
    """The most nearly square rows x cols grid holding `units`."""
    rows = int(math.isqrt(units))
    while units % rows:
        rows -= 1
    return rows, units // rows


class SOMCodebook(nn.Module):
    def __init__(self, cfg: CodebookConfig):
        super().__init__()
        self.cfg = cfg
        rows, cols = grid_shape(cfg.num_embeddings)
        self.units = nn.Parameter(torch.zeros(cfg.num_embeddings, cfg.patch_dim))
        coords = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
        self.register_buffer("grid", coords.reshape(-1, 2).float())  # kept through pruning
        self.register_buffer("usage", torch.zeros(cfg.num_embeddings))  # BMU hits since the last dead-unit check

    # -- tokens

    def distances(self, vectors: torch.Tensor) -> torch.Tensor:
        """Squared distances (M, K) between vectors (M, D) and every unit."""
        units = self.units
        return (vectors.pow(2).sum(1, keepdim=True) - 2 * vectors @ units.t() + units.pow(2).sum(1)).clamp_min(0)

    @torch.no_grad()
    def bmu(self, vectors: torch.Tensor, chunk: int = 8192) -> torch.Tensor:
        """Index of the nearest unit for each vector (M, D): argmin of |w|^2 - 2 x.w, one fused matmul."""
        units = self.units.detach()
        squares = units.pow(2).sum(1)
        return torch.cat([torch.addmm(squares, v.float(), units.t(), alpha=-2).argmin(1) for v in vectors.split(chunk)])

    @torch.no_grad()
    def tokenize(self, fmaps: torch.Tensor) -> torch.Tensor:
        """Feature maps (N, C, H, W) -> tokens (N, L)."""
        patches = patchify(fmaps, self.cfg.patch_H, self.cfg.patch_W)
        return self.bmu(patches.reshape(-1, patches.shape[-1])).reshape(patches.shape[:2])

    def lookup(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (N, L) -> feature maps (N, C, H, W) built from the units."""
        return unpatchify(self.units.detach()[tokens], self.cfg.fmap_shape, self.cfg.patch_H, self.cfg.patch_W)

    # -- training

    @torch.no_grad()
    def init_from_data(self, fmaps: torch.Tensor, sample: int = 20000) -> None:
        """k-means++ seeding from a random sample of the data's patches."""
        patches = patchify(fmaps, self.cfg.patch_H, self.cfg.patch_W).reshape(-1, self.cfg.patch_dim).float()
        patches = patches[torch.randperm(len(patches))[:sample]]
        self.units.copy_(patches[kmeans_plus_plus(patches, self.cfg.num_embeddings)])

    def radius(self, step: int) -> float:
        return max(0.0, self.cfg.neighbourhood_radius - step // self.cfg.neighbourhood_step)

    def neighbourhood(self, radius: float) -> torch.Tensor:
        """(K, K) Gaussian weights between units by their distance on the grid."""
        if getattr(self, "_neighbourhood", (None,))[0] != radius:
            grid_d2 = (self.grid[:, None, :] - self.grid[None, :, :]).pow(2).sum(-1)
            self._neighbourhood = (radius, torch.exp(-grid_d2 / (2 * radius ** 2)))
        return self._neighbourhood[1]

    def forward(self, fmaps: torch.Tensor, step: int) -> torch.Tensor:
        """The neighbourhood-weighted squared distance between the batch's patches and the units, per
        dimension. It is computed from per-unit sums of the patches that each unit wins, so the cost
        beyond the BMU search is O(K*D + K^2) rather than O(patches * K)."""
        patches = patchify(fmaps, self.cfg.patch_H, self.cfg.patch_W).reshape(-1, self.cfg.patch_dim).float()
        if self.cfg.dead_unit_step and step > 0 and step % self.cfg.dead_unit_step == 0:
            self._reseed_dead_units(patches)
        with torch.no_grad():
            winners = self.bmu(patches)
            units_count = len(self.units)
            counts = torch.bincount(winners, minlength=units_count).float()
            self.usage += counts
            sums = torch.zeros_like(self.units).index_add_(0, winners, patches)
            square_sums = torch.zeros_like(counts).index_add_(0, winners, patches.pow(2).sum(1))
            radius = self.radius(step)
            if radius > 0:  # spread each patch over its BMU's grid neighbours
                weights = self.neighbourhood(radius)
                counts, sums, square_sums = weights @ counts, weights @ sums, weights @ square_sums
        units = self.units
        total = (counts * units.pow(2).sum(1)).sum() - 2 * (units * sums).sum() + square_sums.sum()
        return total / counts.sum() / self.cfg.patch_dim

    @torch.no_grad()
    def _reseed_dead_units(self, patches: torch.Tensor) -> None:
        """Move every unit that won no patch since the last check onto the batch's worst-fit patches,
        which splits the clusters that are served worst."""
        dead = (self.usage == 0).nonzero().flatten()
        if len(dead):
            worst_fit = self.distances(patches).min(1).values
            picks = worst_fit.topk(min(len(dead), len(patches))).indices
            dead = dead[:len(picks)]
            self.units[dead] = patches[picks] + 1e-3 * torch.randn_like(patches[picks])
        if dist.is_initialized():  # every process keeps rank 0's units
            dist.broadcast(self.units.data, 0)
        self.usage.zero_()


# ---------------------------------------------------------------- usage and quality figures

def usage_counts(codebook: SOMCodebook, fmaps: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    counts = torch.zeros(codebook.cfg.num_embeddings, dtype=torch.long)
    for chunk in fmaps.split(batch_size):
        tokens = codebook.tokenize(chunk.to(codebook.units.device))
        counts += torch.bincount(tokens.flatten().cpu(), minlength=len(counts))
    return counts


def usage_stats(counts: torch.Tensor) -> dict:
    probs = counts.float() / counts.sum().clamp_min(1)
    entropy = -(probs[probs > 0] * probs[probs > 0].log()).sum().item()
    return {"units": len(counts), "used_units": int((counts > 0).sum()), "perplexity": math.exp(entropy)}


@torch.no_grad()
def quantize(codebook: SOMCodebook, fmaps: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
    """Feature maps replaced by their nearest-unit reconstruction."""
    device = codebook.units.device
    return torch.cat([codebook.lookup(codebook.tokenize(c.to(device))).cpu() for c in fmaps.split(batch_size)])


def keep_units(codebook: SOMCodebook, kept: torch.Tensor) -> tuple[SOMCodebook, torch.Tensor]:
    """A codebook of the `kept` units only (pruning), and the remap: old index -> new index, -1 for a
    dropped unit."""
    pruned = SOMCodebook(replace(codebook.cfg, num_embeddings=len(kept)))
    with torch.no_grad():
        pruned.units.copy_(codebook.units[kept])
        pruned.grid.copy_(codebook.grid[kept])
    remap = torch.full((codebook.cfg.num_embeddings,), -1, dtype=torch.long)
    remap[kept] = torch.arange(len(kept))
    return pruned, remap
