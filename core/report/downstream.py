"""The report's downstream section, and the small CNN classifiers behind it and the report's feature
classifier: trained from scratch and tested on real held-out images. The section asks whether generated
images teach a classifier.

The downstream experiment trains the same classifier (same architecture, steps, batch and augmentation) on
several training sets, its *arms*, each with several seeds, and tests every one on the real held-out
images:
- generated: the generated images alone; its accuracy is the Classification Accuracy Score (CAS, Ravuri &
  Vinyals 2019), read beside
- real: as many real training images (all of them when there are fewer);
- real subset: a class-balanced subset of the real training images, and
- real subset + generated: that subset plus every generated image, half of each batch drawn from each by
  default; the difference is the augmentation gain.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from core.data import Dataset, to_float
from core.errors import PipelineError
from core.models.classifier import FeatureClassifier, shift_and_flip

Progress = Callable[[Iterable], Iterator]
GENERATED, REAL, SUBSET, AUGMENTED = "generated", "real", "real subset", "real subset + generated"


# ---------------------------------------------------------------- one classifier

def train_classifier(images: torch.Tensor, labels: torch.Tensor, num_classes: int, config: dict,
                     device: torch.device, progress: Progress = iter,
                     weights: torch.Tensor | None = None) -> FeatureClassifier:
    """Cross-entropy on uint8 images (N, C, H, W) with labels (N,) in [0, num_classes), Adam with a linearly
    decaying learning rate. `config`: steps, batch_size, lr, model_width, features, seed, and optionally
    shift and flip (the augmentation; none when absent). Batches are drawn uniformly, or in proportion to
    `weights` (N,)."""
    if len(images) < 2:
        raise PipelineError(f"too few labelled images ({len(images)}) to train a classifier")
    torch.manual_seed(config["seed"])
    model = FeatureClassifier(images.shape[1], num_classes, config["model_width"], config["features"])
    model = model.to(device, memory_format=torch.channels_last)  # a third faster on a CPU
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    shift, flip = config.get("shift", 0), config.get("flip", False)
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
        loss = F.cross_entropy(model(x.contiguous(memory_format=torch.channels_last)), labels[batch].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


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


def labelled(data: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    keep = data.labels >= 0
    return data.items[keep], data.labels[keep]


def balanced_subset(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    """Indices of at most `per_class` items of each class, drawn at random, in their original order."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    kept = torch.cat([order[labels[order] == c][:per_class] for c in labels.unique()])
    return kept.sort().values


def build_arms(train: Dataset, generated: Dataset, per_class: int, seed: int,
               real_share: float | None = None) -> list[Arm]:
    """The four training sets, from the real training split and the generated set (both labelled in the
    same label names; unlabelled items are left out). With `real_share`, the augmented arm draws that share
    of its batches from the real subset, the rest from the generated images."""
    real_images, real_labels = labelled(train)
    fake_images, fake_labels = labelled(generated)
    same_size = torch.randperm(len(real_images), generator=torch.Generator().manual_seed(seed))[:len(fake_images)]
    subset = balanced_subset(real_labels, per_class, seed)
    weights = None
    if real_share is not None:
        weights = torch.cat([torch.full((len(subset),), real_share / len(subset)),
                             torch.full((len(fake_images),), (1 - real_share) / len(fake_images))])
    return [Arm(GENERATED, fake_images, fake_labels),
            Arm(REAL, real_images[same_size], real_labels[same_size]),
            Arm(SUBSET, real_images[subset], real_labels[subset]),
            Arm(AUGMENTED, torch.cat([real_images[subset], fake_images]),
                torch.cat([real_labels[subset], fake_labels]), weights)]


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


def run_arms(arms: list[Arm], test: Dataset, num_classes: int, config: DownstreamConfig, seed: int,
             device: torch.device, track: Callable[[Iterable, str], Iterator]) -> dict:
    """Train every arm with every seed; their accuracies on the labelled test images, overall and per class."""
    test_images, test_labels = labelled(test)
    settings = {k: v for k, v in asdict(config).items() if k not in ("seeds", "subset_per_class", "real_share")}
    results = {}
    for arm in arms:
        accuracies, per_class = [], torch.zeros(num_classes)
        for s in range(config.seeds):
            description = f"downstream: {arm.name}, seed {s + 1}/{config.seeds}"
            model = train_classifier(arm.images, arm.labels, num_classes, {**settings, "seed": seed + s}, device,
                                     lambda it: track(it, description), arm.weights)
            _, predicted = predict(model, test_images, device)
            right = (predicted == test_labels).float()
            accuracies.append(float(right.mean()))
            per_class += torch.zeros(num_classes).index_add_(0, test_labels, right) / torch.bincount(
                test_labels, minlength=num_classes).clamp_min(1)
        results[arm.name] = {"images": len(arm.images), "accuracy": spread(accuracies),
                             "per_class": (per_class / config.seeds).tolist(),
                             "class_counts": torch.bincount(arm.labels, minlength=num_classes).tolist()}
    return results


