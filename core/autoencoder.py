"""The fully convolutional autoencoder: image (C, H, W) <-> feature map (latent_channel, H/2^L, W/2^L)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.artifacts import Artifact, file_record, load_artifact, load_module, load_state, save_artifact, state_tensors
from core.config import config_from_dict, load_config, option, to_dict
from core.data import Dataset, load_image_dataset, save_image_grid, to_float
from core.errors import PipelineError
from core.training import Objective, Trainer, TrainArgs, claim_out_dir, finish_run, setup_run

ACTIVATIONS = ("silu", "relu", "gelu", "leaky_relu", "tanh", "sigmoid", "identity")
KIND = "autoencoder"


@dataclass
class AutoencoderConfig:
    model_lr: float = option(2e-3, low=1e-7, high=1.0)
    image_channel: int = option(1, choices=(1, 3))
    min_channel: int = option(32, low=1, high=4096)
    max_channel: int = option(64, low=1, high=4096)
    num_layers: int = option(2, low=0, high=8, doc="down-samplings by 2: the map is H/2^num_layers")
    latent_channel: int = option(4, low=1, high=1024)
    hidden_activation_type: str = option("silu", choices=ACTIVATIONS)
    use_final_enc_activation: bool = option(True)
    encoder_activation_type: str = option("tanh", choices=ACTIVATIONS)
    use_final_dec_activation: bool = option(True)
    decoder_activation_type: str = option("tanh", choices=ACTIVATIONS)
    num_res_blocks: int = option(1, low=0, high=16, doc="residual blocks at each resolution")
    loss: str = option("mse", choices=("mse", "l1", "mse+l1"))
    warmup_steps: int = option(100, low=0, high=10**7)

    def check(self) -> str | None:
        if self.min_channel > self.max_channel:
            return f"min_channel ({self.min_channel}) is larger than max_channel ({self.max_channel})"
        return None

    def channels(self, level: int) -> int:
        return min(self.min_channel * 2 ** level, self.max_channel)


def activation(name: str) -> nn.Module:
    return {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU, "leaky_relu": nn.LeakyReLU,
            "tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "identity": nn.Identity}[name]()


class ResBlock(nn.Module):
    def __init__(self, channels: int, act: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = activation(act)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(self.act(x))))


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(cfg.image_channel, cfg.channels(0), 3, padding=1)]
        for level in range(cfg.num_layers):
            layers += [ResBlock(cfg.channels(level), cfg.hidden_activation_type) for _ in range(cfg.num_res_blocks)]
            layers += [nn.Conv2d(cfg.channels(level), cfg.channels(level + 1), 4, stride=2, padding=1)]
        layers += [ResBlock(cfg.channels(cfg.num_layers), cfg.hidden_activation_type) for _ in range(cfg.num_res_blocks)]
        layers += [activation(cfg.hidden_activation_type), nn.Conv2d(cfg.channels(cfg.num_layers), cfg.latent_channel, 3, padding=1)]
        if cfg.use_final_enc_activation:
            layers.append(activation(cfg.encoder_activation_type))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        top = cfg.channels(cfg.num_layers)
        layers: list[nn.Module] = [nn.Conv2d(cfg.latent_channel, top, 3, padding=1)]
        layers += [ResBlock(top, cfg.hidden_activation_type) for _ in range(cfg.num_res_blocks)]
        for level in reversed(range(cfg.num_layers)):
            layers += [nn.Upsample(scale_factor=2, mode="nearest"),
                       nn.Conv2d(cfg.channels(level + 1), cfg.channels(level), 3, padding=1)]
            layers += [ResBlock(cfg.channels(level), cfg.hidden_activation_type) for _ in range(cfg.num_res_blocks)]
        layers += [activation(cfg.hidden_activation_type), nn.Conv2d(cfg.channels(0), cfg.image_channel, 3, padding=1)]
        if cfg.use_final_dec_activation:
            layers.append(activation(cfg.decoder_activation_type))
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        side = image_size // 2 ** self.cfg.num_layers
        return self.cfg.latent_channel, side, side


def reconstruction_loss(cfg: AutoencoderConfig, recon: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if cfg.loss == "mse":
        return F.mse_loss(recon, target)
    if cfg.loss == "l1":
        return F.l1_loss(recon, target)
    return F.mse_loss(recon, target) + 0.1 * F.l1_loss(recon, target)


def psnr(recon: torch.Tensor, target: torch.Tensor) -> float:
    """PSNR in dB of a whole set of images in [-1, 1] (from its mean squared error), measured after
    rounding to 8 bits like a saved image."""
    recon8 = recon.float().clamp(-1, 1).add(1).mul(127.5).round()
    target8 = target.float().add(1).mul(127.5).round()
    mse = (recon8 - target8).pow(2).mean().item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(255.0 ** 2 / mse)).item()


def save_autoencoder(path: str | Path, model: Autoencoder, provenance: dict) -> None:
    save_artifact(path, state_tensors(model), KIND, to_dict(model.cfg), provenance)


def load_autoencoder(path: str | Path) -> tuple[Autoencoder, Artifact]:
    return load_module(path, KIND, lambda a: Autoencoder(config_from_dict(AutoencoderConfig, a.config, source=str(path))))


# ---------------------------------------------------------------- the training stage

def load_images(dataset_path: Path, cfg: AutoencoderConfig) -> Dataset:
    data = load_image_dataset(dataset_path)
    if data.items.shape[1] != cfg.image_channel:
        raise PipelineError(f"config image_channel is {cfg.image_channel}, but {dataset_path} holds "
                            f"{data.items.shape[1]}-channel images")
    return data


def heldout_images(data: Dataset, count: int) -> torch.Tensor:
    """A fixed sample of held-out images (of training images when nothing is held out), uint8."""
    heldout = data.split(heldout=True)
    if len(heldout) == 0:
        heldout = data.split(heldout=False)
    return heldout.sample(count).items


def objective(cfg: AutoencoderConfig, data: Dataset, device: torch.device, eval_images: int = 1000) -> Objective:
    """The autoencoder's batch (training images), loss (reconstruction) and evaluation (held-out PSNR)."""
    train_set = data.split(heldout=False)
    eval_set = to_float(heldout_images(data, eval_images))

    def get_batch(indices: torch.Tensor) -> torch.Tensor:
        return to_float(train_set.items[indices]).to(device)

    def loss_fn(net: torch.nn.Module, images: torch.Tensor, step: int) -> torch.Tensor:
        return reconstruction_loss(cfg, net(images), images)

    def evaluate(net: torch.nn.Module) -> dict:
        recon = torch.cat([net(chunk.to(device)).float().cpu() for chunk in eval_set.split(250)])
        return {"heldout_psnr": psnr(recon, eval_set)}

    return Objective(len(train_set), get_batch, loss_fn, evaluate)


