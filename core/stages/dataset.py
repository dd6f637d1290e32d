"""The dataset stage: the seed's tinydb dataset.json and its resized images, built from an image folder,
MNIST-format idx files, or an existing dataset.json (a subset of it). Captions come from a text file beside
each image (photo.png: photo.txt), from a CSV or JSON file of file -> caption, or from the source dataset.json."""
from __future__ import annotations

import csv
import dataclasses
import gzip
import random
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from core.config import load_json
from core.data import read_records, write_dataset_json
from core.errors import PipelineError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
              0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


FITS = ("pad", "crop", "resize")
# held-out images a folder keeps at least (a quarter of a folder under 40): the report's k-NN metrics need
# more than k=5 of them
MIN_HELDOUT = 10


@dataclass
class DatasetArgs:
    source: Path
    out_dir: Path
    size: int = 32
    channels: int | None = None  # 1 or 3; None: 3 if any image has colour, else 1
    fit: str = "pad"  # how an image of another size becomes size x size: one of FITS
    limit: int | None = None  # at most N images (per split, for idx files)
    holdout: float = 0.1  # the share held out (folders; idx files use t10k)
    seed: int = 0
    strict: bool = False  # refuse a corrupt image instead of skipping it
    overwrite: bool = False
    labels: list[str] | None = None  # keep only images with one of these labels
    exclude_labels: list[str] | None = None  # drop the images with one of these labels
    from_split: str | None = None  # keep only images of this split of the source
    train_count: int | None = None  # the first N kept images are the training split, the rest held out
    train_per_class: int | None = None  # keep the first N training images of each label (held-out ones all)
    captions: Path | None = None  # CSV (file,caption) or JSON ({file: caption}) of the images' captions
    progress: Callable[[Iterable], Iterator] = iter


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
    sizes: tuple | None = None  # (source_size, content_size) recorded by an earlier build (dataset.json sources)
    caption: str | None = None
    key: str = ""  # how a captions file names it: its path in the source folder (or dataset.json), or FILE[i]


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
                                    f"{images_path.name}[{i}]", split, split, key=f"{images_path.name}[{i}]"))
    return items


def folder_items(folder: Path) -> list[SourceItem]:
    """Every image under `folder`; an image in a sub-folder takes the sub-folder's name as its label."""
    items = []
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        relative = path.relative_to(folder)
        label = relative.parts[0] if len(relative.parts) > 1 else None
        items.append(SourceItem(lambda p=path: Image.open(p), label, str(path), None,
                                caption=sidecar_caption(path), key=relative.as_posix()))
    return items


def sidecar_caption(image_path: Path) -> str | None:
    """The caption in the text file beside an image (photo.png: photo.txt), if there is one."""
    text_path = image_path.with_suffix(".txt")
    if not text_path.is_file():
        return None
    try:
        return " ".join(text_path.read_text().split()) or None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{text_path}: cannot read caption ({e})") from None


def dataset_items(dataset_path: Path) -> list[SourceItem]:
    """The images of an existing dataset.json, with their labels; their split is drawn anew."""
    records, _ = read_records(dataset_path)
    if records and "image_fpath" not in records[0]:
        raise PipelineError(f"{dataset_path}: expected an image dataset")
    return [SourceItem(lambda p=dataset_path.parent / r["image_fpath"]: Image.open(p),
                       str(r["labels"][0]) if r.get("labels") else None, r["image_fpath"], None, r.get("split"),
                       (r["source_size"], r["content_size"]) if "content_size" in r else None,
                       caption=r.get("caption"), key=r["image_fpath"])
            for r in records]


def read_captions(path: Path) -> dict[str, str]:
    """file -> caption from a CSV (two columns, file and caption; a header row naming them is skipped) or a
    JSON file (an object {file: caption}, or a list of {"file": ..., "caption": ...})."""
    if path.suffix.lower() == ".json":
        raw = load_json(path)
        if isinstance(raw, list) and all(isinstance(r, dict) and "file" in r and "caption" in r for r in raw):
            raw = {r["file"]: r["caption"] for r in raw}
        if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
            raise PipelineError(f"{path}: expected {{\"file\": \"caption\", ...}} or a list of "
                                f"{{\"file\": ..., \"caption\": ...}}")
        return {str(k): " ".join(v.split()) for k, v in raw.items()}
    try:
        with open(path, newline="") as f:
            rows = list(csv.reader(f))
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such captions file") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise PipelineError(f"{path}: cannot read captions ({e})") from None
    if rows and [c.strip().lower() for c in rows[0][:2]] in (["file", "caption"], ["image", "caption"]):
        rows = rows[1:]
    bad = next((i for i, row in enumerate(rows) if row and len(row) != 2), None)
    if bad is not None:
        raise PipelineError(f"{path}: row {bad + 1} has {len(rows[bad])} columns, expected 2 (file,caption)")
    return {row[0].strip(): " ".join(row[1].split()) for row in rows if row}


