"""The choice of sampling settings: images generated at each candidate setting (guidance scale and temperature
on every level, and any per-level settings to vary, every combination) are measured against validation images,
and the best setting is written into a generation config. The validation images are a split carved from the
real training images (the same split curation carves), or the real data's held-out split when that is a share
no stage trained on (a chain's validation share); the test split of a benchmark is never read.

For each setting, `images` images are generated (in memory), and a teacher is trained on the other training
images. Two criteria:
- accuracy (for augmentation): a classifier trained on the other training images with the generated ones mixed
  in at half of each batch (their asked labels), tested on the validation images, over a few seeds;
- fidelity: the Fréchet distance between the generated and the validation images in the teacher's features.
Beside either, the share of the images that the teacher assigns to their asked label. By fidelity, a grid of
more than SCREEN_ABOVE settings is screened first: every setting on a share of the images (a quarter), then the
nearest quarter of them on all the images, among which the choice is made (image i of a setting is the same
in both rounds, so the second round draws only the rest)."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core.artifacts import atomic_write_json, file_record
from core.data import crop_to_content, load_image_dataset, to_uint8
from core.errors import PipelineError
from core.generator import Generator, LevelConfig, changed_level, parse_override
from core.metrics import frechet_distance
from core.report import downstream
from core.report.sets import at_source_size
from core.report.spaces import classifier_config, is_labelled
from core.training import pick_device


@dataclass
class SamplingArgs:
    config_path: Path
    decoder_path: Path
    real_path: Path
    out_dir: Path
    overrides: tuple[str, ...] = ()  # LEVEL.KEY=VALUE settings changed from the config's (--set)
    guidance: list[float] = field(default_factory=lambda: [1.0, 1.5, 2.0, 3.0])
    temperature: list[float] = field(default_factory=lambda: [1.0])
    vary: tuple[str, ...] = ()  # "LEVEL.KEY=V1,V2,...": a level's setting tried at each value
    criterion: str = "accuracy"  # or "fidelity"
    validation: str = "carved"  # or "heldout": the real data's held-out split (a share no stage trained on)
    images: int = 2000
    # by fidelity, with more than SCREEN_ABOVE settings: each is measured on this share of the images first, and
    # the nearest quarter on all of them (0: every setting on all of them)
    screen_share: float = 0.25
    seeds: int = 2
    validation_share: float = 0.2
    downstream: downstream.DownstreamConfig = field(default_factory=downstream.DownstreamConfig)
    teacher_steps: int = 500
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"
    progress: Callable[[Iterable, str], Iterator] | None = None


def generate(generator: Generator, count: int, batch_size: int, seed: int, content_size: list[int] | None,
             track: Callable, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images `first` to `count` - 1 at the source's size and their label ids in the generator's names
    (image i is the same whichever batch draws it)."""
    images, labels = [], []
    for start in track(range(first, count, batch_size), "sampling: generating"):
        batch, ids = generator.sample(range(start, min(count, start + batch_size)), seed)
        images.append(crop_to_content(to_uint8(batch), content_size))
        labels += ids
    return torch.cat(images), torch.tensor(labels)


CRITERIA = ("accuracy", "fidelity")
SCREEN_ABOVE = 4


def screen(settings: list[dict], images: int, share: float) -> int:
    """Images per setting in the screening round, or 0 when every setting is measured on all the images."""
    return int(images * share) if len(settings) > SCREEN_ABOVE and 0 < share < 1 else 0


def varied_settings(vary: tuple[str, ...], num_levels: int) -> list[dict[str, object]]:
    """Every combination of the per-level values to try, as {"LEVEL.KEY": value} ({} when nothing varies)."""
    axes = []
    for text in vary:
        level, key, _ = parse_override(text.partition("=")[0] + "=0", num_levels)
        if key not in LevelConfig.__dataclass_fields__ or key.endswith("_path"):
            raise PipelineError(f"--vary {text}: '{key}' is not a sampling setting of a level")
        values = [parse_override(f"{level}.{key}={v}", num_levels)[2] for v in text.partition("=")[2].split(",")]
        axes.append([(f"{level}.{key}", v) for v in values])
    return [dict(combination) for combination in itertools.product(*axes)]


def at_setting(generator: Generator, setting: dict) -> Generator:
    """The generator at a candidate setting: guidance and temperature on every level, then the per-level ones."""
    generator = generator.with_settings(guidance_scale=setting["guidance_scale"], temperature=setting["temperature"])
    levels = list(generator.levels)
    for name, value in setting.items():
        level, dot, key = name.partition(".")
        if dot:
            levels[int(level)] = changed_level(levels[int(level)], **{key: value})
    return generator.with_levels(levels)


