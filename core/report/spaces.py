"""The feature spaces a report compares in: the penultimate features of a small CNN trained on the real
labels (when the data has labels), and a PCA of the pixels; per space, the Fréchet distance and the k-NN
metrics of the generated set and of the floor's draws against the reference. With the classifier: the
classes the generated images fall in."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from core.artifacts import Artifact, file_record, load_artifact, load_state, save_artifact, state_tensors
from core.data import Dataset, to_float
from core.errors import PipelineError
from core.metrics import Progress, all_metrics, pca
from core.models.classifier import FeatureClassifier
from core.report import downstream
from core.report.sets import CLASSIFIER_KIND, TEACHER_FILE, EvalArgs, Sets

CLASSIFIER_FILE = "classifier.safetensors"
Featurize = Callable[[torch.Tensor], torch.Tensor]  # uint8 images (N, C, H, W) -> features (N, D)
METRIC_NOTES = {
    "frechet_distance": "lower is better",
    "precision": "share of generated images on the real manifold",
    "recall": "share of real images on the generated manifold",
    "density": "about 1 when generated images sit where real ones are dense",
    "coverage": "share of real neighbourhoods with a generated image",
}


@dataclass
class Spaces:
    featurizers: dict[str, Featurize]
    references: dict[str, torch.Tensor]  # the held-out reference's features per space
    generated: dict[str, torch.Tensor]  # the generated sample's
    report: dict  # report.json's keys: spaces, pixel_pca, and classifier and classes when there are labels
    k: int | None  # None: the sets are too small for the k-NN metrics
    classifier: FeatureClassifier | None  # the real training split's classifier, when there are labels

    def metrics(self, space: str, features: torch.Tensor) -> dict[str, float]:
        return all_metrics(self.references[space], features, self.k)


def pixels(images: torch.Tensor) -> torch.Tensor:
    return to_float(images).flatten(1)


def is_labelled(real: Dataset) -> bool:
    return bool(real.labels.ge(0).any().item()) and len(real.label_names) >= 2


def compute(args: EvalArgs, sets: Sets, device: torch.device, track: Callable) -> Spaces:
    report: dict = {"spaces": {}}
    featurizers: dict[str, Featurize] = {}
    computed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # a space's reference and generated features
    model = None
    if is_labelled(sets.real):
        model, info = obtain_classifier(sets.real, sets.train, args.out_dir, args.classifier_steps, args.seed, device,
                                        args.classifier_path, lambda it: track(it, "classifier"),
                                        made_elsewhere=args.curated_path and args.curated_path.parent / TEACHER_FILE)
        all_heldout = sets.real.split(heldout=True)
        _, heldout_predictions = downstream.predict(model, all_heldout.items, device)
        mask = all_heldout.labels >= 0
        info["heldout_accuracy"] = float((heldout_predictions[mask] == all_heldout.labels[mask]).float().mean())
        (h_features, h_pred), (g_features, g_pred) = (downstream.predict(model, s.items, device)
                                                      for s in (sets.heldout, sets.generated))
        featurizers["classifier"] = lambda images: downstream.predict(model, images, device)[0]
        computed["classifier"] = h_features, g_features
        report["classifier"] = info
        report["classes"] = class_report(sets.real.label_names, h_pred, g_pred, sets.generated, model.head.out_features)

    fit = sets.train.sample(5000, args.seed + 3)  # the PCA fit is on at most 5000 training images: plenty for 64 axes
    # axes fitted on fewer than ~10 images each describe those images, not the data (few-shot sets)
    projection = pca(pixels(fit.items), max(2, min(args.pca_components, len(fit) // 10)))
    featurizers["pixel_pca"] = lambda images: projection.project(pixels(images)).float()
    report["pixel_pca"] = {"components": int(projection.components.shape[0]),
                           "explained_variance": float(projection.explained.sum()), "fit_images": len(fit)}

    for name, featurize in featurizers.items():
        if name not in computed:
            computed[name] = featurize(sets.heldout.items), featurize(sets.generated.items)
    spaces = Spaces(featurizers, {name: pair[0] for name, pair in computed.items()},
                    {name: pair[1] for name, pair in computed.items()}, report, None if sets.knn_skipped else args.k,
                    model)
    for name, featurize in featurizers.items():
        value = spaces.metrics(name, spaces.generated[name])
        draws = [spaces.metrics(name, featurize(f.items)) for f in sets.floors]
        report["spaces"][name] = {metric: {"value": value[metric],
                                           "real_floor": sum(d[metric] for d in draws) / len(draws),
                                           "real_floor_range": [min(d[metric] for d in draws),
                                                                max(d[metric] for d in draws)]}
                                  for metric in value}
    return spaces


def skipped(report: dict, sets: Sets) -> dict[str, str]:
    """What the spaces left out, and why (report.json's `skipped`)."""
    reasons = {}
    if "classifier" not in report:
        reasons["classifier space and classes"] = "the real data has no labels, or one class"
    if sets.knn_skipped:
        reasons["precision, recall, density and coverage"] = sets.knn_skipped
    return reasons


# ---------------------------------------------------------------- the feature classifier

def classifier_config(real: Dataset, steps: int, seed: int) -> dict:
    _, channels, height, width = real.items.shape
    return {"channels": channels, "height": height, "width": width, "label_names": real.label_names,
            "steps": steps, "batch_size": 128, "lr": 3e-3, "model_width": 16, "features": 128, "seed": seed}


def build_classifier(config: dict) -> FeatureClassifier:
    return FeatureClassifier(config["channels"], len(config["label_names"]), config["model_width"],
                             config["features"])


def obtain_classifier(real: Dataset, train: Dataset, out_dir: Path, steps: int, seed: int, device: torch.device,
                      classifier_path: Path | None, progress: Progress = iter,
                      made_elsewhere: Path | None = None) -> tuple[FeatureClassifier, dict]:
    """The classifier given by --classifier-path; else the one in out_dir or `made_elsewhere` (the curated set's
    teacher, saved into out_dir too) if made with the same config from the same real data; else a freshly
    trained one (saved to out_dir)."""
    config = classifier_config(real, steps, seed)
    source = file_record(real.path)
    path = out_dir / CLASSIFIER_FILE
    if classifier_path is not None:  # a user's choice: it must only fit the data
        artifact = load_artifact(classifier_path, CLASSIFIER_KIND)
        wanted = {k: config[k] for k in ("channels", "height", "width", "label_names")}
        found = {k: artifact.config.get(k) for k in wanted}
        if found != wanted:
            raise PipelineError(f"{classifier_path}: classifier made for {found}, the real data {real.path} has {wanted}")
        return loaded_classifier(artifact, device)
    for candidate in (path, made_elsewhere):
        if candidate is None or not candidate.exists():
            continue
        artifact = load_artifact(candidate, CLASSIFIER_KIND)
        if artifact.config == config and artifact.provenance.get("real", {}).get("sha256") == source["sha256"]:
            if candidate != path:
                save_artifact(path, artifact.tensors, CLASSIFIER_KIND, config, artifact.provenance)
            return loaded_classifier(artifact, device)
    images, labels = downstream.labelled(train)
    if len(images) < 2:
        raise PipelineError(f"{train.path}: too few labelled training images to train a classifier")
    model = downstream.train_classifier(images, labels, len(config["label_names"]), config, device, progress)
    save_artifact(path, state_tensors(model), CLASSIFIER_KIND, config,
                  {"stage": "evaluate", "real": source, "step": steps})
    return model, {"path": str(path), "reused": False, "config": config}


def loaded_classifier(artifact: Artifact, device: torch.device) -> tuple[FeatureClassifier, dict]:
    model = build_classifier(artifact.config)
    load_state(model, artifact.tensors, artifact.path)
    return model.to(device).eval(), {"path": str(artifact.path), "reused": True, "config": artifact.config}


def class_report(names: list[str], heldout_predictions: torch.Tensor, generated_predictions: torch.Tensor,
                 generated: Dataset, num_classes: int) -> dict:
    generated_counts = torch.bincount(generated_predictions, minlength=num_classes).tolist()
    heldout_counts = torch.bincount(heldout_predictions, minlength=num_classes).tolist()
    result = {"names": names, "generated": generated_counts, "real_heldout": heldout_counts,
              "generated_present": sum(c > 0 for c in generated_counts),
              "real_present": sum(c > 0 for c in heldout_counts)}
    # generated records that name a label: does the classifier see that label?
    asked = [generated.label_names[i] if i >= 0 else None for i in generated.labels.tolist()]
    wanted = torch.tensor([names.index(name) if name in names else -1 for name in asked], dtype=torch.long)
    if (wanted >= 0).any():
        result["label_agreement"] = float((generated_predictions[wanted >= 0] == wanted[wanted >= 0]).float().mean())
    return result


# ---------------------------------------------------------------- report.md

def markdown(report: dict) -> list[str]:
    """The spaces' description and one table of metrics per space."""
    if "classifier" in report:
        c = report["classifier"]
        lines = [f"Classifier features: a small CNN trained for {c['config']['steps']} steps on the real training "
                 f"labels ({'reused' if c['reused'] else 'trained now'}, `{c['path']}`), held-out accuracy "
                 f"**{c['heldout_accuracy']:.1%}**; features are its penultimate layer.", ""]
    else:
        lines = ["The real data has no labels (or one class): no classifier, so only the pixel-PCA space.", ""]
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
    return lines


def classes_markdown(report: dict) -> list[str]:
    if "classes" not in report:
        return []
    c = report["classes"]
    lines = ["## Classes (classifier predictions)", "",
             f"Classes present: {c['generated_present']} of {len(c['names'])} in the generated images, "
             f"{c['real_present']} in the real held-out images.", ""]
    if "label_agreement" in c:
        lines += [f"Generated images whose predicted class is the label they were generated for: "
                  f"{c['label_agreement']:.1%}.", ""]
    total_g, total_h = max(1, sum(c["generated"])), max(1, sum(c["real_heldout"]))
    lines += ["| class | generated | real held-out |", "|---|---:|---:|"]
    lines += [f"| {name} | {g} ({g / total_g:.1%}) | {h} ({h / total_h:.1%}) |"
              for name, g, h in zip(c["names"], c["generated"], c["real_heldout"])]
    return lines + [""]
