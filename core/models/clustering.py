"""k-means++ seeding (Arthur & Vassilvitskii 2007) and 1-D k-means: the codebooks' initialisation and
the compression's weight clusters."""
from __future__ import annotations

import torch


def kmeans_plus_plus(points: torch.Tensor, k: int, generator: torch.Generator | None = None) -> list[int]:
    """Indices of k seeds among points (N, D): the first uniformly, each next one with probability
    proportional to its squared distance to the nearest seed so far."""
    chosen = [int(torch.randint(len(points), (1,), generator=generator))]
    nearest = (points - points[chosen[0]]).pow(2).sum(1)
    for _ in range(1, k):
        total = nearest.sum()
        if total > 0:
            index = int(torch.multinomial(nearest / total, 1, generator=generator))
        else:  # every point sits on a seed already
            index = int(torch.randint(len(points), (1,), generator=generator))
        chosen.append(index)
        nearest = torch.minimum(nearest, (points - points[index]).pow(2).sum(1))
    return chosen


def assign(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted centroids, for each value."""
    return torch.bucketize(values, (centroids[1:] + centroids[:-1]) / 2)


def kmeans_1d(values: torch.Tensor, k: int, init: str = "linear", iters: int = 30,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster scalars into k groups: (centroids (k,), sorted; index of each value's centroid)."""
    values = values.detach().float().flatten().cpu()
    if init == "linear":  # evenly over [min, max]: keeps the rare large weights (Deep Compression)
        centroids = torch.linspace(values.min().item(), values.max().item(), k)
    else:
        centroids = values[kmeans_plus_plus(values[:, None], k, generator)].sort().values
    indices = assign(values, centroids)
    for _ in range(iters):
        sums = torch.zeros(k).index_add_(0, indices, values)
        counts = torch.bincount(indices, minlength=k)
        updated = torch.where(counts > 0, sums / counts.clamp_min(1), centroids).sort().values
        new_indices = assign(values, updated)
        centroids, converged = updated, torch.equal(new_indices, indices)
        indices = new_indices
        if converged:
            break
    return centroids, indices
