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
Beside either, the share of the images that the teacher assigns to their asked label."""
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
    seeds: int = 2
    validation_share: float = 0.2
    downstream: downstream.DownstreamConfig = field(default_factory=downstream.DownstreamConfig)
    teacher_steps: int = 500
    batch_size: int = 250
    seed: int = 0
    device: str = "auto"
    progress: Callable[[Iterable, str], Iterator] | None = None


def generate(generator: Generator, count: int, batch_size: int, seed: int, content_size: list[int] | None,
             track: Callable) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 images at the source's size and their label ids in the generator's names."""
    images, labels = [], []
    for start in track(range(0, count, batch_size), "sampling: generating"):
        batch, ids = generator.sample(range(start, min(count, start + batch_size)), seed)
        images.append(crop_to_content(to_uint8(batch), content_size))
        labels += ids
    return torch.cat(images), torch.tensor(labels)


CRITERIA = ("accuracy", "fidelity")


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
    candidates, arms = [], []
    for guidance, temperature, levels in itertools.product(args.guidance, args.temperature, varied):
        setting = {"guidance_scale": guidance, "temperature": temperature, **levels}
        images, ids = generate(at_setting(generator, setting), args.images, args.batch_size, args.seed, content, track)
        asked = mapping[ids]
        keep = asked >= 0
        images, asked = images[keep], asked[keep]
        features, predicted = downstream.predict(teacher, images, device)
        candidate = {**setting, "images": len(images),
                     "teacher_agreement": float((predicted == asked).float().mean())}
        if fidelity:
            candidate["frechet_distance"] = frechet_distance(validation_features, features)
        else:
            arms.append(downstream.Arm(", ".join(f"{k} {v}" for k, v in setting.items()),
                                       torch.cat([fit.items, images]), torch.cat([fit.labels, asked]),
                                       downstream.half_and_half(len(fit), len(images), args.downstream.real_share)))
        candidates.append(candidate)
    if fidelity:
        best = min(candidates, key=lambda c: c["frechet_distance"])
    else:
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
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / "generate.json", at_setting(generator, summary["chosen"]).config(args.out_dir))
    atomic_write_json(args.out_dir / "sampling.json", summary)
    return summary


def setting_of(candidate: dict) -> dict:
    """A candidate's setting (guidance, temperature and the per-level "LEVEL.KEY" ones) without its figures."""
    return {k: v for k, v in candidate.items() if k in ("guidance_scale", "temperature") or "." in k}
