"""The feature-map dataset: every image encoded once by the autoencoder, stored in safetensors shards
with a tinydb dataset.json that keeps each item's labels, split and source image."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core.artifacts import file_record, load_artifact, save_artifact
from core.data import FMAP_SHARD_KIND, load_image_dataset, to_float, write_dataset_json
from core.errors import PipelineError
from core.model_artifacts import load_autoencoder
from core.training import pick_device


@dataclass
class FmapArgs:
    dataset_path: Path
    model_path: Path
    out_dir: Path
    device: str = "auto"
    batch_size: int = 256
    shard_size: int = 10000
    progress: Callable[[Iterable], Iterator] = iter


def run(args: FmapArgs) -> dict:
    """Encode every image of the dataset. Shards already written by an identical earlier run are kept,
    so an interrupted run continues where it stopped."""
    dataset_path, model_path, out_dir = args.dataset_path, args.model_path, args.out_dir
    batch_size, shard_size, device = args.batch_size, args.shard_size, pick_device(args.device)
    model, _ = load_autoencoder(model_path)
    model.to(device)
    images = load_image_dataset(dataset_path)
    if images.items.shape[1] != model.cfg.image_channel:
        raise PipelineError(f"{model_path} expects {model.cfg.image_channel}-channel images, "
                            f"{dataset_path} holds {images.items.shape[1]}-channel images")
    sources = {"autoencoder": file_record(model_path), "images": file_record(dataset_path)}
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(images), shard_size))
    records, reused = [], 0
    for shard_index, start in enumerate(args.progress(starts)):
        name = f"shard_{shard_index:05d}.safetensors"
        chunk = images.items[start:start + shard_size]
        if _shard_is_current(shard_dir / name, sources, len(chunk)):
            reused += 1
        else:
            with torch.no_grad():
                fmaps = torch.cat([model.encoder(to_float(b).to(device)).float().cpu() for b in chunk.split(batch_size)])
            save_artifact(shard_dir / name, {"fmaps": fmaps}, FMAP_SHARD_KIND, {}, {"stage": "generate_fmap_dataset", **sources})
        for offset in range(len(chunk)):
            record = images.records[start + offset]
            image_path = os.path.relpath(dataset_path.parent / record["image_fpath"], out_dir)
            records.append({"fmap_shard": f"shards/{name}", "index": offset, "labels": record.get("labels", []),
                            "split": record.get("split", "train"), "image_fpath": image_path})
    shape = list(model.latent_shape(images.items.shape[-1]))
    write_dataset_json(out_dir / "dataset.json", records, {"kind": "feature_maps", "fmap_shape": shape,
                                                           "num_shards": len(starts), **sources})
    return {"items": len(records), "shards": len(starts), "reused_shards": reused, "fmap_shape": shape}


def _shard_is_current(path: Path, sources: dict, count: int) -> bool:
    if not path.exists():
        return False
    try:
        shard = load_artifact(path, FMAP_SHARD_KIND)
    except PipelineError:
        return False
    same_sources = all(shard.provenance.get(k) == v for k, v in sources.items())
    return same_sources and shard.tensors["fmaps"].shape[0] == count
