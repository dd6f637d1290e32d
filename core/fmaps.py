"""The feature-map dataset: every image encoded once by the autoencoder, stored in safetensors shards
with a tinydb dataset.json that keeps each item's labels, split and source image."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core.artifacts import file_record, load_artifact, save_artifact
from core.autoencoder import load_autoencoder
from core.data import (Dataset, label_tensors, load_image_dataset, read_image_files, read_records, to_float,
                       write_dataset_json)
from core.errors import PipelineError

SHARD_KIND = "fmap_shard"


def generate(dataset_path: Path, model_path: Path, out_dir: Path, device: torch.device, batch_size: int,
             shard_size: int, progress: Callable[[Iterable], Iterator] = iter) -> dict:
    """Encode every image of `dataset_path`. Shards already written by an identical earlier run are kept,
    so an interrupted run continues where it stopped."""
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
    for shard_index, start in enumerate(progress(starts)):
        name = f"shard_{shard_index:05d}.safetensors"
        chunk = images.items[start:start + shard_size]
        if _shard_is_current(shard_dir / name, sources, len(chunk)):
            reused += 1
        else:
            with torch.no_grad():
                fmaps = torch.cat([model.encoder(to_float(b).to(device)).float().cpu() for b in chunk.split(batch_size)])
            save_artifact(shard_dir / name, {"fmaps": fmaps}, SHARD_KIND, {}, {"stage": "generate_fmap_dataset", **sources})
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
        shard = load_artifact(path, SHARD_KIND)
    except PipelineError:
        return False
    same_sources = all(shard.provenance.get(k) == v for k, v in sources.items())
    return same_sources and shard.tensors["fmaps"].shape[0] == count


def load_fmap_dataset(dataset_path: str | Path) -> tuple[Dataset, dict]:
    """All feature maps of a feature-map dataset as one float tensor, and the dataset's info."""
    dataset_path = Path(dataset_path)
    records, info = read_records(dataset_path)
    if info.get("kind") != "feature_maps":
        found = "an image dataset" if records and "fmap_shard" not in records[0] else "no dataset info"
        raise PipelineError(f"{dataset_path}: expected a feature-map dataset (made by generate_fmap_dataset.py), "
                            f"found {found}")
    shards: dict[str, torch.Tensor] = {}
    for record in records:
        name = record["fmap_shard"]
        if name not in shards:
            shards[name] = load_artifact(dataset_path.parent / name, SHARD_KIND).tensors["fmaps"]
    fmaps = torch.stack([shards[r["fmap_shard"]][r["index"]] for r in records])
    if list(fmaps.shape[1:]) != info["fmap_shape"]:
        raise PipelineError(f"{dataset_path}: shards hold maps of shape {tuple(fmaps.shape[1:])}, "
                            f"the dataset says {tuple(info['fmap_shape'])}")
    return Dataset(fmaps, *label_tensors(records), dataset_path, records), info


def load_source_images(fmap_data: Dataset) -> torch.Tensor:
    """The images the feature maps were made from (uint8), in the same order."""
    return read_image_files([fmap_data.path.parent / r["image_fpath"] for r in fmap_data.records])
