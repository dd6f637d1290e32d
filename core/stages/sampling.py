"""The choice of sampling settings for augmentation: images generated at each candidate setting (guidance
scale, temperature) help a classifier on a validation split carved from the real training images (the same
split curation carves), and the best setting is written into a generation config. The held-out split is never
read.

For each setting: `images` images generated (in memory), a classifier trained on the rest of the training
images with them mixed in at half of each batch (their asked labels), tested on the validation images, over a
few seeds; beside it, the share of them that a teacher trained on the same images assigns to their asked
label."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core.artifacts import atomic_write_json, file_record
from core.data import crop_to_content, load_image_dataset, to_uint8
from core.errors import PipelineError
from core.generator import Generator
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
    names = real.label_names
    train = real.split(heldout=False).with_labels()
    fit, validation = downstream.validation_split(train, args.validation_share, args.seed)
    k = len(names)
    teacher = downstream.train_classifier(fit.items, fit.labels, k, classifier_config(real, args.teacher_steps,
                                                                                      args.seed),
                                          device, lambda it: track(it, "sampling: teacher"))
    mapping = torch.tensor([names.index(n) if n in names else -1 for n in generator.label_names] + [-1])
    settings = downstream.classifier_settings(args.downstream)
    candidates, arms = [], []
    for guidance in args.guidance:
        for temperature in args.temperature:
            images, ids = generate(generator.with_settings(guidance_scale=guidance, temperature=temperature),
                                   args.images, args.batch_size, args.seed, content, track)
            asked = mapping[ids]
            keep = asked >= 0
            images, asked = images[keep], asked[keep]
            agreement = float((downstream.probabilities(teacher, images, device).argmax(1) == asked).float().mean())
            arms.append(downstream.Arm(f"guidance {guidance}, temperature {temperature}",
                                       torch.cat([fit.items, images]), torch.cat([fit.labels, asked]),
                                       downstream.half_and_half(len(fit), len(images), args.downstream.real_share)))
            candidates.append({"guidance_scale": guidance, "temperature": temperature, "images": len(images),
                               "teacher_agreement": agreement})
    accuracies = downstream.accuracy_over_seeds(arms, validation.items, validation.labels, k, settings,
                                                seeds=args.seeds, seed=args.seed, device=device,
                                                track=args.progress, description="sampling")
    for candidate, arm in zip(candidates, arms):
        candidate["validation_accuracy"] = accuracies[arm.name]
    best = max(candidates, key=lambda c: c["validation_accuracy"]["mean"])
    summary = {"config": file_record(args.config_path), "real": file_record(args.real_path),
               "fit_images": len(fit), "validation_images": len(validation), "seeds": args.seeds,
               "candidates": candidates, "chosen": {"guidance_scale": best["guidance_scale"],
                                                    "temperature": best["temperature"]}}
    args.out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out_dir / "generate.json", generator.with_settings(**summary["chosen"]).config(args.out_dir))
    atomic_write_json(args.out_dir / "sampling.json", summary)
    return summary