def run(args: SamplingArgs) -> dict:
    """Measure every setting, write sampling.json and generate.json (the config at the chosen setting) into
    out_dir. Returns the summary."""
    device = pick_device(args.device)
    track = args.progress or (lambda items, _: iter(items))
    generator = Generator.load(args.config_path, args.decoder_path, overrides=args.overrides).to(device)
    real_all = load_image_dataset(args.real_path)
    content = real_all.info.get("content_size") if real_all.info.get("fit") == "pad" else None
    shape = (content[1], content[0]) if content else tuple(real_all.items.shape[-2:])
    real = at_source_size(real_all, shape)
    if not is_labelled(real) or not generator.label_names:
        raise PipelineError(f"{args.real_path}: choosing sampling settings needs labelled real images and a "
                            f"label-conditioned generator")
    if args.criterion not in CRITERIA:
        raise PipelineError(f"the criterion is one of {', '.join(CRITERIA)}, got {args.criterion}")
    varied = varied_settings(args.vary, len(generator.levels))
    names = real.label_names
    fit, validation = downstream.fit_and_validation(real.with_labels(), args.validation, args.validation_share,
                                                    args.seed)
    k = len(names)
    teacher = downstream.train_classifier(fit.items, fit.labels, k, classifier_config(real, args.teacher_steps,
                                                                                      args.seed),
                                          device, lambda it: track(it, "sampling: teacher"))
    mapping = torch.tensor([names.index(n) if n in names else -1 for n in generator.label_names] + [-1])
    settings = downstream.classifier_settings(args.downstream)
    fidelity = args.criterion == "fidelity"
    validation_features = downstream.predict(teacher, validation.items, device)[0] if fidelity else None
    settings_tried = [{"guidance_scale": guidance, "temperature": temperature, **levels}
                      for guidance, temperature, levels in itertools.product(args.guidance, args.temperature, varied)]

    def images_at(setting: dict, count: int, first: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `first` to `count` - 1 at the setting, those of a real label, with their asked labels."""
        images, ids = generate(at_setting(generator, setting), count, args.batch_size, args.seed, content, track,
                               first)
        asked = mapping[ids]
        return images[asked >= 0], asked[asked >= 0]

    def measured(setting: dict, images: torch.Tensor, asked: torch.Tensor) -> tuple[dict, torch.Tensor]:
        features, predicted = downstream.predict(teacher, images, device)
        return {**setting, "images": len(images),
                "teacher_agreement": float((predicted == asked).float().mean())}, features

    def nearness(setting: dict, images: torch.Tensor, asked: torch.Tensor) -> dict:
        candidate, features = measured(setting, images, asked)
        return {**candidate, "frechet_distance": frechet_distance(validation_features, features)}

    candidates, arms, screening = [], [], None
    if fidelity:
        screened = screen(settings_tried, args.images, args.screen_share)
        if screened:  # every setting on a share of the images, then the nearest quarter on all of them
            drawn = [images_at(setting, screened) for setting in settings_tried]
            screening = [nearness(setting, *pair) for setting, pair in zip(settings_tried, drawn)]
            order = sorted(range(len(screening)), key=lambda i: screening[i]["frechet_distance"])
            for i in sorted(order[:max(1, len(order) // 4)]):
                rest = images_at(settings_tried[i], args.images, screened)
                candidates.append(nearness(settings_tried[i], *(torch.cat(pair) for pair in zip(drawn[i], rest))))
        else:
            candidates = [nearness(setting, *images_at(setting, args.images)) for setting in settings_tried]
        best = min(candidates, key=lambda c: c["frechet_distance"])
    else:
        for setting in settings_tried:
            images, asked = images_at(setting, args.images)
            candidate, _ = measured(setting, images, asked)
            arms.append(downstream.Arm(", ".join(f"{k} {v}" for k, v in setting.items()),
                                       torch.cat([fit.items, images]), torch.cat([fit.labels, asked]),
                                       downstream.half_and_half(len(fit), len(images), args.downstream.real_share)))
            candidates.append(candidate)
        accuracies = downstream.accuracy_over_seeds(arms, validation.items, validation.labels, k, settings,
                                                    seeds=args.seeds, seed=args.seed, device=device,
                                                    track=args.progress, description="sampling")
        for candidate, arm in zip(candidates, arms):
            candidate["validation_accuracy"] = accuracies[arm.name]
        best = max(candidates, key=lambda c: c["validation_accuracy"]["mean"])
    summary = {"config": file_record(args.config_path), "real": file_record(args.real_path),
               "criterion": args.criterion, "validation": args.validation,
               "fit_images": len(fit), "validation_images": len(validation), "seeds": args.seeds,
               "candidates": candidates, "chosen": setting_of(best)}
    if screening is not None:
        summary["screening"] = {"images_per_setting": screened, "candidates": screening}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / "generate.json", at_setting(generator, summary["chosen"]).config(args.out_dir))
    atomic_write_json(args.out_dir / "sampling.json", summary)
    return summary


def setting_of(candidate: dict) -> dict:
    """A candidate's setting (guidance, temperature and the per-level "LEVEL.KEY" ones) without its figures."""
    return {k: v for k, v in candidate.items() if k in ("guidance_scale", "temperature") or "." in k}
