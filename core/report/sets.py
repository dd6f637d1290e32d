"""The sets a report compares: the real held-out reference, a sample of the generated images, and the
floor's draws (real images disjoint from the reference, as many as the generated sample)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core.artifacts import file_record, load_artifact
from core.data import Dataset, crop_to_content, load_image_dataset
from core.errors import PipelineError
from core.report.downstream import DownstreamConfig

CLASSIFIER_KIND = "feature_classifier"
TEACHER_FILE = "teacher.safetensors"  # beside a curated set: its teacher, a feature classifier


@dataclass
class EvalArgs:
    real_path: Path
    generated_path: Path
    out_dir: Path
    num_images: int = 1000
    seed: int = 0
    classifier_steps: int = 500
    classifier_path: Path | None = None
    prompt_classifier_steps: int = 600  # the word classifier of the prompt agreement section (captioned sets)
    k: int = 5
    pca_components: int = 64
    memorization_percentile: float = 5.0
    tsne_steps: int = 750
    floor_draws: int = 3  # one draw of the floor is noisy (the Fréchet distance of 1000 images varies by ~2x)
    downstream: bool = True
    downstream_config: DownstreamConfig = field(default_factory=DownstreamConfig)
    curated_path: Path | None = None  # curate_images.py's set of the generated images: the curated arms
    autoencoder_path: Path | None = None  # with codebook_paths: the tokenizer ceiling
    codebook_paths: list[Path] = field(default_factory=list)
    decoder_path: Path | None = None  # a decoder fine-tuned on the last codebook's maps: one more ceiling row
    device: str = "auto"
    progress: Callable[[Iterable, str], Iterator] | None = None  # a progress bar: (items, description)


@dataclass
class Sets:
    real: Dataset  # the whole real dataset
    train: Dataset  # its training split
    heldout: Dataset  # the reference: a sample of the held-out split
    generated: Dataset  # a sample of the generated images
    floors: list[Dataset]  # real images disjoint from `heldout`, as many as `generated`: the floor's draws
    floor_source: str
    all_generated: Dataset  # every generated image, labelled in the real data's label names
    knn_skipped: str | None  # why the k-NN metrics are left out (a set of at most k images), or None


def load_sets(args: EvalArgs) -> Sets:
    """The sets compared, each capped at num_images by a fixed random sample. The floor's sets come from the
    rest of the held-out split when it is, or can be made, large enough (the classifier never saw it
    either), else from the training split."""
    generated = load_image_dataset(args.generated_path)
    real = at_source_size(load_image_dataset(args.real_path), generated.items.shape[-2:])
    if args.classifier_path is not None:  # the real labels may be a subset of the classifier's (few-shot)
        names = load_artifact(args.classifier_path, CLASSIFIER_KIND).config.get("label_names", [])
        unknown = sorted(set(real.label_names) - set(names))
        if unknown:
            raise PipelineError(f"{args.classifier_path}: classifier does not know the labels "
                                f"{', '.join(unknown)} of {args.real_path}")
        real = real.relabelled(names)
    if real.items.shape[1:] != generated.items.shape[1:]:
        c, h, w = real.items.shape[1:]
        gc, gh, gw = generated.items.shape[1:]
        raise PipelineError(f"image shapes differ: {args.real_path} has {c}x{h}x{w} (CxHxW), "
                            f"{args.generated_path} has {gc}x{gh}x{gw}")
    heldout, train = real.split(heldout=True), real.split(heldout=False)
    if len(heldout) < 2:
        found = "no held-out images" if len(heldout) == 0 else "1 held-out image, the report needs at least 2"
        raise PipelineError(f"{args.real_path}: {found} (rebuild it with build_dataset.py --holdout 0.1)")
    if len(train) == 0:
        raise PipelineError(f"{args.real_path}: no training images")
    if len(generated) < 2:
        raise PipelineError(f"{args.generated_path}: {len(generated)} generated images, the report needs at least 2")
    all_generated = generated.relabelled(real.label_names)
    generated = generated.sample(args.num_images, args.seed + 1)
    order = torch.randperm(len(heldout), generator=torch.Generator().manual_seed(args.seed))
    references = min(args.num_images, len(heldout))
    if len(heldout) - references < len(generated) and len(heldout) >= 2 * len(generated):
        # a few-shot class: the reference gives up images so that the floor is held-out images too, of
        # the generated set's size (a floor of fewer, training images is not the same figure)
        references = len(heldout) - len(generated)
    reference, rest = heldout.take(order[:references]), heldout.take(order[references:])
    pool, source = (rest, "held-out") if len(rest) >= len(generated) else (train, "training")
    floors = [pool.sample(min(len(generated), len(pool)), args.seed + 2 + i) for i in range(args.floor_draws)]
    smallest = min([(len(generated), "generated"), (len(reference), "held-out"), (len(floors[0]), "floor")],
                   key=lambda counted: counted[0])
    knn_skipped = None if smallest[0] > args.k else (
        f"the {smallest[1]} set has {smallest[0]} images and the k-NN metrics need more than k={args.k}")
    return Sets(real, train, reference, generated, floors, source, all_generated, knn_skipped)


def at_source_size(real: Dataset, generated_shape: tuple[int, int]) -> Dataset:
    """Padded real images cut back to their source's size when the generated images (of this (height,
    width)) came back at it (generate_images.py's default), so that both are compared where the images are."""
    content = real.info.get("content_size")
    generated_size = [generated_shape[-1], generated_shape[-2]]
    if real.info.get("fit") != "pad" or not content or list(content) != generated_size \
            or tuple(real.items.shape[-2:]) == tuple(generated_shape):
        return real
    return replace(real, items=crop_to_content(real.items, content).contiguous())


def section(args: EvalArgs, sets: Sets) -> dict:
    """The report's head: what was compared with what."""
    return {"real": {**file_record(args.real_path), "train_images": len(sets.train),
                     "heldout_images": len(sets.heldout)},
            "generated": {**file_record(args.generated_path), "images": len(sets.generated)},
            "k": args.k, "seed": args.seed,
            "floor": f"the {len(sets.heldout)} held-out real images and {len(sets.floors[0])} other real "
                     f"{sets.floor_source} images (mean and range over {len(sets.floors)} draws)"}


def markdown(report: dict) -> list[str]:
    return [f"Real: `{report['real']['path']}` ({report['real']['heldout_images']} held-out images compared, "
            f"{report['real']['train_images']} training images). Generated: `{report['generated']['path']}` "
            f"({report['generated']['images']} images compared). k = {report['k']}.", "",
            f"Each figure has its **real floor**: the same metric between {report['floor']}. "
            "A generated set as good as real data scores about the floor.", ""]
