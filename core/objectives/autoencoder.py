"""The autoencoder's training data and objective: images checked against the config, the batch (augmented as
the config says), the loss and the held-out PSNR that the autoencoder stage trains and the compression stage
fine-tunes with; and the codebook put between a frozen encoder and the decoder for decoder fine-tuning."""
from __future__ import annotations

from pathlib import Path

import torch

from core.data import Dataset, load_image_dataset, to_float
from core.errors import PipelineError
from core.model_artifacts import check_fits, load_codebook
from core.models.augment import augment, augmentation_generator
from core.models.autoencoder import Autoencoder, AutoencoderConfig, psnr, reconstruction_loss
from core.models.discriminator import AdversarialAutoencoder
from core.training import Objective


def load_images(dataset_path: Path, cfg: AutoencoderConfig) -> Dataset:
    data = load_image_dataset(dataset_path)
    if cfg.image_channel is not None and data.items.shape[1] != cfg.image_channel:
        raise PipelineError(f"config image_channel is {cfg.image_channel}, but {dataset_path} holds "
                            f"{data.items.shape[1]}-channel images (leave image_channel out to take it from the data)")
    return data


def objective(cfg: AutoencoderConfig, data: Dataset, device: torch.device, eval_images: int = 1000,
              seed: int = 0, adversarial: bool = False) -> Objective:
    """The autoencoder's batch (training images, augmented as the config says), loss (reconstruction, and
    with `adversarial` the discriminator's terms: the model is then an AdversarialAutoencoder) and
    evaluation (held-out PSNR; with a discriminator, the kept checkpoint is one of its phase)."""
    train_set = data.split(heldout=False)
    eval_set = to_float(data.take(data.eval_ids(eval_images)).items)

    def get_batch(indices: torch.Tensor) -> torch.Tensor:
        return to_float(train_set.items[indices]).to(device)

    def loss_fn(net: torch.nn.Module, images: torch.Tensor, step: int) -> torch.Tensor:
        if cfg.augments:
            images = augment(images, augmentation_generator(seed, step), **cfg.augmentation)
        if adversarial:
            return net(images, step)
        return reconstruction_loss(cfg, net(images), images)

    def evaluate(net: torch.nn.Module) -> dict:
        recon = torch.cat([autoencoder_of(net)(chunk.to(device)).float().cpu() for chunk in eval_set.split(250)])
        return {"heldout_psnr": psnr(recon, eval_set)}

    return Objective(len(train_set), get_batch, loss_fn, evaluate, metric="heldout_psnr", higher_is_better=True,
                     heldout=bool(data.is_heldout.any()), select_from=cfg.disc_start if adversarial else 0)


def autoencoder_of(model: torch.nn.Module) -> Autoencoder:
    return model.autoencoder if isinstance(model, AdversarialAutoencoder) else model


def attach_codebook(model: Autoencoder, codebook_path: Path, image_size: int, device: torch.device) -> None:
    """Put the codebook's quantization between the model's encoder (frozen) and decoder."""
    codebook, _ = load_codebook(codebook_path)
    check_fits(codebook.cfg, model.latent_shape(image_size), codebook_path, "the autoencoder")
    codebook.to(device)
    model.encoder.requires_grad_(False)
    model.quantize = lambda fmaps: codebook.lookup(codebook.tokenize(fmaps))