def train(dataset_path: Path, config_path: Path | None, args: TrainArgs, device: str,
          init_from: Path | None = None, resume: bool = False, overwrite: bool = False,
          eval_images: int = 1000) -> Path:
    """Train an autoencoder on the dataset's training split; returns the artifact's path."""
    cfg = load_config(AutoencoderConfig, config_path)
    data = load_images(dataset_path, cfg)
    env = setup_run(device, args.seed)
    cfg = config_from_dict(AutoencoderConfig, claim_out_dir(args.out_dir, to_dict(cfg), resume, overwrite, env))
    model = Autoencoder(cfg)
    if init_from is not None:
        load_state(model, load_artifact(init_from, KIND).tensors, init_from)
    task = objective(cfg, data, env.device, eval_images)
    preview = to_float(heldout_images(data, eval_images)[:16])
    artifact_path = args.out_dir / "autoencoder.safetensors"
    inputs = [file_record(dataset_path)] + ([file_record(init_from)] if init_from else [])
    args.lr, args.warmup_steps, args.config = cfg.model_lr, cfg.warmup_steps, to_dict(cfg)

    def evaluate(net: Autoencoder, step: int) -> dict:
        recon = net(preview.to(env.device)).float().cpu()
        save_image_grid(torch.cat([preview, recon]), args.out_dir / "samples" / f"recon_{step:07d}.png")
        return task.evaluate(net)

    def export(net: Autoencoder, step: int) -> None:
        save_autoencoder(artifact_path, net, {"stage": "train_autoencoder", "inputs": inputs, "step": step})

    Trainer(env, model, task.num_items, task.get_batch, task.loss_fn, args, evaluate, export).fit()
    finish_run(env)
    return artifact_path
