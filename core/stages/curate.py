"""The curation stage: a teacher classifier trained on the real training images labels every generated image
(its class probabilities: the soft label), near-copies of training images are dropped, and, where a
measurement on a validation split says so, so are the images the teacher rejects; the classes are kept
balanced. Which labels a curated image carries (asked, teacher, or a blend of the two) and which filter
applies are chosen per run on validation images: a fifth of each class's training images (carved), or, in a
chain with a validation share, the held-out split of its chain data (heldout): images that neither the
generator nor the teacher saw. The report's held-out split is never looked at.

The out dir:
    dataset.json        the kept images (paths into the generated set), each record with the label it
                        carries, its soft label and why it was kept ("curation"); part files past 250,000
    summary.json        kept and dropped per class, the teacher's agreement, the choice and its figures
    teacher.safetensors the teacher (a feature classifier: the report can reuse it)
    folder/<label>/*.png and folder/soft_labels.csv
                        the kept images as a class-folder tree (torchvision's ImageFolder, the Hugging Face
                        imagefolder loader) with their soft labels beside it

The generated records are read one record file at a time and the images in batches; beyond those, each generated
image keeps its scores (K + 2 numbers for K classes) in memory. bench/curate.py measures the peak: 662 MB at
300,000 images, but 2.4 GB at a million, so something per file is still held."""
from __future__ import annotations

import csv
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from core.artifacts import atomic_path, atomic_write_json, file_record, save_artifact, state_tensors
from core.console import console
from core.cores import in_parallel
from core.data import Dataset, load_image_dataset, read_image_files, read_table, record_files, write_records
from core.errors import PipelineError
from core.metrics import nearest_distances
from core.models.classifier import FeatureClassifier
from core.report import downstream
from core.report.sets import CLASSIFIER_KIND, TEACHER_FILE, at_source_size
from core.report.spaces import classifier_config, is_labelled, pixels
from core.training import pick_device

LABEL_MODES = ("asked", "teacher", "blend")
FILTERS = ("none", "agree", "confident")
# what the validation split chooses among: (labels carried, filter)
# a class keeping under this share of the median class's share of its images is left out of the balance
FAILED_SHARE = 0.25
CANDIDATES = (("asked", "none"), ("teacher", "none"), ("blend", "none"), ("asked", "agree"), ("blend", "confident"))


@dataclass
class CurateArgs:
    real_path: Path
    generated_path: Path
    out_dir: Path
    labels: str = "auto"  # one of LABEL_MODES, or auto: chosen on the validation split
    filter: str = "auto"  # one of FILTERS, or auto
    teacher_steps: int = 500
    confident_quantile: float = 0.5  # the confident filter drops each asked class's least confident share
    memorization_percentile: float = 5.0  # the report's near-copy rule
    validation: str = "carved"  # the choice's validation images (downstream.VALIDATION)
    validation_share: float = 0.2  # of each class's training images, for the choice when carved
    choice_images: int = 5000  # generated images the choice is made on, at most
    choice_seeds: int = 2
    downstream: downstream.DownstreamConfig = field(default_factory=downstream.DownstreamConfig)
    folder: bool = True
    batch_size: int = 1024
    seed: int = 0
    device: str = "auto"
    progress: Callable[[Iterable, str], Iterator] | None = None


@dataclass
class Scores:
    """What curation knows of a set of generated images."""
    asked: torch.Tensor  # (N,) the label each was generated for, in the real label names (-1: none)
    probs: torch.Tensor | None  # (N, K) the teacher's class probabilities (None: no teacher)
    nearest: torch.Tensor  # (N,) pixel distance to the nearest training image


@dataclass
class Rule:
    """One way to curate: the labels carried, the filter, and its thresholds."""
    labels: str
    filter: str
    near_copy_threshold: float
    confidence_floors: torch.Tensor | None = None  # (K,) per asked class, for the confident filter


# ---------------------------------------------------------------- the rule, on scores in memory

def confidence_floors(scores: Scores, num_classes: int, quantile: float) -> torch.Tensor:
    """Per asked class, the `quantile` of the teacher's probability for that class over its images."""
    floors = torch.zeros(num_classes)
    for c in range(num_classes):
        mine = scores.asked == c
        if mine.any():
            floors[c] = torch.quantile(scores.probs[mine, c].double(), quantile).float()
    return floors


