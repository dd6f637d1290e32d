"""The quality report: generated images against real ones, in a classifier's feature space and a pixel-PCA
space. Fréchet distance, precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020),
a memorization check, class histograms, and 2-D projections (PCA, t-SNE). Every figure comes with its
real-vs-real floor: the same metric between two disjoint real sets of the same sizes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch
import torch.nn.functional as F

from core import pictures
from core.artifacts import (atomic_path, atomic_write_json, file_record, load_artifact, load_state, save_artifact,
                            state_tensors)
from core.data import Dataset, load_image_dataset, to_float
from core.errors import PipelineError
from core.metrics import Progress, all_metrics, memorization_rate, nearest_distances, pca, tsne
from core.models.classifier import FeatureClassifier
from core.stages import prompt_agreement
from core.training import pick_device
CLASSIFIER_KIND = "feature_classifier"
CLASSIFIER_FILE = "classifier.safetensors"


# ---------------------------------------------------------------- the feature classifier

def classifier_config(real: Dataset, steps: int, seed: int) -> dict:
    _, channels, height, width = real.items.shape
    return {"channels": channels, "height": height, "width": width, "label_names": real.label_names,
            "steps": steps, "batch_size": 128, "lr": 3e-3, "model_width": 16, "features": 128, "seed": seed}


def build_classifier(config: dict) -> FeatureClassifier:
    return FeatureClassifier(config["channels"], len(config["label_names"]), config["model_width"],
                             config["features"])


def train_classifier(train: Dataset, config: dict, device: torch.device,
                     progress: Progress = iter) -> FeatureClassifier:
    """Cross-entropy on the labelled training images, Adam with a linearly decaying learning rate."""
    labelled = (train.labels >= 0).nonzero().flatten()
    if len(labelled) < 2:
        raise PipelineError(f"{train.path}: too few labelled training images to train a classifier")
    torch.manual_seed(config["seed"])
    model = build_classifier(config).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config["lr"])
    generator = torch.Generator().manual_seed(config["seed"])
    model.train()
    for step in progress(range(config["steps"])):
        batch = labelled[torch.randint(len(labelled), (config["batch_size"],), generator=generator)]
        images, labels = to_float(train.items[batch]).to(device), train.labels[batch].to(device)
        for group in optimizer.param_groups:
            group["lr"] = config["lr"] * (1 - step / config["steps"])
        loss = F.cross_entropy(model(images), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


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
    model = train_classifier(train, config, device, progress)
    save_artifact(path, state_tensors(model), CLASSIFIER_KIND, config,
                  {"stage": "evaluate", "real": source, "step": steps})
    return model, {"path": str(path), "reused": False, "config": config}


@torch.no_grad()
def classify(model: FeatureClassifier, images: torch.Tensor, device: torch.device,
             batch_size: int = 512) -> tuple[torch.Tensor, torch.Tensor]:
    """Penultimate features (N, F) and predicted classes (N,) of uint8 images."""
    features, predictions = [], []
    for start in range(0, len(images), batch_size):
        f = model.features(to_float(images[start:start + batch_size]).to(device))
        features.append(f.float().cpu())
        predictions.append(model.head(f).argmax(1).cpu())
    return torch.cat(features), torch.cat(predictions)


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


def load_sets(args: EvalArgs) -> Sets:
    """The sets compared, each capped at num_images by a fixed random sample. The floor's sets come from the
    rest of the held-out split when it is, or can be made, large enough (the classifier never saw it
    either), else from the training split."""
    real = load_image_dataset(args.real_path)
    generated = load_image_dataset(args.generated_path)
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
    return Sets(real, train, reference, generated, floors, source)


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
    report: dict = {
        "real": {**file_record(args.real_path), "train_images": len(train), "heldout_images": len(heldout)},
        "generated": {**file_record(args.generated_path), "images": len(generated)},
        "k": args.k, "seed": args.seed, "spaces": {},
        "floor": f"the {len(heldout)} held-out real images and {len(sets.floors[0])} other real "
                 f"{sets.floor_source} images (mean and range over {len(sets.floors)} draws)",
    }

    spaces: dict[str, tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]] = {}  # held-out, generated, floors
    labelled = real.labels.ge(0).any().item() and len(real.label_names) >= 2
    if labelled:
        model, info = obtain_classifier(real, train, args.out_dir, args.classifier_steps, args.seed, device,
                                        args.classifier_path, lambda it: track(it, "classifier"))
        all_heldout = real.split(heldout=True)
        _, heldout_predictions = classify(model, all_heldout.items, device)
        mask = all_heldout.labels >= 0
        info["heldout_accuracy"] = float((heldout_predictions[mask] == all_heldout.labels[mask]).float().mean())
        (h_feat, h_pred), (g_feat, g_pred) = (classify(model, s.items, device) for s in (heldout, generated))
        spaces["classifier"] = (h_feat, g_feat, [classify(model, f.items, device)[0] for f in sets.floors])
        report["classifier"] = info
        report["classes"] = class_report(real.label_names, h_pred, g_pred, generated, model.head.out_features)

    fit = train.sample(5000, args.seed + 3)  # the PCA fit is on at most 5000 training images: plenty for 64 axes
    # axes fitted on fewer than ~10 images each describe those images, not the data (few-shot sets)
    projection = pca(pixels(fit.items), max(2, min(args.pca_components, len(fit) // 10)))
    h_pca, g_pca = (projection.project(pixels(s.items)).float() for s in (heldout, generated))
    spaces["pixel_pca"] = (h_pca, g_pca, [projection.project(pixels(f.items)).float() for f in sets.floors])
    report["pixel_pca"] = {"components": int(projection.components.shape[0]),
                           "explained_variance": float(projection.explained.sum()), "fit_images": len(fit)}

    for name, (h, g, floors) in spaces.items():
        value, draws = all_metrics(h, g, args.k), [all_metrics(h, f, args.k) for f in floors]
        report["spaces"][name] = {metric: {"value": value[metric],
                                           "real_floor": sum(d[metric] for d in draws) / len(draws),
                                           "real_floor_range": [min(d[metric] for d in draws),
                                                                max(d[metric] for d in draws)]}
                                  for metric in value}

    report["memorization"] = memorization(train, heldout, generated, args, device, track)
    prompts = prompt_agreement.section(real, args.generated_path, args.out_dir, device, args.seed,
                                       progress=lambda it: track(it, "prompt classifier"))
    if prompts is not None:  # captioned real and generated images
        report["prompts"] = prompts
    report["pictures"] = draw_pictures(args, heldout, generated, spaces, h_pca, g_pca, track)
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


def memorization(train: Dataset, heldout: Dataset, generated: Dataset, args: EvalArgs, device: torch.device,
                 track: Callable) -> dict:
    """In pixel space: nearest training image of each generated and each held-out image."""
    reference = pixels(train.items).to(device)
    g_nn, g_index = nearest_distances(pixels(generated.items).to(device), reference,
                                      progress=lambda it: track(it, "memorization (generated)"))
    h_nn, _ = nearest_distances(pixels(heldout.items).to(device), reference,
                                progress=lambda it: track(it, "memorization (held-out)"))
    result = memorization_rate(g_nn, h_nn, args.memorization_percentile)
    result["space"] = "pixels in [-1, 1], Euclidean"
    result["reference_images"] = len(train)
    closest = g_nn.argsort()[:8]
    pictures.pairs_grid(generated.items[closest], train.items[g_index[closest]], args.out_dir / "nearest.png")
    result["nearest_picture"] = "nearest.png"
    return result


def draw_pictures(args: EvalArgs, heldout: Dataset, generated: Dataset, spaces: dict, h_pca: torch.Tensor,
                  g_pca: torch.Tensor, track: Callable) -> dict:
    pictures.side_by_side(heldout.items[:64], generated.items[:64], args.out_dir / "grids.png")
    legend = ("real (held-out)", "generated")
    pictures.scatter(h_pca[:, :2], g_pca[:, :2], legend, "pixel PCA, first two axes", args.out_dir / "pca.png")
    space = "classifier" if "classifier" in spaces else "pixel_pca"
    h, g = spaces[space][0], spaces[space][1]
    # t-SNE is O(N^2): at most 1000 points per set
    h, g = h[:1000], g[:1000]
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


def markdown(report: dict) -> str:
    lines = ["# Quality report", "",
             f"Real: `{report['real']['path']}` ({report['real']['heldout_images']} held-out images compared, "
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
              f"{m['percentile']:g}th percentile of the held-out images' distances ({m['threshold']:.4g}).", "",
              "| set | share closer than the threshold |", "|---|---:|",
              f"| generated | {m['generated_rate']:.1%} |", f"| real held-out (floor) | {m['heldout_rate']:.1%} |", "",
              "The generated images closest to a training image (top row) and that training image (bottom row):", "",
              f"![nearest]({m['nearest_picture']})", ""]
    pics = report["pictures"]
    lines += ["## Pictures", "", "Real held-out images (left) and generated images (right):", "",
              f"![grids]({pics['grids']})", "", "2-D projections (blue: real held-out, orange: generated):", "",
              f"![pca]({pics['pca']}) ![tsne]({pics['tsne']})", ""]
    return "\n".join(lines)
