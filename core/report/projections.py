"""The report's pictures: real held-out and generated images side by side, and 2-D maps of both sets
(the first two pixel-PCA axes, and a t-SNE of the classifier's features, or of the pixel-PCA ones)."""
from __future__ import annotations

from typing import Callable

import torch

from core import pictures
from core.data import Dataset
from core.metrics import tsne
from core.report.sets import EvalArgs
from core.report.spaces import Spaces


def section(args: EvalArgs, heldout: Dataset, generated: Dataset, spaces: Spaces, track: Callable) -> dict:
    pictures.side_by_side(heldout.items[:64], generated.items[:64], args.out_dir / "grids.png")
    legend = ("real (held-out)", "generated")
    references, generated_features = spaces.references, spaces.generated
    pictures.scatter(references["pixel_pca"][:, :2], generated_features["pixel_pca"][:, :2], legend,
                     "pixel PCA, first two axes", args.out_dir / "pca.png")
    space = "classifier" if "classifier" in references else "pixel_pca"
    # t-SNE is O(N^2): at most 1000 points per set
    h, g = references[space][:1000], generated_features[space][:1000]
    points = tsne(torch.cat([h, g]), steps=args.tsne_steps, seed=args.seed, progress=lambda it: track(it, "t-SNE"))
    pictures.scatter(points[:len(h)], points[len(h):], legend, f"t-SNE of {space.replace('_', ' ')} features",
                     args.out_dir / "tsne.png")
    return {"grids": "grids.png", "pca": "pca.png", "tsne": "tsne.png", "tsne_space": space}


def markdown(pics: dict) -> list[str]:
    return ["## Pictures", "", "Real held-out images (left) and generated images (right):", "",
            f"![grids]({pics['grids']})", "", "2-D projections (blue: real held-out, orange: generated):", "",
            f"![pca]({pics['pca']}) ![tsne]({pics['tsne']})", ""]
