"""The quality report: generated images against real ones, in a classifier's feature space and a pixel-PCA
space. Fréchet distance, precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020),
a memorization check, class histograms, and 2-D projections (PCA, t-SNE). Every figure comes with its
real-vs-real floor: the same metric between two disjoint real sets of the same sizes.

Two further sections: the tokenizer ceiling (the same figures for real images passed through the
autoencoder and each codebook: how much of the distance the tokenizer alone costs), and the downstream
experiment (core/downstream.py: do the generated images teach a classifier?)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from core import downstream, pictures
from core.artifacts import (atomic_path, atomic_write_json, file_record, load_artifact, load_state, save_artifact,
                            state_tensors)
from core.data import Dataset, crop_to_content, load_image_dataset, read_image_files, to_float, to_uint8
from core.downstream import DownstreamConfig, predict
from core.errors import PipelineError
from core.metrics import Progress, all_metrics, memorization_rate, nearest_distances, pca, tsne
from core.model_artifacts import check_fits, load_autoencoder, load_codebook
from core.models.autoencoder import Autoencoder
from core.models.classifier import FeatureClassifier
from core.models.codebook import SOMCodebook
from core.stages import prompt_agreement
from core.training import pick_device

CLASSIFIER_KIND = "feature_classifier"
CLASSIFIER_FILE = "classifier.safetensors"
Featurize = Callable[[torch.Tensor], torch.Tensor]  # uint8 images (N, C, H, W) -> features (N, D)


# ---------------------------------------------------------------- the feature classifier

def classifier_config(real: Dataset, steps: int, seed: int) -> dict:
    _, channels, height, width = real.items.shape
    return {"channels": channels, "height": height, "width": width, "label_names": real.label_names,
            "steps": steps, "batch_size": 128, "lr": 3e-3, "model_width": 16, "features": 128, "seed": seed}


def build_classifier(config: dict) -> FeatureClassifier:
    return FeatureClassifier(config["channels"], len(config["label_names"]), config["model_width"],
                             config["features"])


def obtain_classifier(real: Dataset, train: Dataset, out_dir: Path, steps: int, seed: int, device: torch.device,
                      classifier_path: Path | None, progress: Progress = iter) -> tuple[FeatureClassifier, dict]:
    """The classifier given by --classifier-path, else the one in out_dir if made with the same config from
    the same real data, else a freshly trained one (saved to out_dir)."""
    config = classifier_config(real, steps, seed)
    source = file_record(real.path)
    path = classifier_path or out_dir / CLASSIFIER_FILE
    if classifier_path is not None or path.exists():
        artifact = load_artifact(path, CLASSIFIER_KIND)
        if classifier_path is not None:  # a user's choice: it must only fit the data
            wanted = {k: config[k] for k in ("channels", "height", "width", "label_names")}
            found = {k: artifact.config.get(k) for k in wanted}
            if found != wanted:
                raise PipelineError(f"{path}: classifier made for {found}, the real data {real.path} has {wanted}")
            reuse = True
        else:
            reuse = artifact.config == config and artifact.provenance.get("real", {}).get("sha256") == source["sha256"]
        if reuse:
            model = build_classifier(artifact.config)
            load_state(model, artifact.tensors, path)
            return model.to(device).eval(), {"path": str(path), "reused": True, "config": artifact.config}
    images, labels = downstream.labelled(train)
    if len(images) < 2:
        raise PipelineError(f"{train.path}: too few labelled training images to train a classifier")
    model = downstream.train_classifier(images, labels, len(config["label_names"]), config, device, progress)
    save_artifact(path, state_tensors(model), CLASSIFIER_KIND, config,
                  {"stage": "evaluate", "real": source, "step": steps})
    return model, {"path": str(path), "reused": False, "config": config}


# ---------------------------------------------------------------- the report

@dataclass
class EvalArgs:
    real_path: Path
    generated_path: Path
    out_dir: Path
    num_images: int = 1000
    seed: int = 0
    classifier_steps: int = 500
    classifier_path: Path | None = None
    k: int = 5
    pca_components: int = 64
    memorization_percentile: float = 5.0
    tsne_steps: int = 750
    floor_draws: int = 3  # one draw of the floor is noisy (the Fréchet distance of 1000 images varies by ~2x)
    downstream: bool = True
    downstream_config: DownstreamConfig = field(default_factory=DownstreamConfig)
    autoencoder_path: Path | None = None  # with codebook_paths: the tokenizer ceiling
    codebook_paths: list[Path] = field(default_factory=list)
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


def load_sets(args: EvalArgs) -> Sets:
    """The sets compared, each capped at num_images by a fixed random sample. The floor's sets come from the
    rest of the held-out split when it is, or can be made, large enough (the classifier never saw it
    either), else from the training split."""
    generated = load_image_dataset(args.generated_path)
    real = at_source_size(load_image_dataset(args.real_path), generated)
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
    if len(heldout) == 0:
        raise PipelineError(f"{args.real_path}: no held-out images (rebuild it with build_dataset.py --holdout 0.1)")
    if len(train) == 0:
        raise PipelineError(f"{args.real_path}: no training images")
    for name, size in (("held-out", len(heldout)), ("generated", len(generated))):
        if min(size, args.num_images) <= args.k:
            raise PipelineError(f"{name} set has {size} images; the k-NN metrics need more than k={args.k}")
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
    return Sets(real, train, reference, generated, floors, source, all_generated)


def at_source_size(real: Dataset, generated: Dataset) -> Dataset:
    """Padded real images cut back to their source's size when the generated images came back at it
    (generate_images.py's default), so that both are compared where the images are."""
    content = real.info.get("content_size")
    generated_size = [generated.items.shape[-1], generated.items.shape[-2]]
    if real.info.get("fit") != "pad" or not content or list(content) != generated_size \
            or real.items.shape[-2:] == generated.items.shape[-2:]:
        return real
    return replace(real, items=crop_to_content(real.items, content).contiguous())


def pixels(images: torch.Tensor) -> torch.Tensor:
    return to_float(images).flatten(1)


def class_histogram(predictions: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(predictions, minlength=num_classes).tolist()


def run(args: EvalArgs) -> dict:
    """Compute every figure, draw the pictures, write report.json and report.md into out_dir."""
    track = args.progress or (lambda items, description: iter(items))
    device = pick_device(args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sets = load_sets(args)
    real, train, heldout, generated = sets.real, sets.train, sets.heldout, sets.generated
    if args.codebook_paths and args.autoencoder_path is None:
        raise PipelineError("--codebook-path needs --autoencoder-path (the autoencoder whose maps it tokenizes)")
    stored_shape = (real.items.shape[1], *[real.info.get("size", side) for side in real.items.shape[-2:]])
    tokenizer = None if args.autoencoder_path is None else load_tokenizer(  # it reads the images as stored
        args.autoencoder_path, args.codebook_paths, stored_shape, device)
    report: dict = {
        "real": {**file_record(args.real_path), "train_images": len(train), "heldout_images": len(heldout)},
        "generated": {**file_record(args.generated_path), "images": len(generated)},
        "k": args.k, "seed": args.seed, "spaces": {},
        "floor": f"the {len(heldout)} held-out real images and {len(sets.floors[0])} other real "
                 f"{sets.floor_source} images (mean and range over {len(sets.floors)} draws)",
    }

    featurizers: dict[str, Featurize] = {}
    labelled = real.labels.ge(0).any().item() and len(real.label_names) >= 2
    if labelled:
        model, info = obtain_classifier(real, train, args.out_dir, args.classifier_steps, args.seed, device,
                                        args.classifier_path, lambda it: track(it, "classifier"))
        all_heldout = real.split(heldout=True)
        _, heldout_predictions = predict(model, all_heldout.items, device)
        mask = all_heldout.labels >= 0
        info["heldout_accuracy"] = float((heldout_predictions[mask] == all_heldout.labels[mask]).float().mean())
        (_, h_pred), (_, g_pred) = (predict(model, s.items, device) for s in (heldout, generated))
        featurizers["classifier"] = lambda images: predict(model, images, device)[0]
        report["classifier"] = info
        report["classes"] = class_report(real.label_names, h_pred, g_pred, generated, model.head.out_features)

    fit = train.sample(5000, args.seed + 3)  # the PCA fit is on at most 5000 training images: plenty for 64 axes
    # axes fitted on fewer than ~10 images each describe those images, not the data (few-shot sets)
    projection = pca(pixels(fit.items), max(2, min(args.pca_components, len(fit) // 10)))
    featurizers["pixel_pca"] = lambda images: projection.project(pixels(images)).float()
    report["pixel_pca"] = {"components": int(projection.components.shape[0]),
                           "explained_variance": float(projection.explained.sum()), "fit_images": len(fit)}

    # per space: the reference's features, and the generated set's and the floor draws' metrics against it
    references = {name: featurize(heldout.items) for name, featurize in featurizers.items()}
    generated_features = {}
    for name, featurize in featurizers.items():
        generated_features[name] = featurize(generated.items)
        value = all_metrics(references[name], generated_features[name], args.k)
        draws = [all_metrics(references[name], featurize(f.items), args.k) for f in sets.floors]
        report["spaces"][name] = {metric: {"value": value[metric],
                                           "real_floor": sum(d[metric] for d in draws) / len(draws),
                                           "real_floor_range": [min(d[metric] for d in draws),
                                                                max(d[metric] for d in draws)]}
                                  for metric in value}

    report["memorization"] = memorization(train, heldout, generated, args, device, track)
    report["tokenizer_ceiling"] = tokenizer_ceiling(args, tokenizer, sets.floors[0], references, featurizers,
                                                    report["spaces"], device)
    report["downstream"] = downstream_section(args, sets, device, track)
    prompts = prompt_agreement.section(real, args.generated_path, args.out_dir, device, args.seed,
                                       progress=lambda it: track(it, "prompt classifier"))
    if prompts is not None:  # captioned real and generated images
        report["prompts"] = prompts
    report["pictures"] = draw_pictures(args, heldout, generated, references, generated_features, track)
    atomic_write_json(args.out_dir / "report.json", report)
    with atomic_path(args.out_dir / "report.md") as tmp:
        tmp.write_text(markdown(report))
    return report


def class_report(names: list[str], heldout_predictions: torch.Tensor, generated_predictions: torch.Tensor,
                 generated: Dataset, num_classes: int) -> dict:
    generated_counts = class_histogram(generated_predictions, num_classes)
    heldout_counts = class_histogram(heldout_predictions, num_classes)
    result = {"names": names, "generated": generated_counts, "real_heldout": heldout_counts,
              "generated_present": sum(c > 0 for c in generated_counts),
              "real_present": sum(c > 0 for c in heldout_counts)}
    # generated records that name a label: does the classifier see that label?
    asked = [generated.label_names[i] if i >= 0 else None for i in generated.labels.tolist()]
    wanted = torch.tensor([names.index(name) if name in names else -1 for name in asked], dtype=torch.long)
    if (wanted >= 0).any():
        result["label_agreement"] = float((generated_predictions[wanted >= 0] == wanted[wanted >= 0]).float().mean())
    return result


# ---------------------------------------------------------------- memorization

def memorization(train: Dataset, heldout: Dataset, generated: Dataset, args: EvalArgs, device: torch.device,
                 track: Callable) -> dict:
    """In pixel space: nearest training image of each generated and each held-out image. The generated
    images closer than the threshold are flagged as copies, each with the training image it copies."""
    reference = pixels(train.items).to(device)
    g_nn, g_index = nearest_distances(pixels(generated.items).to(device), reference,
                                      progress=lambda it: track(it, "memorization (generated)"))
    h_nn, _ = nearest_distances(pixels(heldout.items).to(device), reference,
                                progress=lambda it: track(it, "memorization (held-out)"))
    result = memorization_rate(g_nn, h_nn, args.memorization_percentile)
    result["space"] = "pixels in [-1, 1], Euclidean"
    result["reference_images"] = len(train)
    result["generated_images"] = len(generated)
    result["well_above_floor"] = well_above(result["generated_rate"], result["heldout_rate"], len(generated))
    flagged = [i for i in g_nn.argsort().tolist() if g_nn[i] < result["threshold"]]
    result["copies"] = [{"generated": generated.records[i]["image_fpath"],
                         "training": train.records[g_index[i]]["image_fpath"], "distance": float(g_nn[i])}
                        for i in flagged]
    closest = g_nn.argsort()[:8]
    pictures.pairs_grid(generated.items[closest], train.items[g_index[closest]], args.out_dir / "nearest.png")
    result["nearest_picture"] = "nearest.png"
    return result


def well_above(generated_rate: float, floor_rate: float, count: int) -> bool:
    """A memorizing generator: at least twice the real rate, and more than three binomial standard errors
    (of `count` images at the real rate) above it."""
    standard_error = math.sqrt(max(floor_rate * (1 - floor_rate), 1e-12) / max(count, 1))
    return generated_rate >= 2 * floor_rate and generated_rate - floor_rate > 3 * standard_error


# ---------------------------------------------------------------- the tokenizer ceiling

@dataclass
class Tokenizer:
    autoencoder: Autoencoder
    codebooks: list[tuple[str, SOMCodebook]]  # (a name for the report, the codebook)


def load_tokenizer(autoencoder_path: Path, codebook_paths: list[Path], image_shape: tuple[int, ...],
                   device: torch.device) -> Tokenizer:
    """The autoencoder and codebooks, checked against the real images' shape (C, H, W) and each other."""
    autoencoder, _ = load_autoencoder(autoencoder_path)
    if image_shape[0] != autoencoder.cfg.image_channel:
        raise PipelineError(f"{autoencoder_path} expects {autoencoder.cfg.image_channel}-channel images, "
                            f"the real data has {image_shape[0]}-channel images")
    latent = autoencoder.latent_shape(image_shape[-1])
    codebooks = []
    for path in codebook_paths:
        codebook, _ = load_codebook(path)
        check_fits(codebook.cfg, latent, path, autoencoder_path)
        cfg = codebook.cfg
        tokens = f"{cfg.num_patches} token{'s' if cfg.num_patches > 1 else ''}"
        shape = f"{cfg.patch_H}x{cfg.patch_W} patches: {tokens}, {cfg.num_embeddings} units"
        codebooks.append((f"codebook `{path.parent.name}` ({shape})", codebook.to(device)))
    return Tokenizer(autoencoder.to(device), codebooks)


@torch.no_grad()
def reconstructions(images: torch.Tensor, tokenizer: Tokenizer, device: torch.device,
                    batch_size: int = 256) -> list[tuple[str, torch.Tensor]]:
    """uint8 images passed through the autoencoder, and through each codebook (encode, tokenize, look the
    tokens up, decode), each rounded to uint8 like a stored image: [(name, images)]."""
    autoencoder = tokenizer.autoencoder
    fmaps = torch.cat([autoencoder.encoder(to_float(b).to(device)) for b in images.split(batch_size)])

    def decode(maps: torch.Tensor) -> torch.Tensor:
        return torch.cat([to_uint8(autoencoder.decoder(m).float().clamp(-1, 1)) for m in maps.split(batch_size)])

    rows = [("autoencoder", decode(fmaps))]
    rows += [(name, decode(torch.cat([cb.lookup(cb.tokenize(m)) for m in fmaps.split(batch_size)])))
             for name, cb in tokenizer.codebooks]
    return rows


def ceiling_rows(candidates: list[tuple[str, torch.Tensor]], references: dict[str, torch.Tensor],
                 featurizers: dict[str, Featurize], floors: dict[str, float], k: int) -> list[dict]:
    """Each candidate image set's metrics against the reference in every space, its Fréchet distance also
    as a multiple of the real floor's."""
    rows = []
    for name, images in candidates:
        row = {"images": name, "spaces": {}}
        for space, featurize in featurizers.items():
            metrics = all_metrics(references[space], featurize(images), k)
            metrics["frechet_over_floor"] = metrics["frechet_distance"] / max(floors[space], 1e-12)
            row["spaces"][space] = metrics
        rows.append(row)
    return rows


def tokenizer_ceiling(args: EvalArgs, tokenizer: Tokenizer | None, floor: Dataset,
                      references: dict[str, torch.Tensor], featurizers: dict[str, Featurize], spaces: dict,
                      device: torch.device) -> dict:
    """The floor's real images as stored and reconstructed, compared with the same reference as the
    generated set: a perfect tokenizer scores the floor (1x), and no generator beats its tokenizer."""
    if tokenizer is None:
        return {"skipped": "no --autoencoder-path given"}
    floors = {space: metrics["frechet_distance"]["real_floor"] for space, metrics in spaces.items()}
    candidates = [("real images as stored", floor.items)]
    size = floor.info.get("size")
    cut = size is not None and tuple(floor.items.shape[-2:]) != (size, size)
    stored = read_image_files([floor.path.parent / r["image_fpath"] for r in floor.records],
                              floor.items.shape[1]) if cut else floor.items
    # reconstructed as stored (padded, when the build padded them), compared at the floor's own size
    candidates += [(name, crop_to_content(images, [floor.items.shape[-1], floor.items.shape[-2]]).contiguous())
                   for name, images in reconstructions(stored, tokenizer, device)]
    rows = ceiling_rows(candidates, references, featurizers, floors, args.k)
    rows.append({"images": "generated", "spaces": {
        space: {**{m: v["value"] for m, v in metrics.items()},
                "frechet_over_floor": metrics["frechet_distance"]["value"] / max(floors[space], 1e-12)}
        for space, metrics in spaces.items()}})
    return {"autoencoder": file_record(args.autoencoder_path),
            "codebooks": [file_record(p) for p in args.codebook_paths], "images": len(floor), "rows": rows}


# ---------------------------------------------------------------- downstream

def downstream_section(args: EvalArgs, sets: Sets, device: torch.device, track: Callable) -> dict:
    if not args.downstream:
        return {"skipped": "turned off (--no-downstream)"}
    heldout = sets.real.split(heldout=True)
    reason = downstream.skip_reason(sets.train, heldout, sets.all_generated)
    if reason is not None:
        return {"skipped": reason}
    config = args.downstream_config
    arms = downstream.build_arms(sets.train, sets.all_generated, config.subset_per_class, args.seed,
                                 config.real_share)
    results = downstream.run_arms(arms, heldout, len(sets.real.label_names), config, args.seed, device, track)
    return {"config": asdict(config), "test_images": int((heldout.labels >= 0).sum()),
            "names": sets.real.label_names, "arms": results, **downstream.compare(results)}


# ---------------------------------------------------------------- pictures

def draw_pictures(args: EvalArgs, heldout: Dataset, generated: Dataset, references: dict[str, torch.Tensor],
                  generated_features: dict[str, torch.Tensor], track: Callable) -> dict:
    pictures.side_by_side(heldout.items[:64], generated.items[:64], args.out_dir / "grids.png")
    legend = ("real (held-out)", "generated")
    pictures.scatter(references["pixel_pca"][:, :2], generated_features["pixel_pca"][:, :2], legend,
                     "pixel PCA, first two axes", args.out_dir / "pca.png")
    space = "classifier" if "classifier" in references else "pixel_pca"
    # t-SNE is O(N^2): at most 1000 points per set
    h, g = references[space][:1000], generated_features[space][:1000]
    points = tsne(torch.cat([h, g]), steps=args.tsne_steps, seed=args.seed, progress=lambda it: track(it, "t-SNE"))
    pictures.scatter(points[:len(h)], points[len(h):], legend, f"t-SNE of {space.replace('_', ' ')} features",
                     args.out_dir / "tsne.png")
    return {"grids": "grids.png", "pca": "pca.png", "tsne": "tsne.png", "tsne_space": space}


# ---------------------------------------------------------------- report.md

METRIC_NOTES = {
    "frechet_distance": "lower is better",
    "precision": "share of generated images on the real manifold",
    "recall": "share of real images on the generated manifold",
    "density": "about 1 when generated images sit where real ones are dense",
    "coverage": "share of real neighbourhoods with a generated image",
}


def summary_lines(report: dict) -> list[str]:
    """The figures a user reads first, plain text (report.md's top and the console summary)."""
    m = report["memorization"]
    lines = [f"Memorization: {m['generated_rate']:.1%} of generated images are near-copies of a training image "
             f"(real floor: {m['heldout_rate']:.1%} of real held-out images)."]
    if m["well_above_floor"]:
        lines.append(f"WARNING: the generator copies its training images ({m['generated_rate']:.1%} near-copies "
                     f"against {m['heldout_rate']:.1%} for real images): train it less, or on more images; "
                     f"the copies are listed in report.json.")
    d = report["downstream"]
    if "skipped" in d:
        lines.append(f"Downstream accuracy: skipped ({d['skipped']}).")
    else:
        arms = d["arms"]
        real = arms[downstream.REAL]
        lines.append(f"Classification Accuracy Score: {d['cas']:.1%} ({d['cas_over_real']:.0%} of "
                     f"{real['accuracy']['mean']:.1%} for {real['images']:,} real images"
                     f"{'' if d['equal_size'] else ', all there are'}).")
        subset, augmented = arms[downstream.SUBSET], arms[downstream.AUGMENTED]
        lines.append(f"Augmentation: {subset['images']:,} real images {subset['accuracy']['mean']:.1%}, plus "
                     f"{augmented['images'] - subset['images']:,} generated {augmented['accuracy']['mean']:.1%}: "
                     f"{d['gain_points']:+.2f} points ({d['gain_verdict']}).")
    return lines


def markdown(report: dict) -> str:
    lines = ["# Quality report", ""]
    for line in summary_lines(report):
        lines += [f"**{line}**" if line.startswith("WARNING") else line, ""]
    lines += [f"Real: `{report['real']['path']}` ({report['real']['heldout_images']} held-out images compared, "
              f"{report['real']['train_images']} training images). Generated: `{report['generated']['path']}` "
              f"({report['generated']['images']} images compared). k = {report['k']}.", "",
              f"Each figure has its **real floor**: the same metric between {report['floor']}. "
              "A generated set as good as real data scores about the floor.", ""]
    if "classifier" in report:
        c = report["classifier"]
        lines += [f"Classifier features: a small CNN trained for {c['config']['steps']} steps on the real training "
                  f"labels ({'reused' if c['reused'] else 'trained now'}, `{c['path']}`), held-out accuracy "
                  f"**{c['heldout_accuracy']:.1%}**; features are its penultimate layer.", ""]
    else:
        lines += ["The real data has no labels (or one class): no classifier, so only the pixel-PCA space.", ""]
    p = report["pixel_pca"]
    lines += [f"Pixel PCA: {p['components']} components fitted on {p['fit_images']} real training images "
              f"({p['explained_variance']:.1%} of the pixel variance).", ""]
    for space, metrics in report["spaces"].items():
        lines += [f"## {space.replace('_', ' ')} space", "", "| metric | generated | real floor | note |",
                  "|---|---:|---:|---|"]
        lines += [f"| {name.replace('_', ' ')} | {m['value']:.3g} | {m['real_floor']:.3g} "
                  f"({m['real_floor_range'][0]:.3g} to {m['real_floor_range'][1]:.3g}) | {METRIC_NOTES[name]} |"
                  for name, m in metrics.items()]
        lines.append("")
    lines += ceiling_markdown(report["tokenizer_ceiling"])
    lines += downstream_markdown(report["downstream"])
    if "classes" in report:
        c = report["classes"]
        lines += ["## Classes (classifier predictions)", "",
                  f"Classes present: {c['generated_present']} of {len(c['names'])} in the generated images, "
                  f"{c['real_present']} in the real held-out images.", ""]
        if "label_agreement" in c:
            lines += [f"Generated images whose predicted class is the label they were generated for: "
                      f"{c['label_agreement']:.1%}.", ""]
        total_g, total_h = max(1, sum(c["generated"])), max(1, sum(c["real_heldout"]))
        lines += ["| class | generated | real held-out |", "|---|---:|---:|"]
        lines += [f"| {name} | {g} ({g / total_g:.1%}) | {h} ({h / total_h:.1%}) |"
                  for name, g, h in zip(c["names"], c["generated"], c["real_heldout"])]
        lines.append("")
    lines += prompt_agreement.markdown(report.get("prompts"))
    m = report["memorization"]
    lines += ["## Memorization", "",
              f"Distances to the nearest of {m['reference_images']} training images, in {m['space']}. Threshold: the "
              f"{m['percentile']:g}th percentile of the held-out images' distances ({m['threshold']:.4g}). Each "
              f"generated image under it is flagged as a copy in report.json (`memorization.copies`).", "",
              "| set | share closer than the threshold |", "|---|---:|",
              f"| generated | {m['generated_rate']:.1%} ({len(m['copies'])} of {m['generated_images']}) |",
              f"| real held-out (floor) | {m['heldout_rate']:.1%} |", "",
              "The generated images closest to a training image (top row) and that training image (bottom row):", "",
              f"![nearest]({m['nearest_picture']})", ""]
    pics = report["pictures"]
    lines += ["## Pictures", "", "Real held-out images (left) and generated images (right):", "",
              f"![grids]({pics['grids']})", "", "2-D projections (blue: real held-out, orange: generated):", "",
              f"![pca]({pics['pca']}) ![tsne]({pics['tsne']})", ""]
    return "\n".join(lines)


def ceiling_markdown(ceiling: dict) -> list[str]:
    lines = ["## Tokenizer ceiling", ""]
    if "skipped" in ceiling:
        return lines + [f"Skipped: {ceiling['skipped']} (evaluate.py --autoencoder-path, --codebook-path).", ""]
    lines += [f"The {ceiling['images']} real images of the floor, as stored and passed through the autoencoder "
              f"`{ceiling['autoencoder']['path']}` and each codebook (encode, tokenize, look up, decode), against the "
              "same reference as the generated images. A perfect tokenizer scores the real floor (1.0x); no "
              "generator does better than the reconstructions of its last codebook.", ""]
    for space in ceiling["rows"][0]["spaces"]:
        lines += [f"| images | Fréchet distance ({space.replace('_', ' ')}) | x real floor | precision | recall |",
                  "|---|---:|---:|---:|---:|"]
        lines += [f"| {row['images']} | {m['frechet_distance']:.3g} | {m['frechet_over_floor']:.2f}x | "
                  f"{m['precision']:.3g} | {m['recall']:.3g} |"
                  for row in ceiling["rows"] for m in [row["spaces"][space]]]
        lines.append("")
    return lines


def accuracy_cell(accuracy: dict) -> str:
    return (f"{accuracy['mean']:.2%} ± {100 * accuracy['std']:.2f} "
            f"({accuracy['min']:.2%} to {accuracy['max']:.2%})")


def downstream_markdown(section: dict) -> list[str]:
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
    descriptions = {downstream.GENERATED: "generated images alone (CAS)",
                    downstream.REAL: "real training images, as many",
                    downstream.SUBSET: f"real subset (at most {c['subset_per_class']} per class)",
                    downstream.AUGMENTED: "real subset + generated images"}
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
