"""Datasets: the seed's tinydb dataset.json of images (and of feature maps, whose tensors lie in
safetensors shards), read whole into memory for training and evaluation. A dataset too large for one
file (generated ones) keeps its first records in dataset.json and the rest in part files beside it, named
in its info table ("record_files"), each of them a tinydb file too."""
from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tinydb import TinyDB

from core.artifacts import atomic_path, load_artifact
from core.errors import PipelineError

FMAP_SHARD_KIND = "fmap_shard"
RECORDS_PER_FILE = 250_000  # about 30 MB of small records


def write_dataset_json(path: Path, records: Iterable[dict], info: dict,
                       tables: dict[str, list[dict]] | None = None) -> None:
    """The seed's tinydb layout ({"_default": {"1": record, ...}}), plus an "info" table (and `tables`),
    written atomically."""
    write_records(path, records, info, tables)


def write_records(path: Path, records: Iterable[dict], info: dict, tables: dict[str, list[dict]] | None = None,
                  per_file: int = RECORDS_PER_FILE) -> None:
    """The same layout as write_dataset_json, streamed from an iterable of records in constant memory:
    records beyond the first `per_file` go to part files (dataset-0001.json, ...) that the info table names.
    `tables` are further tinydb tables (name -> documents). dataset.json is renamed into place last."""
    records = iter(records)
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        next_id = _write_table(f, itertools.islice(records, per_file), first_id=1)
        parts = []
        for first in records:  # more than one file holds: the rest in parts
            part = path.with_name(f"{path.stem}-{len(parts) + 1:04d}{path.suffix}")
            with atomic_path(part) as part_tmp, open(part_tmp, "w") as part_file:
                next_id = _write_table(part_file, itertools.chain([first], itertools.islice(records, per_file - 1)),
                                       first_id=next_id)
                part_file.write("}\n")
            parts.append(part.name)
        for name, documents in {"info": [{**info, "record_files": parts} if parts else info], **(tables or {})}.items():
            rows = ", ".join(f'"{i}": {json.dumps(doc)}' for i, doc in enumerate(documents, 1))
            f.write(f', {json.dumps(name)}: {{{rows}}}')
        f.write("}\n")


def _write_table(f, records: Iterable[dict], first_id: int) -> int:
    """Open a tinydb file's JSON with its default table of `records`; returns the next id."""
    f.write('{"_default": {')
    doc_id = first_id
    for record in records:
        f.write(f'{", " if doc_id > first_id else ""}"{doc_id}": {json.dumps(record)}')
        doc_id += 1
    f.write("}")
    return doc_id


# ---------------------------------------------------------------- loading for training

@dataclass
class Dataset:
    """A whole dataset in memory: images (uint8) or feature maps (float), with labels and split."""
    items: torch.Tensor  # (N, C, H, W)
    labels: torch.Tensor  # int64, (N,), -1 where unlabeled
    label_names: list[str]
    is_heldout: torch.Tensor  # bool, (N,)
    path: Path
    records: list[dict]  # the dataset.json records, in item order
    info: dict = field(default_factory=dict)  # the dataset.json's info table

    def take(self, indices: torch.Tensor) -> "Dataset":
        records = [self.records[i] for i in indices.tolist()]
        return Dataset(self.items[indices], self.labels[indices], self.label_names, self.is_heldout[indices],
                       self.path, records, self.info)

    def split(self, heldout: bool) -> "Dataset":
        return self.take((self.is_heldout if heldout else ~self.is_heldout).nonzero().flatten())

    def with_labels(self) -> "Dataset":
        """The items that carry a label."""
        return self.take((self.labels >= 0).nonzero().flatten())

    def sample(self, count: int, seed: int = 0) -> "Dataset":
        """A fixed random subset (for evaluation)."""
        return self.take(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count])

    def eval_ids(self, count: int) -> torch.Tensor:
        """Ids of a fixed random sample of `count` held-out items, or of training items when nothing is
        held out: what every stage evaluates on."""
        ids = self.is_heldout.nonzero().flatten()
        if len(ids) == 0:
            ids = (~self.is_heldout).nonzero().flatten()
        return ids[torch.randperm(len(ids), generator=torch.Generator().manual_seed(0))[:count]]

    def __len__(self) -> int:
        return len(self.items)

    def relabelled(self, names: list[str]) -> "Dataset":
        """The same items with their labels expressed in `names`; a label not among them becomes none."""
        mapping = torch.tensor([names.index(n) if n in names else -1 for n in self.label_names] + [-1])
        return Dataset(self.items, mapping[self.labels], list(names), self.is_heldout, self.path, self.records,
                       self.info)


