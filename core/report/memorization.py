"""Memorization: in pixel space, the nearest training image of each generated and each held-out image. A
generated image closer than the held-out images' low percentile is flagged as a copy of that training image."""
from __future__ import annotations

import math
from typing import Callable

import torch

from core import pictures
from core.data import Dataset
from core.metrics import memorization_rate, nearest_distances
from core.report.sets import EvalArgs
from core.report.spaces import pixels


def section(train: Dataset, heldout: Dataset, generated: Dataset, args: EvalArgs, device: torch.device,
            track: Callable) -> dict:
    reference = pixels(train.items).to(device)
    g_nn, g_index = nearest_distances(pixels(generated.items).to(device), reference,
                                      progress=lambda it: track(it, "memorization (generated)"))
    h_nn, _ = nearest_distances(pixels(heldout.items).to(device), reference,
                                progress=lambda it: track(it, "memorization (held-out)"))
    result = memorization_rate(g_nn, h_nn, args.memorization_percentile)
    result["space"] = "pixels in [-1, 1], Euclidean"
    result["reference_images"] = len(train)
    result["generated_images"] = len(generated)
    result["well_above_floor"] = well_above(result["generated_rate"], result["heldout_rate"], len(generated))
    flagged = [i for i in g_nn.argsort().tolist() if g_nn[i] < result["threshold"]]
    result["copies"] = [{"generated": generated.records[i]["image_fpath"],
                         "training": train.records[g_index[i]]["image_fpath"], "distance": float(g_nn[i])}
                        for i in flagged]
    closest = g_nn.argsort()[:8]
    pictures.pairs_grid(generated.items[closest], train.items[g_index[closest]], args.out_dir / "nearest.png")
    result["nearest_picture"] = "nearest.png"
    return result


def well_above(generated_rate: float, floor_rate: float, count: int) -> bool:
    """A memorizing generator: at least twice the real rate, and more than three binomial standard errors
    (of `count` images at the real rate) above it."""
    standard_error = math.sqrt(max(floor_rate * (1 - floor_rate), 1e-12) / max(count, 1))
    return generated_rate >= 2 * floor_rate and generated_rate - floor_rate > 3 * standard_error


def summary_lines(m: dict) -> list[str]:
    lines = [f"Memorization: {m['generated_rate']:.1%} of generated images are near-copies of a training image "
             f"(real floor: {m['heldout_rate']:.1%} of real held-out images)."]
    if m["well_above_floor"]:
        lines.append(f"WARNING: the generator copies its training images ({m['generated_rate']:.1%} near-copies "
                     f"against {m['heldout_rate']:.1%} for real images): train it less, or on more images; "
                     f"the copies are listed in report.json.")
    return lines


def markdown(m: dict) -> list[str]:
    return ["## Memorization", "",
            f"Distances to the nearest of {m['reference_images']} training images, in {m['space']}. Threshold: the "
            f"{m['percentile']:g}th percentile of the held-out images' distances ({m['threshold']:.4g}). Each "
            f"generated image under it is flagged as a copy in report.json (`memorization.copies`).", "",
            "| set | share closer than the threshold |", "|---|---:|",
            f"| generated | {m['generated_rate']:.1%} ({len(m['copies'])} of {m['generated_images']}) |",
            f"| real held-out (floor) | {m['heldout_rate']:.1%} |", "",
            "The generated images closest to a training image (top row) and that training image (bottom row):", "",
            f"![nearest]({m['nearest_picture']})", ""]
