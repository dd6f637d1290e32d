"""Metrics on sets of feature vectors (N, D): Fréchet distance, precision/recall (Kynkäänniemi et al.
2019), density/coverage (Naeem et al. 2020), nearest neighbours and the memorization rate, and 2-D
projections (PCA, t-SNE)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator

import torch

from core.errors import PipelineError

Progress = Callable[[Iterable], Iterator]


def _sqrtm_psd(matrix: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix by eigendecomposition."""
    values, vectors = torch.linalg.eigh(matrix)
    return (vectors * values.clamp_min(0).sqrt()) @ vectors.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64.
    S_a^1/2 S_b S_a^1/2 is symmetric, so its root's trace is the sum of the roots of its eigenvalues."""
    a, b = a.double().cpu(), b.double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T).reshape(a.shape[1], -1), torch.cov(b.T).reshape(b.shape[1], -1)
    root_a = _sqrtm_psd(cov_a)
    middle = root_a @ cov_b @ root_a
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


def pairwise_distances(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Euclidean distances (len(a), len(b)), computed in row chunks to bound memory."""
    return torch.cat([torch.cdist(a[i:i + chunk].float(), b.float()) for i in range(0, len(a), chunk)])


def knn_radii(x: torch.Tensor, k: int) -> torch.Tensor:
    """Each point's distance to its k-th nearest neighbour among the others."""
    if len(x) <= k:
        raise PipelineError(f"k-NN metrics need more than k={k} images per set, got {len(x)}")
    return pairwise_distances(x, x).kthvalue(k + 1, dim=1).values  # k+1: the point itself is at distance 0


def manifold_metrics(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> dict[str, float]:
    """Precision: share of fake points inside some real point's k-NN ball; recall: the converse.
    Density: how many real k-NN balls hold each fake point, over k (about 1 for matching sets);
    coverage: share of real points whose ball holds at least one fake point."""
    distances = pairwise_distances(real, fake)  # (R, F)
    in_real_balls = distances <= knn_radii(real, k)[:, None]
    return {"precision": float(in_real_balls.any(0).float().mean()),
            "recall": float((distances <= knn_radii(fake, k)[None, :]).any(1).float().mean()),
            "density": float(in_real_balls.float().sum(0).mean() / k),
            "coverage": float(in_real_balls.any(1).float().mean())}


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    metrics = manifold_metrics(real, fake, k)
    return metrics["precision"], metrics["recall"]


def density_coverage(real: torch.Tensor, fake: torch.Tensor, k: int = 5) -> tuple[float, float]:
    metrics = manifold_metrics(real, fake, k)
    return metrics["density"], metrics["coverage"]


def nearest_distances(query: torch.Tensor, reference: torch.Tensor, chunk: int = 1024,
                      progress: Progress = iter) -> tuple[torch.Tensor, torch.Tensor]:
    """For each query point, the distance to and the index of its nearest reference point."""
    best = torch.full((len(query),), math.inf, device=query.device)
    index = torch.zeros(len(query), dtype=torch.long, device=query.device)
    for start in progress(range(0, len(reference), chunk)):
        d = torch.cdist(query.float(), reference[start:start + chunk].float())
        value, where = d.min(1)
        closer = value < best
        best = torch.where(closer, value, best)
        index = torch.where(closer, where + start, index)
    return best.cpu(), index.cpu()


def memorization_rate(generated_nn: torch.Tensor, heldout_nn: torch.Tensor,
                      percentile: float = 5.0) -> dict:
    """Share of generated images closer to their nearest training image than the `percentile`-th percentile
    of the same distance for real held-out images (which the training never saw). The held-out images'
    own rate is about percentile/100 by construction."""
    threshold = float(torch.quantile(heldout_nn.double(), percentile / 100))
    return {"threshold": threshold, "percentile": percentile,
            "generated_rate": float((generated_nn < threshold).double().mean()),
            "heldout_rate": float((heldout_nn < threshold).double().mean())}


def all_metrics(real: torch.Tensor, fake: torch.Tensor, k: int | None) -> dict[str, float]:
    """The Fréchet distance, and the k-NN metrics unless k is None (sets too small for them)."""
    return {"frechet_distance": frechet_distance(real, fake), **(manifold_metrics(real, fake, k) if k else {})}


# ---------------------------------------------------------------- projections

@dataclass
class PCA:
    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (K, D), rows ordered by explained variance
    explained: torch.Tensor  # (K,) share of the total variance

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return (x.double() - self.mean) @ self.components.T


def pca(x: torch.Tensor, components: int) -> PCA:
    x = x.double().cpu()
    mean = x.mean(0)
    _, singular, vt = torch.linalg.svd(x - mean, full_matrices=False)
    variance = singular.pow(2)
    components = min(components, vt.shape[0])
    return PCA(mean, vt[:components], variance[:components] / variance.sum().clamp_min(1e-12))


def _affinities(d2: torch.Tensor, perplexity: float, iterations: int = 64) -> torch.Tensor:
    """Row-wise Gaussian conditionals p(j|i) whose entropy is log(perplexity), found by bisection on
    the precision beta of every row at once."""
    d2 = d2 - d2.min(1, keepdim=True).values  # shifts cancel in the normalisation; keeps exp() in range
    target = math.log(perplexity)
    beta = 1.0 / d2.median(1).values.clamp_min(1e-12)
    low, high = torch.zeros_like(beta), torch.full_like(beta, math.inf)
    for _ in range(iterations):
        p = torch.exp(-d2 * beta[:, None])
        p.fill_diagonal_(0)
        total = p.sum(1).clamp_min(1e-300)
        entropy = total.log() + beta * (d2 * p).sum(1) / total
        too_flat = entropy > target
        low = torch.where(too_flat, beta, low)
        high = torch.where(too_flat, high, beta)
        beta = torch.where(torch.isinf(high), beta * 2, (low + high) / 2)
    return p / total[:, None]


def tsne(x: torch.Tensor, dims: int = 2, perplexity: float = 30.0, steps: int = 750, seed: int = 0,
         progress: Progress = iter) -> torch.Tensor:
    """Exact t-SNE (van der Maaten & Hinton 2008): gradient descent with momentum, gains and early
    exaggeration. O(N^2) memory and time per step, fine up to a few thousand points."""
    x = x.double().cpu()
    n = len(x)
    if n < 3:
        raise PipelineError(f"t-SNE needs at least 3 points, got {n}")
    perplexity = min(perplexity, (n - 1) / 3)
    p = _affinities(torch.cdist(x, x).pow(2), perplexity)
    # the descent runs in float32: twice as fast, and its noise is far below what the picture shows
    p = ((p + p.T) / (2 * n)).clamp_min(1e-12).float()
    y = torch.randn(n, dims, generator=torch.Generator().manual_seed(seed)) * 1e-4
    velocity, gains = torch.zeros_like(y), torch.ones_like(y)
    lr = max(n / 12 / 4, 50.0)
    exaggerated = min(250, steps // 3)
    for step in progress(range(steps)):
        exaggeration, momentum = (12.0, 0.5) if step < exaggerated else (1.0, 0.8)
        squared = y.pow(2).sum(1)
        # Student-t kernel 1 / (1 + |y_i - y_j|^2), built in place
        kernel = torch.addmm(squared[:, None] + squared[None, :], y, y.T, alpha=-2).clamp_min_(0).add_(1).reciprocal_()
        kernel.fill_diagonal_(0)
        q = (kernel / kernel.sum()).clamp_min_(1e-12)
        weights = (p * exaggeration - q).mul_(kernel)
        grad = 4 * (weights.sum(1, keepdim=True) * y - weights @ y)
        gains = torch.where((grad > 0) == (velocity > 0), gains * 0.8, gains + 0.2).clamp_min(0.01)
        velocity = momentum * velocity - lr * gains * grad
        y = y + velocity
        y = y - y.mean(0)
    return y


