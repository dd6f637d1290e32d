"""The generation stage: the cascade run level by level, from the base model's condition token to the
final level's tokens, decoded to images.

The out dir, for any number of images:
    images/000/000000.png ...  the images, 1,000 per folder
    progress/<rank>.jsonl      append-only, one line per finished batch (its labels), written once its
                               images are on disk
    dataset.json               tinydb: a small record per image (path, labels, index, run), the run's
                               provenance once (table "runs"); part files beside it past 250,000 images
    grid.png, run.json

Images are made in fixed batches of consecutive indices, and each image depends only on the seed and its
index: a batch is the same whoever makes it and whenever. A run killed at any moment continues with the
batches that no progress line names, and torchrun's processes share the batches out.

Generation from a file of prompts, one image set per prompt: the k-th prompt's images are a generation run of
their own in OUT/set_k (with seed + k, level 0's prompt set to it), and OUT gathers them: dataset.json of every
set's images with their captions (a captioned dataset the other stages accept), grid.png with one row per
prompt, and prompts.json (each prompt, its folder and seed)."""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from core.artifacts import atomic_write_json
from core.config import to_dict
from core.console import notice
from core.data import (crop_to_content, read_image_files, read_records, read_table, source_content_size, to_uint8,
                       write_dataset_json, write_records)
from core.errors import PipelineError
from core.generator import Generator
from core.pictures import picture_bytes, save_image_grid, to_picture
from core.training import RUN_FILE, RunEnv, claim_out_dir, finish_run, pause_point, setup_run

IMAGES_PER_FOLDER = 1000
GRID_COLUMNS = 8  # images per prompt in the grid of a prompts run
LAYOUT = 2  # 1: one flat images/ folder, labels.json and the provenance in every record


@dataclass
class GenerateArgs:
    config_path: Path  # one entry per cascade level
    decoder_path: Path  # the autoencoder
    out_dir: Path
    overrides: tuple[str, ...] = ()  # LEVEL.KEY=VALUE settings changed from the config's (--set)
    num_images: int = 64
    seed: int = 0
    batch_size: int = 256
    fmt: str = "png"  # or "jpg"
    device: str = "auto"
    overwrite: bool = False
    use_cache: bool = True
    full_size: bool = False  # keep the padding that the dataset build added around smaller images
    progress: Callable[[Iterable], Iterator] = iter


# ---------------------------------------------------------------- images on disk

def image_path(index: int, fmt: str) -> str:
    """Where image `index` lies, relative to the out dir: 1,000 images per folder."""
    return f"images/{index // IMAGES_PER_FOLDER:03d}/{index:06d}.{'png' if fmt == 'png' else 'jpg'}"


def image_file(image: torch.Tensor, fmt: str) -> bytes:
    """The file of one generated image (uint8, C x H x W): every image becomes its file here."""
    return picture_bytes(to_picture(image), fmt)


@dataclass
class Batch:
    number: int
    indices: range
    images: torch.Tensor  # uint8 (B, C, H, W), on the CPU
    labels: list[int]  # label ids, -1: none


class BatchWriter:
    """Writes finished batches in a background thread, so that encoding and writing the images overlap
    with making the next batch. A batch counts as done once its line is in the progress log, and the
    line is written only after its images are on disk: the batches waiting together share one sync
    instead of one fsync per file."""

    def __init__(self, out_dir: Path, log_path: Path, fmt: str, depth: int = 4):
        self.out_dir, self.log_path, self.fmt = out_dir, log_path, fmt
        self.pending: queue.Queue[Batch | None] = queue.Queue(maxsize=depth)
        self.error: BaseException | None = None
        self.folders: set[Path] = set()
        self.logged = 0  # batches this process has logged
        self.thread = threading.Thread(target=self._work, name="image-writer", daemon=True)
        self.thread.start()

    def put(self, batch: Batch) -> None:
        self._check()
        self.pending.put(batch)

    def close(self) -> None:
        """Write what is queued and stop."""
        self.pending.put(None)
        self.thread.join()
        self._check()

    def _check(self) -> None:
        if self.error is not None:
            raise PipelineError(f"cannot write the images in {self.out_dir}: {self.error}")

    def _work(self) -> None:
        finished = False
        while not finished:
            group = [self.pending.get()]
            while group[-1] is not None and not self.pending.empty():
                group.append(self.pending.get())
            finished = group[-1] is None
            batches = [b for b in group if b is not None]
            if self.error is None and batches:  # after an error, keep taking batches so that put() never blocks
                try:
                    self._commit(batches)
                except Exception as e:  # noqa: BLE001 (handed to the main thread, which raises it)
                    self.error = e

    def _commit(self, batches: list[Batch]) -> None:
        for batch in batches:
            for index, image in zip(batch.indices, batch.images):
                path = self.out_dir / image_path(index, self.fmt)
                if path.parent not in self.folders:
                    path.parent.mkdir(parents=True, exist_ok=True)
                    self.folders.add(path.parent)
                path.write_bytes(image_file(image, self.fmt))
        if hasattr(os, "sync"):
            os.sync()  # the images on disk before the lines that say they are done
        with open(self.log_path, "a") as log:
            log.write("".join(json.dumps({"batch": b.number, "labels": b.labels}) + "\n" for b in batches))
            log.flush()
            os.fsync(log.fileno())
        self.logged += len(batches)
        pause_point(self.logged)


