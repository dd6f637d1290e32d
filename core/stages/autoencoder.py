"""The autoencoder stage: train the convolutional autoencoder on a dataset's training images."""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from core.artifacts import Artifact, file_record, load_artifact, load_state
from core.config import config_from_dict, load_config_file, to_dict
from core.data import to_float
from core.console import notice
from core.errors import PipelineError
from core.model_artifacts import AUTOENCODER, save_autoencoder
from core.models.augment import passes_over
from core.models.autoencoder import Autoencoder, AutoencoderConfig
from core.models.discriminator import AdversarialAutoencoder
from core.objectives.autoencoder import attach_codebook, autoencoder_of, load_images, objective
from core.pictures import save_image_grid
from core.training import Trainer, TrainOptions, claim_out_dir, finish_run, setup_run


@dataclass
class AutoencoderArgs:
    dataset_path: Path
    options: TrainOptions
    config_path: Path | None = None
    init_from: Path | None = None
    # fine-tune the decoder of `init_from` (its encoder frozen) to decode this codebook's quantized feature
    # maps: what generation gives it
    codebook_path: Path | None = None
    eval_images: int = 1000


def stage_config(config_path: Path | None, start: Artifact | None) -> AutoencoderConfig:
    """The config file's settings; when fine-tuning, over those of the model it starts from (so that a
    fine-tuning config needs to name only what it changes, such as the learning rate)."""
    given = load_config_file(config_path) if config_path is not None else {}
    if not isinstance(given, dict):
        raise PipelineError(f"{config_path}: expected a JSON object of settings")
    return config_from_dict(AutoencoderConfig, {**(start.config if start else {}), **given},
                            source=str(config_path or "the autoencoder's config"))


def augmentation_for_run(cfg: AutoencoderConfig, training_images: int, options: TrainOptions) -> AutoencoderConfig:
    """The config with its augmentation turned off when the run makes fewer passes over the training images
    than augment_min_epochs: the run config and artifact then say so, and the feature-map stage makes no
    augmented copies either."""
    passes = passes_over(training_images, options.max_steps, options.max_epoch, options.batch_size)
    if not cfg.augments or passes >= cfg.augment_min_epochs:
        return cfg
    notice(f"augmentation off: this run makes {passes:.1f} passes over its {training_images} training images, "
           f"fewer than augment_min_epochs {cfg.augment_min_epochs:g}")
    return replace(cfg, augment_flip=False, augment_shift=0, augment_jitter=0.0)


def run(args: AutoencoderArgs) -> Path:
    """Train an autoencoder on the dataset's training split; returns the artifact's path."""
    options = args.options
    if args.codebook_path is not None and args.init_from is None:
        raise PipelineError("--decode-codebook fine-tunes a trained decoder: give the autoencoder with --init-from")
    start = load_artifact(args.init_from, AUTOENCODER) if args.init_from is not None else None
    cfg = stage_config(args.config_path, start)
    data = load_images(args.dataset_path, cfg)
    cfg = cfg.for_images(data.items.shape[1])
    cfg = augmentation_for_run(cfg, int((~data.is_heldout).sum()), options)
    env = setup_run(options.device, options.seed)
    cfg = config_from_dict(AutoencoderConfig, claim_out_dir(options.out_dir, to_dict(cfg), options.resume,
                                                            options.overwrite, env))
    adversarial = cfg.disc_weight > 0
    model = AdversarialAutoencoder(cfg) if adversarial else Autoencoder(cfg)
    if start is not None:
        load_state(autoencoder_of(model), start.tensors, args.init_from)
    # how the images were stored, so that generation can give its images back at their source size
    extra = {"images": {key: data.info.get(key) for key in ("size", "channels", "fit", "content_size")}}
    if args.codebook_path is not None:
        attach_codebook(autoencoder_of(model), args.codebook_path, data.items.shape[-1], env.device)
        extra["quantized_by"] = file_record(args.codebook_path)
    task = objective(cfg, data, env.device, args.eval_images, options.seed, adversarial)
    preview_images = to_float(data.take(data.eval_ids(args.eval_images)).items[:16])
    artifact_path = options.out_dir / "autoencoder.safetensors"
    inputs = [file_record(p) for p in (args.dataset_path, args.init_from, args.codebook_path) if p is not None]

    def preview(net: torch.nn.Module, step: int) -> None:
        """Top: held-out images; bottom: their reconstructions."""
        recon = autoencoder_of(net)(preview_images.to(env.device)).float().cpu()
        save_image_grid(torch.cat([preview_images, recon]), options.out_dir / "samples" / f"recon_{step:07d}.png")

    def export(net: torch.nn.Module, step: int) -> None:
        save_autoencoder(artifact_path, autoencoder_of(net), {"stage": "train_autoencoder", "inputs": inputs,
                                                              "step": step}, extra)

    train_args = options.for_stage(stage="train_autoencoder", lr=cfg.model_lr, warmup_steps=cfg.warmup_steps,
                                   ema_decay=cfg.ema_decay, patience_steps=cfg.patience_steps, config=to_dict(cfg))
    Trainer(env, model, task, train_args, export=export, preview=preview).fit()
    finish_run(env)
    return artifact_path
