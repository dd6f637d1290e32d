"""The generation stage: the cascade run level by level, from the base model's condition token to the
final level's tokens, decoded to images, each recorded with its provenance in a tinydb dataset.json."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core.artifacts import atomic_path, file_record
from core.config import config_from_dict, load_json, option, to_dict
from core.data import read_image_files, write_dataset_json
from core.errors import PipelineError
from core.model_artifacts import load_autoencoder, load_codebook, load_transformer
from core.models.autoencoder import Autoencoder
from core.models.codebook import SOMCodebook
from core.models.sampling import DecodeSettings, condition_tokens, generate_tokens
from core.models.transformer import TokenTransformer
from core.pictures import save_image_grid, save_picture, to_picture
from core.training import claim_out_dir, pick_device


@dataclass
class GenerateArgs:
    config_path: Path  # one entry per cascade level
    decoder_path: Path  # the autoencoder
    out_dir: Path
    num_images: int = 64
    seed: int = 0
    batch_size: int = 64
    fmt: str = "png"  # or "jpg"
    device: str = "auto"
    overwrite: bool = False
    use_cache: bool = True
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


@torch.no_grad()
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
        tokens = generate_tokens(level.model, ids, tokens, level.settings, generators, use_cache, text)
    final = levels[-1].fine_book
    images = decoder.decoder(final.lookup(tokens)).float().clamp(-1, 1)
    return images.cpu(), labels


def run(args: GenerateArgs) -> Path:
    """Generate the images into out_dir/images, with grid.png and dataset.json. A run stopped midway
    continues: images already written by the same run are kept."""
    config_path, decoder_path, out_dir, num_images = args.config_path, args.decoder_path, args.out_dir, args.num_images
    seed, batch_size, fmt, overwrite = args.seed, args.batch_size, args.fmt, args.overwrite
    device = pick_device(args.device)
    levels = load_levels(parse_config(config_path), config_path)
    decoder, _ = load_autoencoder(decoder_path)
    final = levels[-1].fine_book.cfg
    if final.image_C != decoder.cfg.latent_channel:
        raise PipelineError(f"{decoder_path} decodes {decoder.cfg.latent_channel}-channel feature maps, but level "
                            f"{len(levels) - 1}'s codebook {levels[-1].settings.hr_codebook_path} makes {final.image_C}")
    provenance = {"seed": seed, "levels": [level.record for level in levels], "decoder": file_record(decoder_path)}
    run_config = {"provenance": provenance, "format": fmt, "num_images": num_images}
    claim_out_dir(out_dir, run_config, resume=False, overwrite=overwrite)
    labels_file = out_dir / "labels.json"  # labels of the images written so far, for a run that continues
    if overwrite:
        labels_file.unlink(missing_ok=True)
    for level in levels:
        level.model.to(device)
        level.fine_book.to(device)
    decoder.to(device)
    names = levels[0].model.shape.label_names
    image_dir = out_dir / "images"
    image_dir.mkdir(parents=True, exist_ok=True)
    suffix = "png" if fmt == "png" else "jpg"
    known = json.loads(labels_file.read_text()) if labels_file.exists() else {}
    starts = range(0, num_images, batch_size)
    for start in args.progress(starts):
        indices = range(start, min(num_images, start + batch_size))
        if all(str(i) in known and (image_dir / f"{i:06d}.{suffix}").exists() for i in indices):
            continue
        images, labels = generate_batch(levels, decoder, indices, seed, device, args.use_cache)
        for index, image, label in zip(indices, images, labels):
            save_picture(to_picture(image), image_dir / f"{index:06d}.{suffix}", fmt)
            known[str(index)] = label
        with atomic_path(labels_file) as tmp:
            tmp.write_text(json.dumps(known))
    caption = {"caption": levels[0].settings.prompt} if levels[0].settings.prompt is not None else {}
    records = [{"image_fpath": f"images/{i:06d}.{suffix}",
                "labels": [names[known[str(i)]]] if known[str(i)] >= 0 else [], "split": "train", **caption,
                "provenance": {"seed": seed, "index": i, "levels": provenance["levels"], "decoder": provenance["decoder"]}}
               for i in range(num_images)]
    grid = read_image_files([image_dir / f"{i:06d}.{suffix}" for i in range(min(num_images, 64))])
    save_image_grid(grid, out_dir / "grid.png", columns=8)
    write_dataset_json(out_dir / "dataset.json", records, {"kind": "generated", "channels": int(grid.shape[1]),
                                                           "size": int(grid.shape[-1])})
    return out_dir / "dataset.json"