def targets_of(scores: Scores, labels: str, num_classes: int) -> torch.Tensor:
    """(N, K) the class probabilities each image carries."""
    asked = F.one_hot(scores.asked.clamp_min(0), num_classes).float() * (scores.asked >= 0).float()[:, None]
    if labels == "asked" or scores.probs is None:
        return asked
    if labels == "teacher":
        return scores.probs.clone()
    blend = 0.5 * asked + 0.5 * scores.probs
    return torch.where((scores.asked >= 0)[:, None], blend, scores.probs)


def passes(scores: Scores, rule: Rule) -> tuple[torch.Tensor, torch.Tensor]:
    """Which images pass the near-copy rule, and which pass the filter too (both (N,) bool)."""
    novel = scores.nearest >= rule.near_copy_threshold
    if rule.filter == "none" or scores.probs is None:
        return novel, novel
    asked = scores.asked.clamp_min(0)
    if rule.filter == "agree":
        accepted = scores.probs.argmax(1) == scores.asked
    else:
        accepted = (scores.probs.gather(1, asked[:, None])[:, 0] >= rule.confidence_floors[asked]) & (scores.asked >= 0)
    return novel, novel & accepted


def carried_labels(targets: torch.Tensor, scores: Scores, labels: str) -> torch.Tensor:
    """The one label each image carries: the asked one, or the soft label's most likely class."""
    if labels == "asked" or scores.probs is None:
        return scores.asked
    return targets.argmax(1)


def balance_caps(carried: torch.Tensor, kept: torch.Tensor, asked: torch.Tensor, num_classes: int
                 ) -> tuple[torch.Tensor, list[int]] | None:
    """Per class, how many kept images keep the classes in the proportions they were asked for: every class
    keeps the share of its asked images that the most filtered class keeps. A class that keeps none, or under
    FAILED_SHARE of the median class's share, is left out of that (the generator fails it: it keeps what
    passed), so that one failed class does not empty the set. Returns the caps (K,) and the failed classes, or
    None when no image carries an asked label."""
    kept_counts = torch.bincount(carried[kept & (carried >= 0)], minlength=num_classes).double()
    asked_counts = torch.bincount(asked[asked >= 0], minlength=num_classes).double()
    if not (asked_counts > 0).any():
        return None
    share = kept_counts / asked_counts.clamp_min(1)
    measured = asked_counts > 0
    failed = measured & ((share < FAILED_SHARE * share[measured].median()) | (share == 0))
    balanced = measured & ~failed
    if not balanced.any():  # nothing kept: nothing to balance
        return kept_counts.long(), []
    floor = share[balanced].min()
    caps = torch.where(balanced, (floor * asked_counts + 1e-6).floor(), kept_counts)
    return caps.long(), failed.nonzero().flatten().tolist()


