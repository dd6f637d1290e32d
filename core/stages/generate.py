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
batches that no progress line names, and torchrun's processes share the batches out."""
from __future__ import annotations

import json
import os
import queue
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.distributed as dist

from core.artifacts import Artifact, atomic_write_json, file_record
from core.config import config_from_dict, load_json, option, to_dict
from core.console import notice
from core.data import crop_to_content, read_image_files, source_content_size, to_uint8, write_records
from core.errors import PipelineError
from core.model_artifacts import load_autoencoder, load_codebook, load_transformer
from core.models.autoencoder import Autoencoder
from core.models.codebook import SOMCodebook
from core.models.sampling import DecodeSettings, condition_tokens, generate_tokens
from core.models.transformer import TokenTransformer
from core.pictures import picture_bytes, save_image_grid, to_picture
from core.training import RUN_FILE, RunEnv, claim_out_dir, finish_run, setup_run

IMAGES_PER_FOLDER = 1000
LAYOUT = 2  # 1: one flat images/ folder, labels.json and the provenance in every record


@dataclass
class GenerateArgs:
    config_path: Path  # one entry per cascade level
    decoder_path: Path  # the autoencoder
    out_dir: Path
    num_images: int = 64
    seed: int = 0
    batch_size: int = 256
    fmt: str = "png"  # or "jpg"
    device: str = "auto"
    overwrite: bool = False
    use_cache: bool = True
    full_size: bool = False  # keep the padding that the dataset build added around smaller images
    progress: Callable[[Iterable], Iterator] = iter


@dataclass
class LevelConfig(DecodeSettings):
    model_path: str = option("")
    lr_codebook_path: str = option("")
    hr_codebook_path: str = option("")
    label: object = option(None, doc="null: drawn from the data's labels (none when there is a prompt); "
                                     "\"none\": unconditional; or a label name")
    prompt: object = option(None, doc="a caption to generate (models trained on captions); null: none (a cascade "
                                      "level: level 0's)")


@dataclass
class Level:
    settings: LevelConfig
    model: TokenTransformer
    coarse_book: SOMCodebook
    fine_book: SOMCodebook
    record: dict  # the level's settings with the sha256 of every file it uses
    cond_counts: torch.Tensor | None  # base level: condition tokens seen with each label in training


def parse_config(path: Path) -> list[LevelConfig]:
    raw = load_json(path)
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f"{path}: expected an object with one entry per cascade level (\"0\", \"1\", ...)")
    if sorted(raw, key=lambda k: int(k) if k.isdigit() else -1) != [str(i) for i in range(len(raw))]:
        raise PipelineError(f"{path}: levels must be numbered \"0\", \"1\", ... in order; found {', '.join(raw)}")
    levels = [config_from_dict(LevelConfig, raw[str(i)], source=f"{path} level {i}") for i in range(len(raw))]
    for i, level in enumerate(levels):
        for key in ("model_path", "lr_codebook_path", "hr_codebook_path"):
            if not getattr(level, key):
                raise PipelineError(f"{path} level {i}: '{key}' is missing")
            setattr(level, key, str(resolve_path(getattr(level, key), path)))
    return levels


def resolve_path(value: str, config_path: Path) -> Path:
    """A relative path is looked up from the current directory, then from the config file's folder."""
    candidate = Path(value)
    if candidate.is_absolute() or candidate.exists():
        return candidate
    beside = config_path.parent / candidate
    return beside if beside.exists() else candidate