def compare(results: dict) -> dict:
    """The two headline figures: CAS over the real arm's accuracy, and the augmentation gain in points,
    each with whether it lies beyond the seeds' spread (the arms' ranges over seeds do not overlap)."""
    generated, real = results[GENERATED]["accuracy"], results[REAL]["accuracy"]
    subset, augmented = results[SUBSET]["accuracy"], results[AUGMENTED]["accuracy"]
    gain = augmented["mean"] - subset["mean"]
    standard_error = math.sqrt((augmented["std"] ** 2 + subset["std"] ** 2) / len(subset["runs"]))
    if augmented["min"] > subset["max"]:
        verdict = "gain"
    elif augmented["max"] < subset["min"]:
        verdict = "loss"
    else:
        verdict = "within the seeds' spread"
    return {"cas": generated["mean"], "cas_over_real": generated["mean"] / max(real["mean"], 1e-12),
            "equal_size": results[GENERATED]["images"] == results[REAL]["images"],
            "gain_points": 100 * gain, "gain_standard_error_points": 100 * standard_error, "gain_verdict": verdict}


# ---------------------------------------------------------------- the section

def section(config: DownstreamConfig | None, *, real: Dataset, generated: Dataset, seed: int,
            device: torch.device, track: Callable[[Iterable, str], Iterator]) -> dict:
    """Every arm trained on the real training split and the generated images (labelled in the real label
    names) and tested on the whole held-out split, or why not (config None: turned off)."""
    if config is None:
        return {"skipped": "turned off (--no-downstream)"}
    train, heldout = real.split(heldout=False), real.split(heldout=True)
    reason = skip_reason(train, heldout, generated)
    if reason is not None:
        return {"skipped": reason}
    arms = build_arms(train, generated, config.subset_per_class, seed, config.real_share)
    results = run_arms(arms, heldout, len(real.label_names), config, seed, device, track)
    return {"config": asdict(config), "test_images": int((heldout.labels >= 0).sum()),
            "names": real.label_names, "arms": results, **compare(results)}


def summary_lines(d: dict) -> list[str]:
    if "skipped" in d:
        return []
    arms = d["arms"]
    real, subset, augmented = arms[REAL], arms[SUBSET], arms[AUGMENTED]
    return [f"Classification Accuracy Score: {d['cas']:.1%} ({d['cas_over_real']:.0%} of "
            f"{real['accuracy']['mean']:.1%} for {real['images']:,} real images"
            f"{'' if d['equal_size'] else ', all there are'}).",
            f"Augmentation: {subset['images']:,} real images {subset['accuracy']['mean']:.1%}, plus "
            f"{augmented['images'] - subset['images']:,} generated {augmented['accuracy']['mean']:.1%}: "
            f"{d['gain_points']:+.2f} points ({d['gain_verdict']})."]


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
              f"mean ± standard deviation (range) over {c['seeds']} seeds. Real subset + generated: {mix}.", "",
              "| training set | images | held-out accuracy |", "|---|---:|---:|"]
    descriptions = {GENERATED: "generated images alone (CAS)", REAL: "real training images, as many",
                    SUBSET: f"real subset (at most {c['subset_per_class']} per class)",
                    AUGMENTED: "real subset + generated images"}
    lines += [f"| {descriptions[name]} | {arm['images']:,} | {accuracy_cell(arm['accuracy'])} |"
              for name, arm in arms.items()]
    size = " at equal size" if section["equal_size"] else " (fewer real images: all there are)"
    lines += ["", f"Classification Accuracy Score: **{section['cas']:.2%}**, {section['cas_over_real']:.1%} of the "
              f"real images' accuracy{size}.",
              "", f"Augmentation gain: **{section['gain_points']:+.2f} points** (standard error "
              f"{section['gain_standard_error_points']:.2f}): {section['gain_verdict']}.", "",
              "Accuracy per class (mean over seeds):", "",
              "| class | " + " | ".join(arms) + " |", "|---|" + "---:|" * len(arms)]
    lines += [f"| {name} | " + " | ".join(f"{arm['per_class'][i]:.1%}" for arm in arms.values()) + " |"
              for i, name in enumerate(section["names"])]
    return lines + [""]