def label_tensors(records: list[dict]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Label ids (first label of each record, -1 if none), the sorted label names, and the held-out mask."""
    first = [str(r["labels"][0]) if r.get("labels") else None for r in records]
    names = sorted({name for name in first if name is not None})
    ids = torch.tensor([names.index(name) if name is not None else -1 for name in first], dtype=torch.long)
    heldout = torch.tensor([r.get("split") == "heldout" for r in records], dtype=torch.bool)
    return ids, names, heldout


def read_records(dataset_path: str | Path) -> tuple[list[dict], dict]:
    """The records of a dataset.json (in id order), with those of its part files, and its info table."""
    files = _record_files(Path(dataset_path))
    records, info = next(files)
    for more, _ in files:
        records += more
    return records, info


def record_files(dataset_path: str | Path) -> Iterator[list[dict]]:
    """The records of a dataset.json, then of each of its part files: one file's records in memory at a
    time (at most RECORDS_PER_FILE), for a pass over a set of any size."""
    return (records for records, _ in _record_files(Path(dataset_path)))


def _record_files(dataset_path: Path) -> Iterator[tuple[list[dict], dict]]:
    """Each file's records, with the dataset's info table."""
    records, info = _read_tinydb(dataset_path)
    yield records, info
    for name in info.get("record_files", []):
        yield _read_tinydb(dataset_path.parent / name)[0], info


def read_table(dataset_path: str | Path, name: str) -> list[dict]:
    """The documents of a further table of a dataset.json (generated datasets: "runs")."""
    with TinyDB(dataset_path, access_mode="r") as db:
        return [dict(r) for r in sorted(db.table(name).all(), key=lambda r: r.doc_id)]


def _read_tinydb(path: Path) -> tuple[list[dict], dict]:
    if not path.is_file():
        raise PipelineError(f"{path}: no such dataset file")
    try:
        with TinyDB(path, access_mode="r") as db:
            records = [dict(r) for r in sorted(db.all(), key=lambda r: r.doc_id)]
            info = db.table("info").all()
    except ValueError as e:  # json errors
        raise PipelineError(f"{path}: not a dataset.json ({e})") from None
    return records, (dict(info[0]) if info else {})


def read_image_files(paths: list[Path], channels: int | None = None) -> torch.Tensor:
    """Images of one size as a uint8 tensor (N, C, H, W); channels None keeps the first file's mode."""
    arrays = []
    for path in paths:
        try:
            with Image.open(path) as image:
                if channels is None:
                    channels = 1 if image.mode in ("L", "1", "I", "I;16") else 3
                array = np.asarray(image.convert("L" if channels == 1 else "RGB"))
        except (OSError, UnidentifiedImageError) as e:
            raise PipelineError(f"{path}: cannot read image ({e})") from None
        if arrays and array.shape != arrays[0].shape:
            raise PipelineError(f"{path}: size {array.shape[:2]} differs from the dataset's "
                                f"{arrays[0].shape[:2]} (rebuild it with build_dataset.py --size)")
        arrays.append(array)
    images = torch.from_numpy(np.stack(arrays))
    return (images.unsqueeze(1) if images.ndim == 3 else images.permute(0, 3, 1, 2)).contiguous()


def load_image_dataset(dataset_path: str | Path, channels: int | None = None) -> Dataset:
    """Every image of a dataset.json as one uint8 tensor; all must share one size."""
    dataset_path = Path(dataset_path)
    records, info = read_records(dataset_path)
    if info.get("kind") == "feature_maps":
        raise PipelineError(f"{dataset_path}: expected an image dataset, found a feature-map dataset")
    if not records:
        raise PipelineError(f"{dataset_path}: the dataset holds no images")
    missing = next((r for r in records if "image_fpath" not in r), None)
    if missing is not None:
        raise PipelineError(f"{dataset_path}: record without 'image_fpath': {missing}")
    images = read_image_files([dataset_path.parent / r["image_fpath"] for r in records], channels)
    return Dataset(images, *label_tensors(records), dataset_path, records, info)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


# ---------------------------------------------------------------- feature-map datasets

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
            shards[name] = load_artifact(dataset_path.parent / name, FMAP_SHARD_KIND).tensors["fmaps"]
    fmaps = torch.stack([shards[r["fmap_shard"]][r["index"]] for r in records])
    if list(fmaps.shape[1:]) != info["fmap_shape"]:
        raise PipelineError(f"{dataset_path}: shards hold maps of shape {tuple(fmaps.shape[1:])}, "
                            f"the dataset says {tuple(info['fmap_shape'])}")
    return Dataset(fmaps, *label_tensors(records), dataset_path, records, info), info


def load_source_images(fmap_data: Dataset) -> torch.Tensor:
    """The images the feature maps were made from (uint8), in the same order."""
    return read_image_files([fmap_data.path.parent / r["image_fpath"] for r in fmap_data.records])


def source_content_size(autoencoder_extra: dict) -> list[int] | None:
    """The (width, height) that the autoencoder's training images had before the dataset build padded
    them (every image alike), or None when there is nothing to crop."""
    images = autoencoder_extra.get("images") or {}
    content, size = images.get("content_size"), images.get("size")
    return content if images.get("fit") == "pad" and content and list(content) != [size, size] else None


def crop_to_content(images: torch.Tensor, content_size: list[int] | None) -> torch.Tensor:
    """Images (N, C, H, W) cut to their centred content box (width, height) as the dataset build placed it
    (build_dataset.py --fit pad): padded images come back at their source's size."""
    if not content_size:
        return images
    width, height = content_size
    top, left = (images.shape[-2] - height) // 2, (images.shape[-1] - width) // 2
    return images[..., top:top + height, left:left + width]
