"""The fully convolutional autoencoder: image (C, H, W) <-> feature map (latent_channel, H/2^L, W/2^L)."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from core.config import ema_decay_option, option, patience_option

ACTIVATIONS = ("silu", "relu", "gelu", "leaky_relu", "tanh", "sigmoid", "identity")


@dataclass
class AutoencoderConfig:
    model_lr: float = option(2e-3, low=1e-7, high=1.0)
    image_channel: int | None = option(None, choices=(1, 3), doc="1 or 3 (null: from the data)")
    min_channel: int = option(32, low=1, high=4096)
    max_channel: int = option(64, low=1, high=4096)
    num_layers: int = option(2, low=0, high=8, doc="down-samplings by 2: the map is H/2^num_layers")
    latent_channel: int | None = option(4, low=1, high=1024, doc="feature-map channels (null: from the data, "
                                                                  "4 for grey images and 8 for colour)")
    hidden_activation_type: str = option("silu", choices=ACTIVATIONS)
    use_final_enc_activation: bool = option(True)
    encoder_activation_type: str = option("tanh", choices=ACTIVATIONS)
    use_final_dec_activation: bool = option(True)
    decoder_activation_type: str = option("tanh", choices=ACTIVATIONS)
    num_res_blocks: int = option(1, low=0, high=16, doc="residual blocks at each resolution")
    loss: str = option("mse", choices=("mse", "l1", "mse+l1"))
    warmup_steps: int = option(100, low=0, high=10**7)
    ema_decay: float = ema_decay_option()
    patience_steps: int = patience_option()
    disc_weight: float = option(0.0, low=0.0, high=100.0, doc="adversarial loss weight, times the adaptive "
                                                                  "balance (0: no discriminator)")
    disc_start: int = option(0, low=0, high=10**9, doc="step at which the discriminator joins")
    disc_width: int = option(32, low=1, high=1024, doc="channels of the discriminator's first layer")
    disc_layers: int = option(3, low=1, high=6, doc="strided layers of the discriminator")
    augment_flip: bool = option(False, doc="flip training images left to right at random")
    augment_shift: int = option(0, low=0, high=64, doc="move training images by up to N pixels")
    augment_jitter: float = option(0.0, low=0.0, high=1.0, doc="brightness/contrast/saturation jitter")
    augment_min_epochs: float = option(0.0, low=0.0, high=1e6,
                                       doc="augment only when the run makes at least this many passes over its "
                                           "training images (a large set seen a few times only loses detail)")

    @property
    def augmentation(self) -> dict:
        """The augment() settings (see core.models.augment); the feature-map stage's copies use them too."""
        return {"flip": self.augment_flip, "shift": self.augment_shift, "jitter": self.augment_jitter}

    @property
    def augments(self) -> bool:
        return self.augment_flip or self.augment_shift > 0 or self.augment_jitter > 0

    def check(self) -> str | None:
        if self.min_channel > self.max_channel:
            return f"min_channel ({self.min_channel}) is larger than max_channel ({self.max_channel})"
        return None

    def for_images(self, image_channel: int) -> AutoencoderConfig:
        """The config for images of this many channels: a colour image holds three times the grey one's
        values, and a 4-channel latent held colour icons to about 24 dB PSNR where grey ones reach 29 dB."""
        latent = self.latent_channel if self.latent_channel is not None else (4 if image_channel == 1 else 8)
        return replace(self, image_channel=image_channel, latent_channel=latent)

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


class ImageEncoder(nn.Module):
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


class ImageDecoder(nn.Module):
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

    @property
    def last_layer(self) -> nn.Conv2d:
        """The convolution that makes the image (where the adversarial loss is balanced)."""
        return [m for m in self.net if isinstance(m, nn.Conv2d)][-1]


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = ImageEncoder(cfg)
        self.decoder = ImageDecoder(cfg)
        # a function of feature maps applied between encoder and decoder (a codebook's quantization, when the
        # decoder learns to decode what generation gives it); not part of the model's state
        self.quantize: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.encoder(x)
        return self.decoder(z if self.quantize is None else self.quantize(z))

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
