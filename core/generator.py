"""A generator: the levels of a generation config (each a transformer with the codebooks it reads and
writes) and the autoencoder that decodes the last level's tokens, checked to fit each other. Generation,
prompts, the export and the benches make images through it.

    generator = Generator.load(config_path, decoder_path).to(device)
    images, labels = generator.sample(range(64), seed=0)

Each image depends only on the seed and its index, not on the batch it is made in."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from core.artifacts import Artifact, file_record
from core.config import config_from_dict, load_config_file, option, to_dict
from core.errors import PipelineError
from core.model_artifacts import load_autoencoder, load_codebook, load_transformer
from core.models.autoencoder import Autoencoder
from core.models.codebook import SOMCodebook
from core.models.sampling import DecodeSettings, condition_tokens, generate_tokens
from core.models.transformer import TokenTransformer


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
    drawn_labels: list[int] | None = None  # base level of a tuned model: the labels drawn by default (its own)


def parse_config(path: Path, overrides: Sequence[str] = ()) -> list[LevelConfig]:
    """The levels of a generation config file, with `overrides` ("LEVEL.KEY=VALUE", VALUE in JSON or a plain
    string) applied before the settings are checked, as if the file said so."""
    raw = load_config_file(path)
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f"{path}: expected an object with one entry per cascade level (\"0\", \"1\", ...)")
    if sorted(raw, key=lambda k: int(k) if k.isdigit() else -1) != [str(i) for i in range(len(raw))]:
        raise PipelineError(f"{path}: levels must be numbered \"0\", \"1\", ... in order; found {', '.join(raw)}")
    for override in overrides:
        level, key, value = parse_override(override, len(raw))
        if isinstance(raw[level], dict):  # else config_from_dict names the level that is not an object
            raw[level][key] = value
    levels = [config_from_dict(LevelConfig, raw[str(i)], source=f"{path} level {i}") for i in range(len(raw))]
    for i, level in enumerate(levels):
        for key in ("model_path", "lr_codebook_path", "hr_codebook_path"):
            if not getattr(level, key):
                raise PipelineError(f"{path} level {i}: '{key}' is missing")
            setattr(level, key, str(resolve_path(getattr(level, key), path)))
    return levels


def parse_override(text: str, num_levels: int) -> tuple[str, str, object]:
    """"1.temperature=0.8" as ("1", "temperature", 0.8); a value that is not JSON is a string."""
    target, sep, value = text.partition("=")
    level, dot, key = target.partition(".")
    if not sep or not dot or not key:
        raise PipelineError(f"--set {text}: expected LEVEL.KEY=VALUE (e.g. 0.guidance_scale=1.5)")
    if level not in [str(i) for i in range(num_levels)]:
        raise PipelineError(f"--set {text}: no level {level} (the config has levels 0 to {num_levels - 1})")
    try:
        return level, key, json.loads(value)
    except json.JSONDecodeError:
        return level, key, value


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
        if levels and model.shape.label_names != levels[0].model.shape.label_names:
            raise PipelineError(f"{where}: {cfg.model_path} knows the labels {', '.join(model.shape.label_names)}; "
                                f"level 0's model {', '.join(levels[0].model.shape.label_names)} (tune every level "
                                f"on the same images)")
        if levels and levels[-1].record["hr_codebook"]["sha256"] != records["lr_codebook"]["sha256"]:
            raise PipelineError(f"{where}: lr_codebook_path {cfg.lr_codebook_path} is not level {i - 1}'s "
                                f"hr_codebook_path {levels[-1].settings.hr_codebook_path}")
        levels.append(Level(cfg, model, load_codebook(cfg.lr_codebook_path)[0], load_codebook(cfg.hr_codebook_path)[0],
                            level_record(cfg, {"model": file_record(cfg.model_path), **records}),
                            artifact.tensors.get("cond_counts"), tuned_label_ids(artifact, model)))
    check_prompts(levels, source)
    return levels


def tuned_label_ids(artifact: Artifact, model: TokenTransformer) -> list[int] | None:
    """The ids of the labels a tuned model was tuned on (its artifact's label_origin); None: every label."""
    tuned = artifact.extra.get("label_origin", {}).get("tuned")
    return None if tuned is None else [model.shape.label_names.index(name) for name in tuned]


def level_record(cfg: LevelConfig, files: dict) -> dict:
    """A level's provenance: its settings and the record (path, sha256) of each file it uses."""
    record = {**to_dict(cfg), **files}
    if cfg.prompt is None:  # provenance as it was before prompts
        del record["prompt"]
    return record


def changed_level(level: Level, **changes) -> Level:
    """The level with some settings changed, its provenance record with them."""
    settings = replace(level.settings, **changes)
    files = {key: level.record[key] for key in ("model", "lr_codebook", "hr_codebook")}
    return replace(level, settings=settings, record=level_record(settings, files))


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


class Generator:
    """The levels and the decoder of one generation config."""

    def __init__(self, levels: list[Level], decoder: Autoencoder, decoder_artifact: Artifact, decoder_path: Path):
        self.levels, self.decoder, self.decoder_artifact, self.decoder_path = levels, decoder, decoder_artifact, decoder_path
        self.device = torch.device("cpu")

    @classmethod
    def load(cls, config_path: Path, decoder_path: Path, int8: bool = True, overrides: Sequence[str] = ()) -> "Generator":
        """The levels of a generation config and the autoencoder that decodes the last level's tokens (int8
        models run in int8 unless told otherwise), checked to fit each other."""
        levels = load_levels(parse_config(config_path, overrides), config_path)
        decoder, decoder_artifact = load_autoencoder(decoder_path, int8=int8)
        final = levels[-1].fine_book.cfg
        if final.image_C != decoder.cfg.latent_channel:
            raise PipelineError(f"{decoder_path} decodes {decoder.cfg.latent_channel}-channel feature maps, but level "
                                f"{len(levels) - 1}'s codebook {levels[-1].settings.hr_codebook_path} makes "
                                f"{final.image_C}")
        return cls(levels, decoder, decoder_artifact, decoder_path)

    def to(self, device: torch.device) -> "Generator":
        self.device = device
        for level in self.levels:
            level.model.to(device)
            level.fine_book.to(device)
        self.decoder.to(device)
        return self

    @property
    def label_names(self) -> list[str]:
        return self.levels[0].model.shape.label_names

    @property
    def prompt(self) -> str | None:
        return self.levels[0].settings.prompt

    def provenance(self) -> dict:
        """Every level's settings with the sha256 of each file it uses, and the decoder's."""
        return {"levels": [level.record for level in self.levels], "decoder": file_record(self.decoder_path)}

    def config(self, folder: Path) -> dict:
        """The generation config of this generator (every level's settings), its paths relative to `folder`
        where it is written, so that it reads back from anywhere."""
        config = {}
        for i, level in enumerate(self.levels):
            config[str(i)] = to_dict(level.settings)
            for key in ("model_path", "lr_codebook_path", "hr_codebook_path"):
                config[str(i)][key] = os.path.relpath(Path(config[str(i)][key]).resolve(), folder.resolve())
        return config

    def with_prompt(self, prompt: str, where: str) -> "Generator":
        """The same models, level 0 set to `prompt`, checked against the models that read it (an error names
        `where` the prompt came from)."""
        levels = [changed_level(self.levels[0], prompt=prompt), *self.levels[1:]]
        check_prompts(levels, Path(where))
        return self.with_levels(levels)

    def with_settings(self, **changes) -> "Generator":
        """The same models with some decoding settings changed on every level (guidance_scale, temperature...)."""
        return self.with_levels([changed_level(level, **changes) for level in self.levels])

    def with_levels(self, levels: list[Level]) -> "Generator":
        generator = Generator(levels, self.decoder, self.decoder_artifact, self.decoder_path)
        generator.device = self.device
        return generator

    @torch.inference_mode()
    def sample(self, indices: range, seed: int, use_cache: bool = True) -> tuple[torch.Tensor, list[int]]:
        """Images (B, C, H, W) in [-1, 1], on the CPU, and their label ids (-1: none) for the given image
        indices, made on the generator's device."""
        generators = image_generators(seed, indices)
        labels = self.draw_labels(generators)
        tokens = self.condition_tokens(labels, generators)
        shape = self.levels[0].model.shape
        for i, level in enumerate(self.levels):
            override = resolve_label(level.settings.label, shape.label_names, f"level {i}") if i else None
            level_labels = labels if override is None else [override] * len(labels)
            ids = torch.tensor([l if l >= 0 else level.model.shape.null_label for l in level_labels], device=self.device)
            text = prompt_ids(level, level_prompt(self.levels, i), len(labels), self.device)
            tokens = generate_tokens(level.model, ids, tokens, level.settings, generators, use_cache, text=text)
        images = self.decoder.decoder(self.levels[-1].fine_book.lookup(tokens)).float().clamp(-1, 1)
        return images.cpu(), labels

    def draw_labels(self, generators: list[torch.Generator]) -> list[int]:
        """Each image's label id: level 0's label, or drawn from the training labels' frequencies (-1: none);
        a tuned model draws among the labels it was tuned on."""
        base = self.levels[0]
        shape = base.model.shape
        wanted = resolve_label(base.settings.label, shape.label_names, "level 0")
        if wanted is None and base.settings.prompt is not None:  # a prompt says what to make: no label drawn
            wanted = -1
        if wanted is not None or not shape.num_labels:
            return [-1 if wanted is None else wanted] * len(generators)
        frequencies = base.cond_counts.float()[:shape.num_labels].sum(1) + 1e-9
        if base.drawn_labels is not None:  # a tuned model makes the labels it was tuned on
            frequencies = torch.zeros_like(frequencies).index_copy(0, torch.tensor(base.drawn_labels),
                                                                    frequencies[base.drawn_labels])
        return [int(torch.multinomial(frequencies, 1, generator=g)) for g in generators]

    def condition_tokens(self, labels: list[int], generators: list[torch.Generator]) -> torch.Tensor:
        """Level 0's input (B, 1): a condition token drawn from those seen with each label in training, or,
        for a model trained on captions, predicted from the prompt and the label."""
        base = self.levels[0]
        shape = base.model.shape
        if base.model.tokenizer is None:
            counts = base.cond_counts.float()
            conds = [int(torch.multinomial(counts[label if label >= 0 else shape.num_labels] + 1e-9, 1, generator=g))
                     for label, g in zip(labels, generators)]
            return torch.tensor(conds, device=self.device)[:, None]
        ids = torch.tensor([l if l >= 0 else shape.null_label for l in labels], device=self.device)
        text = prompt_ids(base, base.settings.prompt, len(labels), self.device)
        return condition_tokens(base.model, ids, text, base.settings, generators)