def attach_captions(items: list[SourceItem], captions: dict[str, str], path: Path) -> list[SourceItem]:
    """The items with the captions a captions file gives them, by their path in the source, or by their file
    name when that is unique. A caption naming no image is refused (a typo would silently lose it)."""
    by_key = {item.key: i for i, item in enumerate(items)}
    names: dict[str, list[int]] = {}
    for i, item in enumerate(items):
        names.setdefault(Path(item.key).name, []).append(i)
    found, missing = {}, []
    for key, caption in captions.items():
        index = by_key.get(key, names[key][0] if len(names.get(key, [])) == 1 else None)
        if index is None:
            missing.append(key)
        else:
            found[index] = caption
    if missing:
        raise PipelineError(f"{path}: {len(missing)} caption(s) name no image of the source, e.g. '{missing[0]}' "
                            f"(name an image by its path in the source folder, e.g. '{items[0].key}')")
    return [dataclasses.replace(item, caption=found.get(i, item.caption)) for i, item in enumerate(items)]


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

def flatten_alpha(image: Image.Image) -> Image.Image:
    """An image with transparency composited onto white (icons and cut-outs are drawn for a light
    background); others unchanged."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image


def border_colour(image: Image.Image) -> int | tuple[int, ...]:
    """The median colour of the image's outermost pixels: what padding fills with."""
    array = np.asarray(image)
    ring = np.concatenate([array[0], array[-1], array[:, 0], array[:, -1]])
    median = np.median(ring, axis=0).round().astype(int)
    return int(median) if median.ndim == 0 else tuple(int(v) for v in median)