def load_levels(configs: list[LevelConfig], source: Path) -> list[Level]:
    """Load every level's model and codebooks and check that they belong together."""
    levels = []
    for i, cfg in enumerate(configs):
        where = f"{source} level {i}"
        model, artifact = load_transformer(cfg.model_path)
        expected = "base" if i == 0 else "cascade"
        if model.shape.kind != expected:
            raise PipelineError(f"{where}: expected a {expected} model, {cfg.model_path} is a {model.shape.kind} model")
        records = {key: file_record(getattr(cfg, f"{key}_path")) for key in ("lr_codebook", "hr_codebook")}
        for key, record in records.items():
            trained_with = artifact.extra[key]
            if trained_with["sha256"] != record["sha256"]:
                raise PipelineError(f"{where}: {cfg.model_path} was trained with {key} {trained_with['path']}, "
                                    f"which differs from {key}_path {record['path']}")
        if levels and levels[-1].record["hr_codebook"]["sha256"] != records["lr_codebook"]["sha256"]:
            raise PipelineError(f"{where}: lr_codebook_path {cfg.lr_codebook_path} is not level {i - 1}'s "
                                f"hr_codebook_path {levels[-1].settings.hr_codebook_path}")
        record = {**to_dict(cfg), "model": file_record(cfg.model_path), **records}
        if cfg.prompt is None:  # provenance as it was before prompts
            del record["prompt"]
        levels.append(Level(cfg, model, load_codebook(cfg.lr_codebook_path)[0], load_codebook(cfg.hr_codebook_path)[0],
                            record, artifact.tensors.get("cond_counts")))
    check_prompts(levels, source)
    return levels


def level_prompt(levels: list[Level], i: int) -> str | None:
    """The prompt level i reads: its own, or level 0's."""
    own = levels[i].settings.prompt
    return own if own is not None or i == 0 else levels[0].settings.prompt


def check_prompts(levels: list[Level], source: Path) -> None:
    """Every prompt is a string that its level's model can read, before any image is made."""
    for i, level in enumerate(levels):
        prompt, where = level_prompt(levels, i), f"{source} level {i}"
        if level.settings.prompt is not None and not isinstance(level.settings.prompt, str):
            raise PipelineError(f"{where}: 'prompt' must be a string or null, got {json.dumps(level.settings.prompt)}")
        if prompt is None:
            continue
        tokenizer = level.model.tokenizer
        if tokenizer is None:
            if level.settings.prompt is not None:
                raise PipelineError(f"{where}: a prompt was given, but {level.settings.model_path} was trained "
                                    f"without captions (rebuild the dataset with captions and train it again)")
            continue  # a level without captions ignores level 0's prompt
        problem = tokenizer.problem(prompt)
        if problem:
            raise PipelineError(f"{where}: prompt {json.dumps(prompt)}: {problem}")


def prompt_ids(level: Level, prompt: str | None, batch: int, device: torch.device) -> torch.Tensor | None:
    """Caption ids (batch, text_len) of the prompt for a level whose model reads captions, else None."""
    tokenizer = level.model.tokenizer
    if tokenizer is None:
        return None
    return torch.tensor(tokenizer.encode(prompt), device=device).expand(batch, -1)


def load_generator(config_path: Path, decoder_path: Path, int8: bool = True) -> tuple[list[Level], Autoencoder, Artifact]:
    """The levels of a generation config and the autoencoder that decodes the last level's tokens,
    checked to fit each other."""
    levels = load_levels(parse_config(config_path), config_path)
    decoder, decoder_artifact = load_autoencoder(decoder_path, int8=int8)
    final = levels[-1].fine_book.cfg
    if final.image_C != decoder.cfg.latent_channel:
        raise PipelineError(f"{decoder_path} decodes {decoder.cfg.latent_channel}-channel feature maps, but level "
                            f"{len(levels) - 1}'s codebook {levels[-1].settings.hr_codebook_path} makes {final.image_C}")
    return levels, decoder, decoder_artifact


def move_generator(levels: list[Level], decoder: Autoencoder, device: torch.device) -> None:
    for level in levels:
        level.model.to(device)
        level.fine_book.to(device)
    decoder.to(device)


