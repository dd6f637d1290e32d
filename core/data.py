"""Image datasets: the seed's tinydb dataset.json, built from an image folder or MNIST-format idx files."""
from __future__ import annotations

import dataclasses
import gzip
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tinydb import TinyDB

from core.artifacts import atomic_path
from core.errors import PipelineError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


# ---------------------------------------------------------------- reading sources

def read_idx(path: str | Path) -> np.ndarray:
    """An MNIST-format idx file (optionally gzipped) as a numpy array."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError) as e:
        raise PipelineError(f"{path}: cannot read idx file ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in IDX_DTYPES:
        raise PipelineError(f"{path}: not an idx file (bad magic number)")
    dtype, ndim = np.dtype(IDX_DTYPES[raw[2]]), raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise PipelineError(f"{path}: truncated idx header")
    shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    count = int(np.prod(shape)) if ndim else 0
    body = raw[4 + 4 * ndim:]
    if len(body) < count * dtype.itemsize:
        raise PipelineError(f"{path}: truncated idx data ({len(body)} bytes, expected {count * dtype.itemsize})")
    return np.frombuffer(body, dtype=dtype, count=count).reshape(shape)


def find_idx_pairs(folder: Path) -> list[tuple[str, Path, Path | None]]:
    """(split, images file, labels file) for the MNIST naming: train-* is training, t10k-* held out."""
    pairs = []
    for prefix, split in (("train", "train"), ("t10k", "heldout")):
        images = sorted(folder.glob(f"{prefix}-images-idx3-ubyte*"))
        if images:
            labels = sorted(folder.glob(f"{prefix}-labels-idx1-ubyte*"))
            pairs.append((split, images[0], labels[0] if labels else None))
    return pairs


@dataclass
class SourceItem:
    load: Callable[[], Image.Image]  # opens the image; may raise for a corrupt file
    label: str | None
    name: str  # shown in error messages
    split: str | None  # fixed by the source (idx train/t10k), or None to draw from the held-out fraction
    origin: str | None = None  # the split it had in its source (for --from-split)


def idx_items(pairs: list[tuple[str, Path, Path | None]], class_names: list[str] | None) -> list[SourceItem]:
    items = []
    for split, images_path, labels_path in pairs:
        images = read_idx(images_path)
        if images.ndim not in (3, 4):
            raise PipelineError(f"{images_path}: expected images of shape (N,H,W) or (N,H,W,C), found {images.shape}")
        labels = read_idx(labels_path) if labels_path else None
        if labels is not None and len(labels) != len(images):
            raise PipelineError(f"{labels_path}: {len(labels)} labels for {len(images)} images in {images_path}")
        for i, array in enumerate(images):
            label = None
            if labels is not None:
                index = int(labels[i])
                label = class_names[index] if class_names and index < len(class_names) else str(index)
            items.append(SourceItem(lambda a=array: Image.fromarray(np.ascontiguousarray(a)), label,
                                    f"{images_path.name}[{i}]", split, split))
    return items


def folder_items(folder: Path) -> list[SourceItem]:
    """Every image under `folder`; an image in a sub-folder takes the sub-folder's name as its label."""
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = path.relative_to(folder)
        label = relative.parts[0] if len(relative.parts) > 1 else None
        items.append(SourceItem(lambda p=path: Image.open(p), label, str(path), None))
    return items


def dataset_items(dataset_path: Path) -> list[SourceItem]:
    """The images of an existing dataset.json, with their labels; their split is drawn anew."""
    records, _ = read_records(dataset_path)
    if records and "image_fpath" not in records[0]:
        raise PipelineError(f"{dataset_path}: expected an image dataset")
    return [SourceItem(lambda p=dataset_path.parent / r["image_fpath"]: Image.open(p),
                       str(r["labels"][0]) if r.get("labels") else None, r["image_fpath"], None, r.get("split"))
            for r in records]


