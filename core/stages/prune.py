"""The pruning stage: drop the codebook units that are the best match for too few training patches."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from core.artifacts import atomic_write_json, file_record
from core.data import load_fmap_dataset
from core.errors import PipelineError
from core.model_artifacts import check_fits, load_codebook, save_codebook
from core.models.codebook import SOMCodebook, keep_units, quantize, usage_counts, usage_stats
from core.training import pick_device


@dataclass
class PruneArgs:
    dataset_path: Path
    codebook_path: Path
    out_dir: Path
    threshold: int = 1
    device: str = "auto"
    batch_size: int = 512


def prune(codebook: SOMCodebook, counts: torch.Tensor, threshold: int) -> tuple[SOMCodebook, torch.Tensor]:
    """The codebook without the units of fewer than `threshold` best-match uses, and the remap."""
    kept = (counts >= threshold).nonzero().flatten()
    if len(kept) < 2:
        suggested, units = threshold_for_share(counts, 0.9)
        raise PipelineError(f"--prune-threshold {threshold} keeps {len(kept)} of {len(counts)} units (the most used "
                            f"unit has {int(counts.max())} uses); --prune-threshold {suggested} would keep {units} "
                            f"units, which serve 90% of the {int(counts.sum())} training patches")
    return keep_units(codebook, kept)


def threshold_for_share(counts: torch.Tensor, share: float) -> tuple[int, int]:
    """The highest threshold whose kept units are the best match for at least `share` of the patches, and
    how many units it keeps (at least 2)."""
    ordered = counts.sort(descending=True).values
    needed = int((ordered.cumsum(0) < share * ordered.sum()).sum()) + 1
    threshold = int(ordered[max(needed, 2) - 1])
    return threshold, int((counts >= threshold).sum())


def run(args: PruneArgs) -> dict:
    """Count every unit's BMU uses over the training split, drop those under the threshold, and write the
    pruned codebook and a usage report. Returns the report."""
    data, _ = load_fmap_dataset(args.dataset_path)
    codebook, _ = load_codebook(args.codebook_path)
    check_fits(codebook.cfg, data.items.shape[1:], args.codebook_path, args.dataset_path)
    codebook.to(pick_device(args.device))
    fmaps = data.split(heldout=False).items
    if len(fmaps) == 0:
        fmaps = data.items
    counts = usage_counts(codebook, fmaps, args.batch_size)
    pruned, remap = prune(codebook, counts, args.threshold)
    after = usage_counts(pruned, fmaps, args.batch_size)
    error = {name: (quantize(book, fmaps, args.batch_size) - fmaps).pow(2).mean().item()
             for name, book in (("before", codebook), ("after", pruned))}
    report = {"threshold": args.threshold, "before": {**usage_stats(counts), "quant_mse": error["before"]},
              "after": {**usage_stats(after), "quant_mse": error["after"]},
              "counts_before": counts.tolist()}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    provenance = {"stage": "prune_codebook", "threshold": args.threshold,
                  "inputs": [file_record(args.codebook_path), file_record(args.dataset_path)]}
    save_codebook(args.out_dir / "codebook.safetensors", pruned, provenance, {"remap": remap.tolist()})
    atomic_write_json(args.out_dir / "usage_report.json", report)
    return report