def resolve_label(value: object, names: list[str], where: str) -> int | None:
    """None: draw per image; -1: unconditional; else the label's index."""
    if value is None:
        return None
    if isinstance(value, str) and value.lower() == "none":
        return -1
    if isinstance(value, str) and value in names:
        return names.index(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
        return value
    known = ", ".join(names) if names else "none: the model is unconditional"
    raise PipelineError(f"{where}: unknown label {json.dumps(value)} (labels: {known})")


def image_generators(seed: int, indices: range) -> list[torch.Generator]:
    """One generator per image, from (seed, index): an image does not depend on the batch it is in."""
    return [torch.Generator().manual_seed(seed * 1_000_003 + index) for index in indices]


@torch.inference_mode()
def generate_batch(levels: list[Level], decoder: Autoencoder, indices: range, seed: int,
                   device: torch.device, use_cache: bool = True) -> tuple[torch.Tensor, list[int]]:
    """Images (B, C, H, W) in [-1, 1] and their label ids (-1: none) for the given image indices."""
    generators = image_generators(seed, indices)
    base = levels[0]
    shape = base.model.shape
    counts = base.cond_counts.float()
    wanted = resolve_label(base.settings.label, shape.label_names, "level 0")
    if wanted is None and base.settings.prompt is not None:  # a prompt says what to make: no label drawn
        wanted = -1
    labels = []
    for g in generators:
        if wanted is None and shape.num_labels:
            labels.append(int(torch.multinomial(counts[:shape.num_labels].sum(1) + 1e-9, 1, generator=g)))
        else:
            labels.append(-1 if wanted is None else wanted)
    if base.model.tokenizer is None:
        conds = [int(torch.multinomial(counts[label if label >= 0 else shape.num_labels] + 1e-9, 1, generator=g))
                 for label, g in zip(labels, generators)]
        tokens = torch.tensor(conds, device=device)[:, None]
    else:  # a model trained on captions predicts its condition token from the prompt and the label
        ids = torch.tensor([l if l >= 0 else shape.null_label for l in labels], device=device)
        text = prompt_ids(base, base.settings.prompt, len(labels), device)
        tokens = condition_tokens(base.model, ids, text, base.settings, generators)
    for i, level in enumerate(levels):
        override = resolve_label(level.settings.label, shape.label_names, f"level {i}") if i else None
        level_labels = labels if override is None else [override] * len(labels)
        ids = torch.tensor([l if l >= 0 else level.model.shape.null_label for l in level_labels], device=device)
        text = prompt_ids(level, level_prompt(levels, i), len(labels), device)
        tokens = generate_tokens(level.model, ids, tokens, level.settings, generators, use_cache, text=text)
    final = levels[-1].fine_book
    images = decoder.decoder(final.lookup(tokens)).float().clamp(-1, 1)
    return images.cpu(), labels


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

def run(args: GenerateArgs) -> Path:
    """Generate the images into out_dir, with grid.png and dataset.json. A run stopped midway continues:
    batches already written by the same run are kept. Under torchrun, each process makes its share."""
    config_path, decoder_path, out_dir, num_images = args.config_path, args.decoder_path, args.out_dir, args.num_images
    levels, decoder, decoder_artifact = load_generator(config_path, decoder_path)
    crop = None if args.full_size else source_content_size(decoder_artifact.extra)
    env = setup_run(args.device, args.seed)
    provenance = {"seed": args.seed, "levels": [level.record for level in levels], "decoder": file_record(decoder_path),
                  **({"cropped_to": crop} if crop else {})}
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
    move_generator(levels, decoder, env.device)
    writer = BatchWriter(out_dir, open_log(progress_dir, env.rank), args.fmt)
    try:
        for number in args.progress(batches):
            indices = range(number * batch_size, min(num_images, (number + 1) * batch_size))
            images, labels = generate_batch(levels, decoder, indices, args.seed, env.device, args.use_cache)
            writer.put(Batch(number, indices, to_uint8(crop_to_content(images, crop)), labels))
    finally:
        writer.close()
    barrier(env)
    if env.is_main:
        write_dataset(out_dir, levels[0].model.shape.label_names, read_progress(progress_dir), batch_size,
                      {**provenance, "format": args.fmt, "num_images": num_images, "batch_size": batch_size}, args.fmt,
                      caption=levels[0].settings.prompt)
    finish_run(env)
    return out_dir / "dataset.json"


def barrier(env: RunEnv) -> None:
    if env.world_size > 1:
        dist.barrier()


def clear_outputs(out_dir: Path) -> None:
    """--overwrite: what an earlier run generated goes (run.json is already the new run's)."""
    for name in ("images", "progress"):
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for path in [*out_dir.glob("dataset*.json"), out_dir / "grid.png", out_dir / "labels.json"]:
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
