"""The report's downstream section, and the small CNN classifiers behind it and the report's feature
classifier: trained from scratch and tested on real held-out images. The section asks whether generated
images teach a classifier.

The downstream experiment trains the same classifier (same architecture, steps, batch and augmentation) on
several training sets, its *arms*, each with several seeds, and tests every one on the real held-out
images:
- generated: the generated images alone; its accuracy is the Classification Accuracy Score (CAS, Ravuri &
  Vinyals 2019), read beside
- real: as many real training images (all of them when there are fewer): the real subset when it has that many;
- real subset: a class-balanced subset of the real training images;
- real subset, distilled: the same subset, half of each batch with its labels and half mixup of its images
  labelled by a teacher (a classifier trained on the real training split, which is all the generator saw):
  the strongest recipe that needs no generator, so the bar that the generator's images have to clear;
- real subset + generated: that subset plus every generated image with the label it was generated for,
  half of each batch drawn from each by default, and
- real subset + curated (curate_images.py): the subset plus the curated images with the labels the
  curation chose (soft labels through the distillation loss), mixed alike;
- real subset + generated, distilled: the distilled arm whose mixup half draws its images from the subset and
  the generated images alike (half each), all labelled by the teacher: the generated images as teaching
  material for distillation rather than as labelled examples (DM-KD, Li et al. 2023).
The generator's gain is the best of the generated arms minus the better no-generator arm.
"""
from __future__ import annotations

import math
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from core.cores import in_parallel
from core.data import Dataset, load_image_dataset, to_float
from core.errors import PipelineError
from core.models.classifier import FeatureClassifier, shift_and_flip
from core.training import native_bfloat16

Progress = Callable[[Iterable], Iterator]
GENERATED, REAL, SUBSET, AUGMENTED = "generated", "real", "real subset", "real subset + generated"
CURATED_ALONE, DISTILLED, CURATED = "curated", "real subset, distilled", "real subset + curated"
DISTILLED_GENERATED = "real subset + generated, distilled"
NO_GENERATOR = (SUBSET, DISTILLED)
WITH_GENERATOR = (AUGMENTED, CURATED, DISTILLED_GENERATED)
# classifiers train side by side on threads (core.cores.in_parallel); torch's global generator, which gives a
# model its initial weights, is theirs to share
INIT_LOCK = threading.Lock()


# ---------------------------------------------------------------- one classifier