def fit_image(image: Image.Image, size: int, fit: str) -> tuple[Image.Image, tuple[int, int]]:
    """The image as size x size, and the size of the part that holds it (its content box, centred).
    pad: centred on its border colour, scaled down first (aspect kept) only if it does not fit: an
    image that fits keeps every pixel. crop: the centred square, resized only if it is not size x size.
    resize: resampled to size x size."""
    width, height = image.size
    if fit == "resize":
        return image.resize((size, size), Image.Resampling.BICUBIC) if image.size != (size, size) else image, (size, size)
    if fit == "crop":
        side = min(width, height)
        left, top = (width - side) // 2, (height - side) // 2
        square = image.crop((left, top, left + side, top + side))
        return square.resize((size, size), Image.Resampling.BICUBIC) if side != size else square, (size, size)
    if width > size or height > size:
        scale = size / max(width, height)
        image = image.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)
        width, height = image.size
    canvas = Image.new(image.mode, (size, size), border_colour(image))
    canvas.paste(image, ((size - width) // 2, (size - height) // 2))
    return canvas, (width, height)


def has_colour(image: Image.Image) -> bool:
    if image.mode in ("1", "L", "LA", "I", "I;16", "F"):
        return False
    array = np.asarray(flatten_alpha(image).convert("RGB")).astype(np.int16)
    return bool((np.abs(array[..., 0] - array[..., 1]) + np.abs(array[..., 1] - array[..., 2])).max() > 8)


def detect_channels(items: list[SourceItem], sample: int = 200) -> int:
    """3 if any of (up to) `sample` images spread over the source has colour, else 1."""
    step = max(1, len(items) // sample)
    for item in items[::step]:
        try:
            if has_colour(item.load()):
                return 3
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError):
            continue  # the build itself counts (or refuses) unreadable images
    return 1


def prepare_image(image: Image.Image, size: int, channels: int, fit: str) -> tuple[Image.Image, tuple[int, int]]:
    """The image as stored, and its content box (see fit_image)."""
    image.load()  # decode now so that a truncated file fails here
    image = flatten_alpha(image).convert("L" if channels == 1 else "RGB")
    return fit_image(image, size, fit)


def common_size(records: list[dict], key: str) -> list[int] | None:
    """The value of `key` shared by every record, or None when they differ."""
    values = {tuple(r[key]) for r in records}
    return list(values.pop()) if len(values) == 1 else None


def filter_labels(items: list[SourceItem], source: Path, *, keep: list[str] | None,
                  drop: list[str] | None) -> list[SourceItem]:
    """The items with a label in `keep` (all when None) and none in `drop`; a named label the source lacks
    is refused, so that a typo does not silently keep or drop nothing."""
    found = {item.label for item in items}
    missing = [label for label in (keep or []) + (drop or []) if label not in found]
    if missing:
        known = ", ".join(sorted(str(l) for l in found if l is not None)) or "none"
        raise PipelineError(f"{source}: no images labelled {', '.join(missing)} (labels: {known})")
    return [item for item in items if (not keep or item.label in keep) and item.label not in (drop or [])]


def run(args: DatasetArgs) -> dict:
    """Write out_dir/dataset.json and out_dir/images/; returns counts. Leaves nothing half-written."""
    source, out_dir, size, channels, limit = args.source, args.out_dir, args.size, args.channels, args.limit
    holdout, strict, labels, from_split, train_count = (args.holdout, args.strict, args.labels, args.from_split,
                                                        args.train_count)
    dataset_path = out_dir / "dataset.json"
    if dataset_path.exists() and not args.overwrite:
        raise PipelineError(f"{dataset_path} already exists (pass --overwrite to rebuild it)")
    items = source_items(source)
    if args.captions is not None:
        items = attach_captions(items, read_captions(args.captions), args.captions)
    items = filter_labels(items, source, keep=labels, drop=args.exclude_labels)
    if from_split is not None:
        items = [item for item in items if item.origin == from_split]
    if train_count is not None:
        if train_count >= len(items):
            kept = " ".join(part for part in (f"labelled {', '.join(labels)}" if labels else "",
                                              f"of its {from_split} split" if from_split else "") if part)
            raise PipelineError(f"{source}: {len(items)} images{' ' + kept if kept else ''}; --train-count "
                                f"{train_count} would hold none out to compare with")
        items = [dataclasses.replace(item, split="train" if i < train_count else "heldout")
                 for i, item in enumerate(items)]
    if limit is not None:
        items = _limit_per_split(items, limit)
    if args.fit not in FITS:
        raise PipelineError(f"--fit must be one of {', '.join(FITS)}, got '{args.fit}'")
    channels = channels or detect_channels(items)
    rng = random.Random(args.seed)
    small_heldout = small_folder_heldout(items, holdout, rng)
    image_dir = out_dir / "images"
    staging = out_dir / ".images.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    records, skipped, per_class = [], 0, {}
    for i, item in enumerate(args.progress(items)):
        try:
            source_image = item.load()
            source_size = source_image.size
            image, content_size = prepare_image(source_image, size, channels, args.fit)
            if item.sizes and source_size == (size, size):  # a stored image kept as it is: its origin stays
                source_size, content_size = item.sizes
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
            if strict:
                shutil.rmtree(staging, ignore_errors=True)
                raise PipelineError(f"{item.name}: corrupt or unreadable image ({e}); "
                                    "drop --strict to skip such files") from None
            skipped += 1
            continue
        if item.split:
            split = item.split
        elif small_heldout is not None:
            split = "heldout" if i in small_heldout else "train"
        else:
            split = "heldout" if rng.random() < holdout else "train"
        if args.train_per_class is not None and split == "train":
            if per_class.get(item.label, 0) >= args.train_per_class:
                continue  # the label's quota of training images is full (held-out images are all kept)
            per_class[item.label] = per_class.get(item.label, 0) + 1
        name = f"{i:06d}.png"
        image.save(staging / name)
        records.append({"image_fpath": f"images/{name}", "labels": [item.label] if item.label else [],
                        "split": split, "source_size": list(source_size), "content_size": list(content_size),
                        **({"caption": item.caption} if item.caption else {})})
    if not records:
        shutil.rmtree(staging, ignore_errors=True)
        raise PipelineError(f"{source}: no readable images ({skipped} skipped)")
    shutil.rmtree(image_dir, ignore_errors=True)
    staging.rename(image_dir)
    write_dataset_json(dataset_path, records, {"size": size, "channels": channels, "source": str(source),
                                               "fit": args.fit, "source_size": common_size(records, "source_size"),
                                               "content_size": common_size(records, "content_size")})
    counts = {"images": len(records), "skipped": skipped, "channels": channels,
              "train": sum(r["split"] == "train" for r in records),
              "heldout": sum(r["split"] == "heldout" for r in records),
              "labels": len({r["labels"][0] for r in records if r["labels"]}),
              "captions": sum("caption" in r for r in records)}
    return counts


def small_folder_heldout(items: list[SourceItem], holdout: float, rng: random.Random) -> set[int] | None:
    """For a folder whose held-out share would hold fewer than MIN_HELDOUT images: the indices of exactly
    MIN_HELDOUT of its images (a quarter of a folder under 4 x MIN_HELDOUT), drawn at random. None for a
    larger folder, whose images are held out one by one with probability `holdout`."""
    unsplit = [i for i, item in enumerate(items) if item.split is None]
    wanted = min(MIN_HELDOUT, len(unsplit) // 4)
    if holdout <= 0 or holdout * len(unsplit) >= wanted:
        return None
    return set(rng.sample(unsplit, wanted))


def _limit_per_split(items: list[SourceItem], limit: int) -> list[SourceItem]:
    """Keep the first `limit` training items (and as many held-out ones, at most, when the source splits)."""
    kept, seen = [], {}
    for item in items:
        key = item.split or "any"
        if seen.get(key, 0) < limit:
            kept.append(item)
            seen[key] = seen.get(key, 0) + 1
    return kept