def read_progress(progress_dir: Path) -> dict[int, list[int]]:
    """The finished batches and their images' label ids, from every process's log. A line cut short by
    a kill is not a finished batch."""
    done = {}
    for path in sorted(progress_dir.glob("*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
                done[int(entry["batch"])] = [int(label) for label in entry["labels"]]
            except (ValueError, KeyError, TypeError):
                continue
    return done


def open_log(progress_dir: Path, rank: int) -> Path:
    """This process's log, ending on a whole line (a kill may have cut the last one short)."""
    progress_dir.mkdir(parents=True, exist_ok=True)
    path = progress_dir / f"{rank}.jsonl"
    if path.exists():
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
    return path


# ---------------------------------------------------------------- the run

def run(args: GenerateArgs, generator: Generator | None = None) -> Path:
    """Generate the images into out_dir, with grid.png and dataset.json, by the generator of args.config_path
    and args.decoder_path, or by `generator` when one is given (already loaded). A run stopped midway
    continues: batches already written by the same run are kept. Under torchrun, each process makes its share."""
    out_dir, num_images = args.out_dir, args.num_images
    generator = generator or Generator.load(args.config_path, args.decoder_path, overrides=args.overrides)
    crop = None if args.full_size else source_content_size(generator.decoder_artifact.extra)
    env = setup_run(args.device, args.seed)
    provenance = {"seed": args.seed, **generator.provenance(), **({"cropped_to": crop} if crop else {})}
    claim_out_dir(out_dir, {"provenance": provenance, "format": args.fmt, "num_images": num_images, "layout": LAYOUT},
                  resume=False, overwrite=args.overwrite, env=env)
    if args.overwrite and env.is_main:
        clear_outputs(out_dir)
    barrier(env)
    batch_size = run_batch_size(out_dir, args.batch_size, env)
    progress_dir = out_dir / "progress"
    done = read_progress(progress_dir)
    barrier(env)  # every process has read the logs before any writes to them
    batches = [k for k in range((num_images + batch_size - 1) // batch_size) if k not in done][env.rank::env.world_size]
    generator.to(env.device)
    writer = BatchWriter(out_dir, open_log(progress_dir, env.rank), args.fmt)
    try:
        for number in args.progress(batches):
            indices = range(number * batch_size, min(num_images, (number + 1) * batch_size))
            images, labels = generator.sample(indices, args.seed, args.use_cache)
            writer.put(Batch(number, indices, to_uint8(crop_to_content(images, crop)), labels))
    finally:
        writer.close()
    barrier(env)
    if env.is_main:
        write_dataset(out_dir, generator.label_names, read_progress(progress_dir), batch_size,
                      {**provenance, "format": args.fmt, "num_images": num_images, "batch_size": batch_size}, args.fmt,
                      caption=generator.prompt)
        atomic_write_json(out_dir / "generate.json", generator.config(out_dir))
    finish_run(env)
    return out_dir / "dataset.json"


def barrier(env: RunEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def clear_outputs(out_dir: Path) -> None:
    """--overwrite: what an earlier run generated goes (run.json is already the new run's)."""
    for name in ("images", "progress"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for path in [*out_dir.glob("dataset*.json"), out_dir / "grid.png", out_dir / "labels.json", out_dir / "generate.json"]:
        path.unlink(missing_ok=True)


def run_batch_size(out_dir: Path, asked: int, env: RunEnv) -> int:
    """The batch size the run in out_dir started with, which a continuing run keeps: batches are fixed,
    so that it makes exactly the images of an uninterrupted run."""
    run_file = out_dir / RUN_FILE
    saved = json.loads(run_file.read_text())
    if "batch_size" not in saved:
        if env.is_main:
            atomic_write_json(run_file, {**saved, "batch_size": asked})
        return asked
    if saved["batch_size"] != asked:
        notice(f"{out_dir} holds a run made in batches of {saved['batch_size']}: it continues with them")
    return saved["batch_size"]


def write_dataset(out_dir: Path, names: list[str], done: dict[int, list[int]], batch_size: int, run_record: dict,
                  fmt: str, caption: str | None = None) -> None:
    """grid.png of the first 64 images, and dataset.json: one small record per image, the run once."""
    num_images = run_record["num_images"]
    missing = [k for k in range((num_images + batch_size - 1) // batch_size) if k not in done]
    if missing:
        raise PipelineError(f"{out_dir}: batches {missing[:5]} were not written; run the same command again")
    grid = read_image_files([out_dir / image_path(i, fmt) for i in range(min(num_images, 64))])
    save_image_grid(grid, out_dir / "grid.png", columns=8)

    captioned = {"caption": caption} if caption is not None else {}

    def records() -> Iterator[dict]:
        for number in range((num_images + batch_size - 1) // batch_size):
            for offset, label in enumerate(done[number]):
                index = number * batch_size + offset
                yield {"image_fpath": image_path(index, fmt), "labels": [names[label]] if label >= 0 else [],
                       "split": "train", **captioned, "index": index, "run": 1}

    info = {"kind": "generated", "channels": int(grid.shape[1]), "size": int(grid.shape[-1]), "images": num_images}
    write_records(out_dir / "dataset.json", records(), info, {"runs": [run_record]})


# ---------------------------------------------------------------- generation from prompts

@dataclass
class PromptsArgs:
    generate: GenerateArgs  # num_images: per prompt; out_dir: where the sets go
    prompts_path: Path
    progress: Callable[[Iterable], Iterator] = iter


def read_prompts(path: Path) -> list[str]:
    """One prompt per line; empty lines and lines starting with # are skipped."""
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise PipelineError(f"{path}: no such prompts file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: cannot read prompts ({e})") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise PipelineError(f"{path}: no prompts (one per line)")
    return prompts


def run_prompts(args: PromptsArgs) -> Path:
    """Generate every prompt's set (a set already made by the same run is kept), then gather them. The models
    are loaded once, and every prompt is checked before any image is made."""
    out_dir = args.generate.out_dir
    prompts = read_prompts(args.prompts_path)
    generator = Generator.load(args.generate.config_path, args.generate.decoder_path, overrides=args.generate.overrides)
    prompted = [generator.with_prompt(prompt, f"{args.prompts_path} line {k + 1}") for k, prompt in enumerate(prompts)]
    sets = []
    for k, (prompt, prompt_generator) in enumerate(args.progress(list(zip(prompts, prompted)))):
        folder = out_dir / f"set_{k:03d}"
        levels_config = {str(i): to_dict(level.settings) for i, level in enumerate(prompt_generator.levels)}
        atomic_write_json(folder / "generate.json", levels_config)
        seed = args.generate.seed + k
        run(replace(args.generate, config_path=folder / "generate.json", out_dir=folder, seed=seed,
                               progress=iter), prompt_generator)
        sets.append({"prompt": prompt, "folder": folder.name, "seed": seed})
    return gather(out_dir, sets)


def gather(out_dir: Path, sets: list[dict]) -> Path:
    """OUT/dataset.json of every set's records (paths into the sets), grid.png and prompts.json."""
    records, info, rows, runs = [], {}, [], []
    for entry in sets:
        set_records, info = read_records(out_dir / entry["folder"] / "dataset.json")
        runs += read_table(out_dir / entry["folder"] / "dataset.json", "runs")
        records += [{**r, "image_fpath": f"{entry['folder']}/{r['image_fpath']}", "run": len(runs)}
                    for r in set_records]
        rows += [out_dir / entry["folder"] / r["image_fpath"] for r in set_records[:GRID_COLUMNS]]
    save_image_grid(read_image_files(rows), out_dir / "grid.png", columns=GRID_COLUMNS)
    write_dataset_json(out_dir / "dataset.json", records, {**info, "images": len(records), "prompts": len(sets)},
                       {"runs": runs})
    atomic_write_json(out_dir / "prompts.json", {"sets": sets, "grid": "grid.png: one row per prompt, in this order"})
    return out_dir / "dataset.json"