def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy against class probabilities (N, K): the distillation loss (one-hot targets give
    F.cross_entropy)."""
    return -(targets * F.log_softmax(logits, dim=1)).sum(1).mean()


@torch.no_grad()
def mixup_distilled(x: torch.Tensor, teacher: FeatureClassifier,
                    generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image of the batch mixed with another one of it at a uniform weight (mixup, alpha = 1), and
    the teacher's class probabilities for the mixture."""
    partner = torch.randperm(len(x), generator=generator).to(x.device)
    weight = torch.rand(len(x), 1, 1, 1, generator=generator).to(x.device)
    mixed = (weight * x + (1 - weight) * x[partner]).contiguous(memory_format=torch.channels_last)
    return mixed, teacher(mixed).float().softmax(1)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: dict,
                     device: torch.device, progress: Progress = iter, weights: torch.Tensor | None = None,
                     targets: torch.Tensor | None = None,
                     teacher: FeatureClassifier | None = None, mixup_pool: torch.Tensor | None = None,
                     mixup_weights: torch.Tensor | None = None) -> FeatureClassifier:
    """Cross-entropy on uint8 images (N, C, H, W) with labels (N,) in [0, num_classes), Adam with a linearly
    decaying learning rate. `config`: steps, batch_size, lr, model_width, features, seed, and optionally
    shift and flip (the augmentation; none when absent). Batches are drawn uniformly, or in proportion to
    `weights` (N,). With `targets` (N, K class probabilities) the loss is against those instead of the
    labels; with a `teacher`, half of every batch keeps its labels and the other half is mixed (mixup),
    its loss against the teacher's probabilities of the mixtures. The mixed half is drawn from the batch's
    images, or from `mixup_pool` (M, C, H, W) uniformly or in proportion to `mixup_weights` (M,). Trains in
    bfloat16 autocast where the device multiplies it natively."""
    if len(images) < 2:
        raise PipelineError(f"too few labelled images ({len(images)}) to train a classifier")
    with INIT_LOCK:
        torch.manual_seed(config["seed"])
        model = FeatureClassifier(images.shape[1], num_classes, config["model_width"], config["features"])
    model = model.to(device, memory_format=torch.channels_last)  # a third faster on a CPU
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    shift, flip = config.get("shift", 0), config.get("flip", False)
    autocast = native_bfloat16(device)  # the stages' training precision, as core.training sets it
    model.train()
    for step in progress(range(config["steps"])):
        if weights is None:
            batch = torch.randint(len(images), (config["batch_size"],), generator=generator)
        else:
            batch = torch.multinomial(weights, config["batch_size"], replacement=True, generator=generator)
        x = to_float(images[batch]).to(device)
        if shift or flip:
            x = shift_and_flip(x, shift, flip, generator)
        for group in optimizer.param_groups:
            group["lr"] = config["lr"] * (1 - step / config["steps"])
        x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            if teacher is not None:  # half of the batch with its labels, half mixed and labelled by the teacher
                half = len(x) // 2
                to_mix = x[half:] if mixup_pool is None else pool_batch(
                    mixup_pool, mixup_weights, count=len(x) - half, shift=shift, flip=flip, generator=generator,
                    device=device)
                mixed, soft = mixup_distilled(to_mix, teacher, generator)
                logits = model(torch.cat([x[:half], mixed]).contiguous(memory_format=torch.channels_last)).float()
                loss = 0.5 * (F.cross_entropy(logits[:half], labels[batch[:half]].to(device))
                              + soft_cross_entropy(logits[half:], soft))
            elif targets is not None:
                loss = soft_cross_entropy(model(x).float(), targets[batch].to(device))
            else:
                loss = F.cross_entropy(model(x).float(), labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def pool_batch(pool: torch.Tensor, weights: torch.Tensor | None, *, count: int, shift: int, flip: bool,
               generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """`count` images of the pool, drawn uniformly or by `weights`, as float and augmented as a batch is."""
    if weights is None:
        drawn = torch.randint(len(pool), (count,), generator=generator)
    else:
        drawn = torch.multinomial(weights, count, replacement=True, generator=generator)
    x = to_float(pool[drawn]).to(device)
    return shift_and_flip(x, shift, flip, generator) if shift or flip else x


@torch.no_grad()
def predict(model: FeatureClassifier, images: torch.Tensor, device: torch.device,
            batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, F) and predicted classes (N,) of uint8 images."""
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        x = to_float(images[start:start + batch_size]).to(device).contiguous(memory_format=torch.channels_last)
        f = model.features(x)
        features.append(f.float().cpu())
        predictions.append(model.head(f).argmax(1).cpu())
    return torch.cat(features), torch.cat(predictions)


@torch.no_grad()
def probabilities(teacher: FeatureClassifier, images: torch.Tensor, device: torch.device,
                  batch_size: int = 512) -> torch.Tensor:
    """The classifier's class probabilities (N, K) of uint8 images."""
    return torch.cat([teacher(to_float(images[start:start + batch_size]).to(device).contiguous(
        memory_format=torch.channels_last)).softmax(1).float().cpu() for start in range(0, len(images), batch_size)])


def validation_split(train: Dataset, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """The training split cut in two at random: the rest, and `share` of each class's images (of all of them
    when unlabelled) for validation."""
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    chosen = torch.zeros(len(train), dtype=torch.bool)
    for c in train.labels.unique().tolist():
        mine = order[train.labels[order] == c]
        chosen[mine[:int(round(share * len(mine)))]] = True
    return train.take((~chosen).nonzero().flatten()), train.take(chosen.nonzero().flatten())


VALIDATION = ("carved", "heldout")


def fit_and_validation(real: Dataset, validation: str, share: float, seed: int) -> tuple[Dataset, Dataset]:
    """The training images a choice fits, and the images it is validated on: `share` of each class's training
    images (carved), or the held-out split (heldout: a chain's validation share, which none of its models saw)."""
    train = real.split(heldout=False)
    if validation == "carved":
        return validation_split(train, share, seed)
    if validation != "heldout":
        raise PipelineError(f"the validation images are one of {', '.join(VALIDATION)}, got '{validation}'")
    held_out = real.split(heldout=True)
    if len(held_out) < 2:
        raise PipelineError(f"the held-out split has {len(held_out)} images, too few to validate on")
    return train, held_out


# ---------------------------------------------------------------- the arms

@dataclass
class DownstreamConfig:
    steps: int = 500
    batch_size: int = 128
    lr: float = 3e-3
    model_width: int = 16
    features: int = 128
    shift: int = 2  # pixels of random translation
    flip: bool = True  # random left-right mirroring (off for digits, text...)
    seeds: int = 3
    subset_per_class: int = 100  # the real subset: at most this many training images of each class
    # the real subset's share of the augmented arm's batches (None: its share of the images); a half keeps a
    # few real images from being drowned by many generated ones
    real_share: float | None = 0.5


@dataclass
class Arm:
    name: str
    images: torch.Tensor  # uint8 (N, C, H, W)
    labels: torch.Tensor  # (N,), every one a class
    weights: torch.Tensor | None = None  # how often each image is drawn (None: uniformly)
    targets: torch.Tensor | None = None  # (N, K) class probabilities trained against, instead of the labels
    teacher: FeatureClassifier | None = None  # distilled on mixup of the images, instead of the labels
    mixup_pool: torch.Tensor | None = None  # with a teacher: the images mixed (None: the arm's own)
    mixup_weights: torch.Tensor | None = None  # how often each pool image is drawn (None: uniformly)
    same_as: str | None = None  # another arm of exactly these images and labels: its results are reused


@dataclass
class Curated:
    """A curated generated set (curate_images.py) in the real label names, with its soft labels."""
    data: Dataset
    targets: torch.Tensor  # (N, K) float


def labelled(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    keep = data.labels >= 0
    return data.items[keep], data.labels[keep]


def load_curated(path: Path, names: list[str]) -> Curated:
    """A curated dataset.json with its records' soft labels (over the names in its info table) expressed
    in `names`; an image without a soft label carries its label one-hot."""
    data = load_image_dataset(path).relabelled(names)
    soft_names = data.info.get("soft_label_names")
    if soft_names is None:
        raise PipelineError(f"{path}: not a curated dataset (no soft_label_names in its info; make it with "
                            f"curate_images.py)")
    unknown = sorted(set(soft_names) - set(names))
    if unknown:
        raise PipelineError(f"{path}: soft labels name classes the real data does not have: {', '.join(unknown)}")
    columns = torch.tensor([names.index(n) for n in soft_names])
    targets = F.one_hot(data.labels.clamp_min(0), len(names)).float()
    for i, record in enumerate(data.records):
        if record.get("soft_label") is not None:
            targets[i] = torch.zeros(len(names)).index_put_((columns,), torch.tensor(record["soft_label"]))
    keep = data.labels >= 0
    return Curated(data.take(keep.nonzero().flatten()), targets[keep])


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of at most `per_class` items of each class, drawn at random, in their original order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    kept = torch.cat([order[labels[order] == c][:per_class] for c in labels.unique()])
    return kept.sort().values


def half_and_half(real_count: int, other_count: int, real_share: float | None) -> torch.Tensor | None:
    """Draw weights that give the first `real_count` images `real_share` of each batch (None: uniform)."""
    if real_share is None:
        return None
    return torch.cat([torch.full((real_count,), real_share / real_count),
                      torch.full((other_count,), (1 - real_share) / other_count)])


def build_arms(train: Dataset, generated: Dataset, *, per_class: int, seed: int, real_share: float | None = None,
               teacher: FeatureClassifier | None = None, curated: Curated | None = None,
               num_classes: int | None = None) -> list[Arm]:
    """The training sets, from the real training split and the generated set (both labelled in the same
    label names; unlabelled items are left out). With `real_share`, the arms that add generated images to
    the real subset draw that share of their batches from the subset. The distilled arm needs a `teacher`,
    the curated arms a `curated` set."""
    real_images, real_labels = labelled(train)
    fake_images, fake_labels = labelled(generated)
    same_size = torch.randperm(len(real_images), generator=torch.Generator().manual_seed(seed))[:len(fake_images)]
    subset = balanced_subset(real_labels, per_class, seed)
    sub_images, sub_labels = real_images[subset], real_labels[subset]
    arms = [Arm(GENERATED, fake_images, fake_labels)]
    if curated is not None:
        arms.append(Arm(CURATED_ALONE, curated.data.items, curated.data.labels, targets=curated.targets))
    # a subset as large as the real arm (every real image, or as many as generated, balanced over the classes as
    # the generated images are) is that arm's training set: trained once for both
    if len(subset) == len(same_size):
        arms.append(Arm(REAL, sub_images, sub_labels, same_as=SUBSET))
    else:
        arms.append(Arm(REAL, real_images[same_size], real_labels[same_size]))
    arms.append(Arm(SUBSET, sub_images, sub_labels))
    if teacher is not None:
        arms.append(Arm(DISTILLED, sub_images, sub_labels, teacher=teacher))
    arms.append(Arm(AUGMENTED, torch.cat([sub_images, fake_images]), torch.cat([sub_labels, fake_labels]),
                    half_and_half(len(subset), len(fake_images), real_share)))
    if curated is not None:
        one_hot = F.one_hot(sub_labels, num_classes or curated.targets.shape[1]).float()
        arms.append(Arm(CURATED, torch.cat([sub_images, curated.data.items]),
                        torch.cat([sub_labels, curated.data.labels]),
                        half_and_half(len(subset), len(curated.data), real_share),
                        targets=torch.cat([one_hot, curated.targets])))
    if teacher is not None:
        arms.append(Arm(DISTILLED_GENERATED, sub_images, sub_labels, teacher=teacher,
                        mixup_pool=torch.cat([sub_images, fake_images]),
                        mixup_weights=half_and_half(len(subset), len(fake_images), 0.5)))
    return arms


def skip_reason(train: Dataset, heldout: Dataset, generated: Dataset) -> str | None:
    """Why the downstream experiment cannot run on these sets (generated in the real label names), or None."""
    if len(train.labels[train.labels >= 0].unique()) < 2:
        return "the real training images have fewer than two labelled classes"
    if not (heldout.labels >= 0).any():
        return "the real held-out images carry no labels"
    labelled_generated = int((generated.labels >= 0).sum())
    if labelled_generated == 0:
        return "the generated records carry no labels of the real data"
    if labelled_generated == 1:
        return "one generated record carries a label of the real data: too few to train on"
    return None


def spread(values: list[float]) -> dict:
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values), "max": max(values), "runs": values}


def classifier_settings(config: DownstreamConfig) -> dict:
    """The train_classifier config of every downstream classifier (its seed aside)."""
    return {k: v for k, v in asdict(config).items() if k not in ("seeds", "subset_per_class", "real_share")}


def accuracy_of(model: FeatureClassifier, test_images: torch.Tensor, test_labels: torch.Tensor,
                device: torch.device) -> tuple[float, torch.Tensor]:
    """Accuracy on the test images, and which of them it got right (N,) float."""
    _, predicted = predict(model, test_images, device)
    right = (predicted == test_labels).float()
    return float(right.mean()), right


def train_arm(arm: Arm, num_classes: int, settings: dict, device: torch.device) -> FeatureClassifier:
    return train_classifier(arm.images, arm.labels, num_classes, settings, device, weights=arm.weights,
                            targets=arm.targets, teacher=arm.teacher, mixup_pool=arm.mixup_pool,
                            mixup_weights=arm.mixup_weights)


def train_and_test(arms: list[Arm], test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                   settings: dict, *, seeds: int, seed: int, device: torch.device,
                   track: Callable[[Iterable, str], Iterator] | None = None,
                   description: str = "downstream") -> dict[str, list[tuple[float, torch.Tensor]]]:
    """Every arm trained with seeds seed, seed + 1, ... (side by side, one per core) and tested: per arm, each
    seed's accuracy on the test images and which of them it got right."""
    track = track or (lambda items, _: iter(items))
    jobs = [(arm, s) for arm in arms for s in range(seeds)]

    def outcome(job: tuple[Arm, int]) -> tuple[float, torch.Tensor]:
        arm, s = job
        model = train_arm(arm, num_classes, {**settings, "seed": seed + s}, device)
        return accuracy_of(model, test_images, test_labels, device)
    outcomes = iter(in_parallel(outcome, jobs, lambda it: track(it, f"{description}: {len(jobs)} classifiers")))
    return {arm.name: [next(outcomes) for _ in range(seeds)] for arm in arms}


def accuracy_over_seeds(arms: list[Arm], test_images: torch.Tensor, test_labels: torch.Tensor, num_classes: int,
                        settings: dict, *, seeds: int, seed: int, device: torch.device,
                        track: Callable[[Iterable, str], Iterator] | None = None,
                        description: str = "downstream") -> dict[str, dict]:
    """Per arm, the spread of its seeds' accuracies on the test images."""
    outcomes = train_and_test(arms, test_images, test_labels, num_classes, settings, seeds=seeds, seed=seed,
                              device=device, track=track, description=description)
    return {name: spread([accuracy for accuracy, _ in runs]) for name, runs in outcomes.items()}


def run_arms(arms: list[Arm], test: Dataset, num_classes: int, config: DownstreamConfig, seed: int,
             device: torch.device, track: Callable[[Iterable, str], Iterator]) -> dict:
    """Train every arm with every seed; their accuracies on the labelled test images, overall and per class."""
    test_images, test_labels = labelled(test)
    trained = [arm for arm in arms if arm.same_as is None]
    outcomes = train_and_test(trained, test_images, test_labels, num_classes, classifier_settings(config),
                              seeds=config.seeds, seed=seed, device=device, track=track)
    per_class_count = torch.bincount(test_labels, minlength=num_classes).clamp_min(1)
    results = {}
    for arm in trained:
        runs = outcomes[arm.name]
        per_class = sum(torch.zeros(num_classes).index_add_(0, test_labels, right) / per_class_count
                        for _, right in runs)
        results[arm.name] = {"images": len(arm.images), "accuracy": spread([accuracy for accuracy, _ in runs]),
                             "per_class": (per_class / len(runs)).tolist(),
                             "class_counts": torch.bincount(arm.labels, minlength=num_classes).tolist()}
    return {arm.name: results[arm.name] if arm.same_as is None else {**results[arm.same_as], "same_as": arm.same_as}
            for arm in arms}


def verdict(better: dict, worse: dict) -> str:
    """`better` minus `worse` by their seeds' ranges: a gain or a loss only when they do not overlap."""
    if better["min"] > worse["max"]:
        return "gain"
    if better["max"] < worse["min"]:
        return "loss"
    return "within the seeds' spread"


def compare(results: dict) -> dict:
    """The headline figures: CAS over the real arm's accuracy (and the curated set's), and the generator's
    gain in points: the better arm with generated images minus the better arm without, with whether it lies
    beyond the seeds' spread (the arms' ranges over seeds do not overlap)."""
    generated, real = results[GENERATED]["accuracy"], results[REAL]["accuracy"]
    baseline = max((name for name in NO_GENERATOR if name in results), key=lambda n: results[n]["accuracy"]["mean"])
    best = max((name for name in WITH_GENERATOR if name in results),
               key=lambda n: results[n]["accuracy"]["mean"])
    b, g = results[baseline]["accuracy"], results[best]["accuracy"]
    standard_error = math.sqrt((g["std"] ** 2 + b["std"] ** 2) / len(b["runs"]))
    found = {"cas": generated["mean"], "cas_over_real": generated["mean"] / max(real["mean"], 1e-12),
             "equal_size": results[GENERATED]["images"] == results[REAL]["images"],
             "baseline_arm": baseline, "best_arm": best, "gain_points": 100 * (g["mean"] - b["mean"]),
             "gain_standard_error_points": 100 * standard_error, "gain_verdict": verdict(g, b)}
    if CURATED_ALONE in results:
        found["cas_curated"] = results[CURATED_ALONE]["accuracy"]["mean"]
        found["cas_curated_over_real"] = found["cas_curated"] / max(real["mean"], 1e-12)
    return found


# ---------------------------------------------------------------- the section

def section(config: DownstreamConfig | None, *, real: Dataset, generated: Dataset, seed: int,
            device: torch.device, track: Callable[[Iterable, str], Iterator],
            teacher: FeatureClassifier | None = None, curated_path: Path | None = None) -> dict:
    """Every arm trained on the real training split and the generated images (labelled in the real label
    names) and tested on the whole held-out split, or why not (config None: turned off). `teacher`: the
    classifier of the real training split, for the distilled arm; `curated_path`: the curated set."""
    if config is None:
        return {"skipped": "turned off (--no-downstream)"}
    train, heldout = real.split(heldout=False), real.split(heldout=True)
    reason = skip_reason(train, heldout, generated)
    if reason is not None:
        return {"skipped": reason}
    curated = load_curated(curated_path, real.label_names) if curated_path is not None else None
    arms = build_arms(train, generated, per_class=config.subset_per_class, seed=seed, real_share=config.real_share,
                      teacher=teacher, curated=curated, num_classes=len(real.label_names))
    results = run_arms(arms, heldout, len(real.label_names), config, seed, device, track)
    return {"config": asdict(config), "test_images": int((heldout.labels >= 0).sum()),
            "names": real.label_names, "arms": results, **compare(results),
            **({"curated": str(curated_path)} if curated_path is not None else {})}


def summary_lines(d: dict) -> list[str]:
    if "skipped" in d:
        return []
    arms = d["arms"]
    real, baseline, best = arms[REAL], arms[d["baseline_arm"]], arms[d["best_arm"]]
    curated = (f"; curated {d['cas_curated']:.1%} ({d['cas_curated_over_real']:.0%})" if "cas_curated" in d else "")
    return [f"Classification Accuracy Score: {d['cas']:.1%} ({d['cas_over_real']:.0%} of "
            f"{real['accuracy']['mean']:.1%} for {real['images']:,} real images"
            f"{'' if d['equal_size'] else ', all there are'}){curated}.",
            f"Generator's gain: {d['best_arm']} {best['accuracy']['mean']:.1%} against {d['baseline_arm']} "
            f"{baseline['accuracy']['mean']:.1%} (the best arm without a generator, {arms[SUBSET]['images']:,} real "
            f"images): {d['gain_points']:+.2f} points ({d['gain_verdict']})."]


def accuracy_cell(accuracy: dict) -> str:
    return (f"{accuracy['mean']:.2%} ± {100 * accuracy['std']:.2f} "
            f"({accuracy['min']:.2%} to {accuracy['max']:.2%})")


def markdown(section: dict) -> list[str]:
    lines = ["## Downstream accuracy: do the generated images teach a classifier?", ""]
    if "skipped" in section:
        return lines + [f"Skipped: {section['skipped']}.", ""]
    c, arms = section["config"], section["arms"]
    augmentation = f"shifts of up to {c['shift']} pixels" + (" and left-right flips" if c["flip"] else "")
    mix = ("batches drawn uniformly from the real subset and the generated images together" if c["real_share"] is None
           else f"{c['real_share']:.0%} of each batch drawn from the real subset")
    lines += [f"The same small CNN trained from scratch on each training set ({c['steps']} steps of {c['batch_size']} "
              f"images, {augmentation}), tested on the {section['test_images']:,} real held-out images; accuracy "
              f"mean ± standard deviation (range) over {c['seeds']} seeds. Arms with generated images: {mix}.", "",
              "| training set | images | held-out accuracy |", "|---|---:|---:|"]
    descriptions = {GENERATED: "generated images alone (CAS)", CURATED_ALONE: "curated images alone (CAS)",
                    REAL: "real training images, as many",
                    SUBSET: f"real subset (at most {c['subset_per_class']} per class)",
                    DISTILLED: "real subset, half of each batch mixup labelled by the teacher (no generator)",
                    AUGMENTED: "real subset + generated images, asked labels",
                    CURATED: "real subset + curated images, curated labels",
                    DISTILLED_GENERATED: "real subset, half of each batch mixup of real and generated images "
                                         "labelled by the teacher"}
    lines += [f"| {descriptions[name]} | {arm['images']:,} | {accuracy_cell(arm['accuracy'])}"
              f"{' (the same images: trained once)' if 'same_as' in arm else ''} |" for name, arm in arms.items()]
    size = " at equal size" if section["equal_size"] else " (fewer real images: all there are)"
    lines += ["", f"Classification Accuracy Score: **{section['cas']:.2%}**, {section['cas_over_real']:.1%} of the "
              f"real images' accuracy{size}."]
    if "cas_curated" in section:
        lines.append(f"Of the curated images: {section['cas_curated']:.2%}, {section['cas_curated_over_real']:.1%}.")
    lines += ["", f"The generator's gain, {section['best_arm']} over {section['baseline_arm']} (the better arm "
              f"without generated images): **{section['gain_points']:+.2f} points** (standard error "
              f"{section['gain_standard_error_points']:.2f}): {section['gain_verdict']}.", "",
              "Accuracy per class (mean over seeds):", "",
              "| class | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    lines += [f"| {name} | " + " | ".join(f"{arm['per_class'][i]:.1%}" for arm in arms.values()) + " |"
              for i, name in enumerate(section["names"])]
    return lines + [""]