def select(scores: Scores, rule: Rule, num_classes: int
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """The images kept (N,) bool, the label (N,) and the probabilities (N, K) each carries, and the classes left
    out of the balance."""
    targets = targets_of(scores, rule.labels, num_classes)
    carried = carried_labels(targets, scores, rule.labels)
    _, kept = passes(scores, rule)
    balance = balance_caps(carried, kept, scores.asked, num_classes)
    failed = []
    if balance is not None:
        caps, failed = balance
        for c in range(num_classes):  # the first caps[c] kept images of each class stay
            mine = kept & (carried == c)
            kept &= ~mine | (mine.cumsum(0) <= caps[c])
    return kept, carried, targets, failed


# ---------------------------------------------------------------- the teacher and the scores

def train_teachers(sets: list[Dataset], real: Dataset, args: CurateArgs, device: torch.device
                   ) -> list[FeatureClassifier]:
    """A teacher trained on each set's labelled images, side by side."""
    config = classifier_config(real, args.teacher_steps, args.seed)
    track = args.progress or (lambda items, _: iter(items))

    def teacher(data: Dataset) -> FeatureClassifier:
        return downstream.train_classifier(*downstream.labelled(data), len(real.label_names), config, device)
    return in_parallel(teacher, sets, lambda it: track(it, f"curation: {len(sets)} teacher(s)"))


def score(images: torch.Tensor, asked: torch.Tensor, teacher: FeatureClassifier | None,
          reference: torch.Tensor, device: torch.device) -> Scores:
    nearest, _ = nearest_distances(pixels(images).to(device), reference)
    probs = downstream.probabilities(teacher, images, device) if teacher is not None else None
    return Scores(asked, probs, nearest)


def near_copy_threshold(fit: Dataset, validation: Dataset, percentile: float, device: torch.device) -> float:
    """The report's rule with the validation images in the held-out images' place: the `percentile` of their
    distances to their nearest training image (of the rest of the training split)."""
    distances, _ = nearest_distances(pixels(validation.items).to(device), pixels(fit.items).to(device))
    return float(torch.quantile(distances.double(), percentile / 100))


# ---------------------------------------------------------------- the generated set, streamed

@dataclass
class Batch:
    records: list[dict]
    asked: torch.Tensor


def generated_batches(path: Path, names: list[str], batch_size: int) -> Iterator[Batch]:
    """The generated records in batches, each with its asked labels in `names` (-1: none)."""
    for records in record_files(path):
        for start in range(0, len(records), batch_size):
            chunk = records[start:start + batch_size]
            asked = [str(r["labels"][0]) if r.get("labels") else None for r in chunk]
            yield Batch(chunk, torch.tensor([names.index(a) if a in names else -1 for a in asked], dtype=torch.long))


def batch_images(path: Path, batch: Batch, channels: int) -> torch.Tensor:
    return read_image_files([path.parent / r["image_fpath"] for r in batch.records], channels)


def count_records(path: Path) -> tuple[int, dict | None]:
    """How many records the dataset holds, and its first one."""
    total, first = 0, None
    for records in record_files(path):
        first = first or (records[0] if records else None)
        total += len(records)
    return total, first


def sample_images(path: Path, names: list[str], count: int, total: int, channels: int, seed: int,
                  batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A fixed random sample of at most `count` generated images and their asked labels."""
    wanted = set(torch.randperm(total, generator=torch.Generator().manual_seed(seed))[:count].tolist())
    images, asked, start = [], [], 0
    for batch in generated_batches(path, names, batch_size):
        picked = [i for i in range(len(batch.records)) if start + i in wanted]
        start += len(batch.records)
        if picked:
            sub = Batch([batch.records[i] for i in picked], batch.asked[picked])
            images.append(batch_images(path, sub, channels))
            asked.append(sub.asked)
    return torch.cat(images), torch.cat(asked)


# ---------------------------------------------------------------- the choice on the validation split

def choose(args: CurateArgs, real: Dataset, split: tuple[Dataset, Dataset], teacher: FeatureClassifier, total: int,
           threshold: float, device: torch.device) -> dict:
    """Every candidate rule measured on the validation split: `teacher` (trained on the rest of the training
    images, `split`'s first part) labels a sample of the generated images, and the downstream classifier
    trained on the rest with the sample curated by each rule mixed in (at the downstream section's real
    share) is tested on the validation images."""
    fit, validation = split
    k = len(real.label_names)
    images, asked = sample_images(args.generated_path, real.label_names, args.choice_images, total,
                                  real.items.shape[1], args.seed, args.batch_size)
    scores = score(images, asked, teacher, pixels(fit.items).to(device), device)
    floors = confidence_floors(scores, k, args.confident_quantile)
    fit_hot = F.one_hot(fit.labels, k).float()
    arms, figures = [downstream.Arm("real alone", fit.items, fit.labels)], {"real alone": {"images": 0}}
    for labels, filter_ in CANDIDATES:
        kept, carried, targets, _ = select(scores, Rule(labels, filter_, threshold, floors), k)
        kept &= carried >= 0
        name = f"{labels} labels, filter {filter_}"
        weights = downstream.half_and_half(len(fit), int(kept.sum()), args.downstream.real_share) if kept.any() else None
        arms.append(downstream.Arm(name, torch.cat([fit.items, images[kept]]), torch.cat([fit.labels, carried[kept]]),
                                   weights,
                                   targets=torch.cat([fit_hot, targets[kept]])))
        figures[name] = {"labels": labels, "filter": filter_, "images": int(kept.sum())}
    accuracies = downstream.accuracy_over_seeds(arms, validation.items, validation.labels, k,
                                                downstream.classifier_settings(args.downstream),
                                                seeds=args.choice_seeds, seed=args.seed, device=device,
                                                track=args.progress, description="curation: the choice")
    for name, accuracy in accuracies.items():
        figures[name]["accuracy"] = accuracy
    best = max((f for f in figures.values() if "labels" in f), key=lambda f: f["accuracy"]["mean"])
    return {"labels": best["labels"], "filter": best["filter"], "fit_images": len(fit),
            "validation_images": len(validation), "generated_images": len(images), "near_copy_threshold": threshold,
            "seeds": args.choice_seeds, "candidates": figures}


# ---------------------------------------------------------------- the run

def check_args(args: CurateArgs) -> None:
    if args.labels not in (*LABEL_MODES, "auto"):
        raise PipelineError(f"--labels must be one of {', '.join(LABEL_MODES)} or auto, got '{args.labels}'")
    if args.filter not in (*FILTERS, "auto"):
        raise PipelineError(f"--filter must be one of {', '.join(FILTERS)} or auto, got '{args.filter}'")
    if args.validation not in downstream.VALIDATION:
        raise PipelineError(f"--validation must be one of {', '.join(downstream.VALIDATION)}, got '{args.validation}'")
    if not 0 < args.validation_share < 1:
        raise PipelineError(f"--validation-share must lie between 0 and 1, got {args.validation_share}")


def run(args: CurateArgs) -> dict:
    """Curate the generated set: write dataset.json, summary.json, the teacher and the class folders into
    out_dir. Returns the summary."""
    check_args(args)
    device = pick_device(args.device)
    real_all = load_image_dataset(args.real_path)
    total, first = count_records(args.generated_path)
    if first is None:
        raise PipelineError(f"{args.generated_path}: the dataset holds no images")
    shape = read_image_files([args.generated_path.parent / first["image_fpath"]]).shape
    real = at_source_size(real_all, shape[-2:])
    if real.items.shape[2:] != shape[2:]:
        raise PipelineError(f"image shapes differ: {args.real_path} has {tuple(real.items.shape[1:])} (CxHxW), "
                            f"{args.generated_path} has {tuple(shape[1:])}")
    train = real.split(heldout=False)
    if len(train) < 4:
        raise PipelineError(f"{args.real_path}: {len(train)} training images, curation needs at least 4")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    summary: dict = {"real": file_record(args.real_path), "generated": {**file_record(args.generated_path),
                                                                         "images": total}}
    # real-to-real distances, whether or not the generator saw the images: the carved fifth, which has more
    # images than a small chain's validation share
    threshold = near_copy_threshold(*downstream.validation_split(train, args.validation_share, args.seed),
                                    args.memorization_percentile, device)
    if not is_labelled(real):
        console.print(f"{args.real_path} has no labels: no teacher, near-copies are dropped and nothing else",
                      soft_wrap=True, highlight=False)
        rule, teacher = Rule("asked", "none", threshold), None
        summary["teacher"] = "none: the real images carry no labels"
    else:
        labels, filter_ = args.labels, args.filter
        split = downstream.fit_and_validation(real.with_labels(), args.validation, args.validation_share, args.seed)
        auto = "auto" in (labels, filter_)
        # validating on the held-out split, the choice's teacher fits the training images: it is the teacher
        teachers = train_teachers([train, split[0]] if auto and args.validation == "carved" else [train], real,
                                  args, device)
        teacher = teachers[0]
        if auto:
            summary["choice"] = choice = choose(args, real, split, teachers[-1], total, threshold, device)
            labels = choice["labels"] if labels == "auto" else labels
            filter_ = choice["filter"] if filter_ == "auto" else filter_
        config = classifier_config(real, args.teacher_steps, args.seed)
        save_artifact(args.out_dir / TEACHER_FILE, state_tensors(teacher), CLASSIFIER_KIND, config,
                      {"stage": "curate", "real": file_record(args.real_path), "step": args.teacher_steps})
        summary["teacher"] = {"path": TEACHER_FILE, "training_images": len(train),
                              "steps": args.teacher_steps}
        rule = Rule(labels, filter_, threshold)
    summary.update(curate_all(args, real, train, teacher, rule, total, device))
    atomic_write_json(args.out_dir / "summary.json", summary)
    return summary


def curate_all(args: CurateArgs, real: Dataset, train: Dataset, teacher: FeatureClassifier | None, rule: Rule,
               total: int, device: torch.device) -> dict:
    """Score every generated image, settle the rule's thresholds and the balance, then write the kept records
    (and the class folders)."""
    names, k = real.label_names, max(len(real.label_names), 1)
    reference = pixels(train.items).to(device)
    track = args.progress or (lambda items, _: iter(items))
    batches = generated_batches(args.generated_path, names, args.batch_size)
    parts = [score(batch_images(args.generated_path, batch, real.items.shape[1]), batch.asked, teacher, reference,
                   device) for batch in track(batches, "curation: scoring")]
    everything = Scores(torch.cat([s.asked for s in parts]),
                        torch.cat([s.probs for s in parts]) if teacher is not None else None,
                        torch.cat([s.nearest for s in parts]))
    del parts
    if rule.filter == "confident":
        rule.confidence_floors = confidence_floors(everything, k, args.confident_quantile)
    kept, carried, targets, failed = select(everything, rule, k)
    novel, accepted = passes(everything, rule)
    summary = write_curated(args, names, everything, rule, kept, carried, targets)
    labelled_asked = everything.asked >= 0
    summary.update({"rule": {"labels": rule.labels, "filter": rule.filter,
                             "near_copy_threshold": rule.near_copy_threshold,
                             **({"confidence_floors": dict(zip(names, rule.confidence_floors.tolist()))}
                                if rule.confidence_floors is not None else {})},
                    "dropped": {"near_copies": int((~novel).sum()), "teacher": int((novel & ~accepted).sum()),
                                "balance": int((accepted & ~kept).sum())},
                    "left_out_of_the_balance": [names[c] for c in failed]})
    if everything.probs is not None and labelled_asked.any():
        agrees = everything.probs.argmax(1) == everything.asked
        summary["agreement"] = float(agrees[labelled_asked].float().mean())
        summary["agreement_per_class"] = {name: float(agrees[everything.asked == c].float().mean())
                                          for c, name in enumerate(names) if (everything.asked == c).any()}
    return summary


def reason(scores: Scores, rule: Rule, i: int) -> str:
    why = [f"{float(scores.nearest[i]):.3g} from its nearest training image (near-copies under "
           f"{rule.near_copy_threshold:.3g})"]
    if scores.probs is not None and rule.filter == "agree":
        why.append("the teacher agrees with the asked label")
    elif scores.probs is not None and rule.filter == "confident":
        c = int(scores.asked[i])
        why.append(f"the teacher gives the asked label {float(scores.probs[i, c]):.2f}, at least the class's "
                   f"floor {float(rule.confidence_floors[c]):.2f}")
    return "; ".join(why)


def write_curated(args: CurateArgs, names: list[str], scores: Scores, rule: Rule, kept: torch.Tensor,
                  carried: torch.Tensor, targets: torch.Tensor) -> dict:
    generated_dir = args.generated_path.parent
    folder = args.out_dir / "folder" if args.folder and scores.probs is not None else None
    if folder is not None and folder.exists():
        shutil.rmtree(folder)
    soft_rows: list[list] = []

    def records() -> Iterator[dict]:
        index = 0
        for batch in generated_batches(args.generated_path, names, args.batch_size):
            for record in batch.records:
                if kept[index]:
                    yield curated_record(record, index)
                index += 1

    def curated_record(record: dict, i: int) -> dict:
        source = generated_dir / record["image_fpath"]
        c = int(carried[i])
        out = {**record, "image_fpath": os.path.relpath(source, args.out_dir),
               "labels": [names[c]] if c >= 0 else [],
               "curation": {"asked": names[int(scores.asked[i])] if scores.asked[i] >= 0 else None,
                            "nearest_training_distance": float(scores.nearest[i]),
                            "kept": reason(scores, rule, i)}}
        if scores.probs is not None:
            p = scores.probs[i]
            out["soft_label"] = [round(float(v), 5) for v in targets[i]]
            out["curation"].update({"teacher": names[int(p.argmax())], "confidence": float(p.max()),
                                    "teacher_agrees": bool(int(p.argmax()) == int(scores.asked[i]))})
        if folder is not None and c >= 0:
            name = f"{names[c]}/{len(soft_rows):07d}{source.suffix}"
            link_or_copy(source, folder / name)
            soft_rows.append([name, names[c], *out["soft_label"]])
        return out

    info = {"kind": "curated", "label_names": names,
            "soft_label_names": names if scores.probs is not None else None, "images": int(kept.sum()),
            "source": file_record(args.generated_path)}
    tables = {"runs": read_table(args.generated_path, "runs")}
    write_records(args.out_dir / "dataset.json", records(), info, tables)
    if folder is not None:
        with atomic_path(folder / "soft_labels.csv") as tmp, open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["file", "label", *names])
            writer.writerows(soft_rows)
    counts = torch.bincount(carried[kept & (carried >= 0)], minlength=len(names)).tolist() if names else []
    return {"kept": int(kept.sum()), "kept_per_class": dict(zip(names, counts)),
            **({"folder": "folder"} if folder is not None else {})}


def link_or_copy(source: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:  # another file system
        shutil.copyfile(source, target)
