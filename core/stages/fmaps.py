"""The feature-map dataset: every image encoded once by the autoencoder, stored in safetensors shards
with a tinydb dataset.json that keeps each item's labels, caption, split and source image."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core.artifacts import file_record, load_artifact, save_artifact
from core.data import FMAP_SHARD_KIND, Dataset, load_image_dataset, to_float, write_dataset_json
from core.errors import PipelineError
from core.model_artifacts import load_autoencoder
from core.models.augment import augment, augmentation_generator, copies_for
from core.config import load_config
from core.models.autoencoder import Autoencoder, AutoencoderConfig
from core.training import pick_device


@dataclass
class FmapArgs:
    dataset_path: Path
    model_path: Path
    out_dir: Path
    device: str = "auto"
    batch_size: int = 256
    shard_size: int = 10000
    augment_copies: int | str = 0  # augmented copies of each training image as extra training maps, or "auto"
    # an autoencoder config whose augment_* settings the copies use (None: the autoencoder's own, which a run
    # over a large set turns off; a small set tuned through that autoencoder names the preset's config)
    augment_config: Path | None = None
    seed: int = 0
    progress: Callable[[Iterable], Iterator] = iter


def run(args: FmapArgs) -> dict:
    """Encode every image of the dataset, and `augment_copies` augmented copies of every training image
    (training items too, for the codebooks and transformers). Shards already written by an identical
    earlier run are kept, so an interrupted run continues where it stopped."""
    dataset_path, out_dir, device = args.dataset_path, args.out_dir, pick_device(args.device)
    model, _ = load_autoencoder(args.model_path)
    model.to(device)
    images = load_image_dataset(dataset_path)
    if images.items.shape[1] != model.cfg.image_channel:
        raise PipelineError(f"{args.model_path} expects {model.cfg.image_channel}-channel images, "
                            f"{dataset_path} holds {images.items.shape[1]}-channel images")
    sources = {"autoencoder": file_record(args.model_path), "images": file_record(dataset_path)}
    settings = model.cfg if args.augment_config is None else load_config(AutoencoderConfig, args.augment_config)
    copies = copies_for(args.augment_copies, int((~images.is_heldout).sum()), settings.augments)
    if copies:
        sources["augment"] = {"copies": copies, "seed": args.seed, **settings.augmentation}
    items = items_to_encode(images, copies)
    shard_dir = out_dir / "shards"
    shard_dir.mkdir(parents=True, exist_ok=True)
    starts = list(range(0, len(items), args.shard_size))
    records, reused = [], 0
    for shard_index, start in enumerate(args.progress(starts)):
        name = f"shard_{shard_index:05d}.safetensors"
        chunk = items[start:start + args.shard_size]
        if _shard_is_current(shard_dir / name, sources, len(chunk)):
            reused += 1
        else:
            fmaps = encode(model, images.items, chunk, args, device, settings.augmentation)
            save_artifact(shard_dir / name, {"fmaps": fmaps}, FMAP_SHARD_KIND, {}, {"stage": "generate_fmap_dataset", **sources})
        for offset, (index, copy) in enumerate(chunk):
            record = images.records[index]
            image_path = os.path.relpath(dataset_path.parent / record["image_fpath"], out_dir)
            records.append({"fmap_shard": f"shards/{name}", "index": offset, "labels": record.get("labels", []),
                            "split": record.get("split", "train"), "image_fpath": image_path,
                            **({"caption": record["caption"]} if "caption" in record else {}),
                            **({"augmented": copy} if copy else {})})
    shape = list(model.latent_shape(images.items.shape[-1]))
    write_dataset_json(out_dir / "dataset.json", records, {"kind": "feature_maps", "fmap_shape": shape,
                                                           "num_shards": len(starts), **sources})
    return {"items": len(records), "shards": len(starts), "reused_shards": reused, "fmap_shape": shape}


def items_to_encode(images: Dataset, copies: int) -> list[tuple[int, int]]:
    """(image index, copy) of every map to write: every image as it is (copy 0), then `copies` augmented
    copies of each training image."""
    training = (~images.is_heldout).nonzero().flatten().tolist()
    return [(i, 0) for i in range(len(images))] + [(i, c) for c in range(1, copies + 1) for i in training]


@torch.no_grad()
def encode(model: Autoencoder, images: torch.Tensor, chunk: list[tuple[int, int]], args: FmapArgs,
           device: torch.device, augmentation: dict) -> torch.Tensor:
    """Feature maps of the chunk's images; copy k > 0 of image i is augmented with its own generator, so
    that it depends on the seed, the image and k only."""
    inputs = []
    for index, copy in chunk:
        image = to_float(images[index:index + 1])
        if copy:
            generator = augmentation_generator(args.seed, index, copy)
            image = augment(image, generator, **augmentation)
        inputs.append(image)
    batches = torch.cat(inputs).split(args.batch_size)
    return torch.cat([model.encoder(batch.to(device)).float().cpu() for batch in batches])


def _shard_is_current(path: Path, sources: dict, count: int) -> bool:
    if not path.exists():
        return False
    try:
        shard = load_artifact(path, FMAP_SHARD_KIND)
    except PipelineError:
        return False
    same_sources = all(shard.provenance.get(k) == v for k, v in sources.items())
    return same_sources and shard.tensors["fmaps"].shape[0] == count