def source_items(source: Path) -> list[SourceItem]:
    if not source.exists():
        raise PipelineError(f"{source}: no such file or folder")
    if source.is_file() and source.suffix == ".json":
        return dataset_items(source)
    if source.is_file():
        if "idx" not in source.name:
            raise PipelineError(f"{source}: expected a folder of images, idx(.gz) files or a dataset.json")
        labels = Path(str(source).replace("images-idx3", "labels-idx1"))
        return idx_items([("train", source, labels if labels.exists() and labels != source else None)], None)
    pairs = find_idx_pairs(source)
    if pairs:
        names = FASHION_MNIST_CLASSES if "fashion" in str(source).lower() else None
        return idx_items(pairs, names)
    items = folder_items(source)
    if not items:
        raise PipelineError(f"{source}: no images found (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return items


# ---------------------------------------------------------------- building dataset.json

def prepare_image(image: Image.Image, size: int, channels: int) -> Image.Image:
    image.load()  # decode now so that a truncated file fails here
    image = image.convert("L" if channels == 1 else "RGB")
    if image.size != (size, size):
        image = image.resize((size, size), Image.Resampling.BICUBIC)
    return image


def build_dataset(source: Path, out_dir: Path, size: int, channels: int, limit: int | None,
                  holdout: float, seed: int, strict: bool, overwrite: bool,
                  progress: Callable[[Iterable], Iterator] = iter, labels: list[str] | None = None,
                  from_split: str | None = None, train_count: int | None = None) -> dict:
    """Write out_dir/dataset.json and out_dir/images/; returns counts. Leaves nothing half-written.
    `labels` and `from_split` keep only such items; `train_count` makes exactly the first N kept items
    the training split and the rest held out."""
    dataset_path = out_dir / "dataset.json"
    if dataset_path.exists() and not overwrite:
        raise PipelineError(f"{dataset_path} already exists (pass --overwrite to rebuild it)")
    items = source_items(source)
    if labels:
        found = {item.label for item in items}
        missing = [label for label in labels if label not in found]
        if missing:
            known = ", ".join(sorted(str(l) for l in found if l is not None)) or "none"
            raise PipelineError(f"{source}: no images labelled {', '.join(missing)} (labels: {known})")
        items = [item for item in items if item.label in labels]
    if from_split is not None:
        items = [item for item in items if item.origin == from_split]
    if train_count is not None:
        items = [dataclasses.replace(item, split="train" if i < train_count else "heldout")
                 for i, item in enumerate(items)]
    if limit is not None:
        items = _limit_per_split(items, limit)
    rng = random.Random(seed)
    image_dir = out_dir / "images"
    staging = out_dir / ".images.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    records, skipped = [], 0
    for i, item in enumerate(progress(items)):
        try:
            image = prepare_image(item.load(), size, channels)
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            if strict:
                shutil.rmtree(staging, ignore_errors=True)
                raise PipelineError(f"{item.name}: corrupt or unreadable image ({e}); "
                                    "drop --strict to skip such files") from None
            skipped += 1
            continue
        split = item.split or ("heldout" if rng.random() < holdout else "train")
        name = f"{i:06d}.png"
        image.save(staging / name)
        records.append({"image_fpath": f"images/{name}", "labels": [item.label] if item.label else [],
                        "split": split})
    if not records:
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError(f"{source}: no readable images ({skipped} skipped)")
    shutil.rmtree(image_dir, ignore_errors=True)
    staging.rename(image_dir)
    write_dataset_json(dataset_path, records, {"size": size, "channels": channels, "source": str(source)})
    counts = {"images": len(records), "skipped": skipped,
              "train": sum(r["split"] == "train" for r in records),
              "heldout": sum(r["split"] == "heldout" for r in records),
              "labels": len({r["labels"][0] for r in records if r["labels"]})}
    return counts


def _limit_per_split(items: list[SourceItem], limit: int) -> list[SourceItem]:
    """Keep the first `limit` training items (and as many held-out ones, at most, when the source splits)."""
    kept, seen = [], {}
    for item in items:
        key = item.split or "any"
        if seen.get(key, 0) < limit:
            kept.append(item)
            seen[key] = seen.get(key, 0) + 1
    return kept


def write_dataset_json(path: Path, records: list[dict], info: dict) -> None:
    """The seed's tinydb layout ({"_default": {"1": record, ...}}), plus an "info" table, written atomically."""
    with atomic_path(path) as tmp:
        db = TinyDB(tmp, indent=None)
        db.insert_multiple(records)
        db.table("info").insert(info)
        db.close()


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

    def take(self, indices: torch.Tensor) -> "Dataset":
        records = [self.records[i] for i in indices.tolist()]
        return Dataset(self.items[indices], self.labels[indices], self.label_names, self.is_heldout[indices],
                       self.path, records)

    def split(self, heldout: bool) -> "Dataset":
        return self.take((self.is_heldout if heldout else ~self.is_heldout).nonzero().flatten())

    def sample(self, count: int, seed: int = 0) -> "Dataset":
        """A fixed random subset (for evaluation)."""
        return self.take(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:count])

    def __len__(self) -> int:
        return len(self.items)

    def relabelled(self, names: list[str]) -> "Dataset":
        """The same items with their labels expressed in `names`; a label not among them becomes none."""
        mapping = torch.tensor([names.index(n) if n in names else -1 for n in self.label_names] + [-1])
        return Dataset(self.items, mapping[self.labels], list(names), self.is_heldout, self.path, self.records)


def label_tensors(records: list[dict]) -> tuple[torch.Tensor, list[str], torch.Tensor]:
    """Label ids (first label of each record, -1 if none), the sorted label names, and the held-out mask."""
    first = [str(r["labels"][0]) if r.get("labels") else None for r in records]
    names = sorted({name for name in first if name is not None})
    ids = torch.tensor([names.index(name) if name is not None else -1 for name in first], dtype=torch.long)
    heldout = torch.tensor([r.get("split") == "heldout" for r in records], dtype=torch.bool)
    return ids, names, heldout


def read_records(dataset_path: str | Path) -> tuple[list[dict], dict]:
    """The records of a dataset.json (in id order) and its info table."""
    dataset_path = Path(dataset_path)
    if not dataset_path.is_file():
        raise PipelineError(f"{dataset_path}: no such dataset file")
    try:
        with TinyDB(dataset_path, access_mode="r") as db:
            records = [dict(r) for r in sorted(db.all(), key=lambda r: r.doc_id)]
            info = db.table("info").all()
    except ValueError as e:  # json errors
        raise PipelineError(f"{dataset_path}: not a dataset.json ({e})") from None
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
    return Dataset(images, *label_tensors(records), dataset_path, records)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images.detach().float().add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).cpu()


def save_image_grid(images: torch.Tensor, path: str | Path, columns: int = 8) -> None:
    """Save float images in [-1, 1] (or uint8), shape (N, C, H, W), as one PNG grid."""
    images = images if images.dtype == torch.uint8 else to_uint8(images)
    n, c, h, w = images.shape
    rows = (n + columns - 1) // columns
    grid = torch.zeros(c, rows * (h + 2), columns * (w + 2), dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, columns)
        grid[:, r * (h + 2) + 1: r * (h + 2) + 1 + h, col * (w + 2) + 1: col * (w + 2) + 1 + w] = images[i]
    array = grid[0].numpy() if c == 1 else grid.permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
