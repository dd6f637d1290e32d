"""The adversarial half of the autoencoder's training (VQGAN, Esser et al. 2021, "Taming Transformers"): a
patch discriminator scores overlapping patches of an image as real or reconstructed, and its verdict on a
reconstruction is added to the reconstruction loss after a warm-up, weighted so that its gradient at the
decoder's last layer is as large as the reconstruction loss's there (times disc_weight). Only the
autoencoder is exported; the discriminator lives in the training checkpoint."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from core.models.autoencoder import Autoencoder, AutoencoderConfig, reconstruction_loss


class PatchDiscriminator(nn.Module):
    """Strided convolutions to a map of logits, one per patch (about 14 pixels wide with three layers)."""

    def __init__(self, channels: int, width: int, layers: int):
        super().__init__()
        blocks: list[nn.Module] = []
        cin = channels
        for i in range(layers):
            cout = width * 2 ** min(i, 3)
            blocks += [nn.Conv2d(cin, cout, 4, stride=2 if i < layers - 1 else 1, padding=1)]
            blocks += [nn.GroupNorm(min(32, cout // 4), cout)] if i > 0 else []
            blocks += [nn.LeakyReLU(0.2)]
            cin = cout
        blocks.append(nn.Conv2d(cin, 1, 3, padding=1))
        self.net = nn.Sequential(*blocks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def hinge_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


class AdversarialAutoencoder(nn.Module):
    """An autoencoder and its discriminator, trained together by one optimizer: forward(images, step)
    returns the total loss, in which the discriminator's own loss sees detached reconstructions and the
    autoencoder's adversarial term sees the discriminator's weights detached, so each half only learns
    from its own objective."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.autoencoder = Autoencoder(cfg)
        self.discriminator = PatchDiscriminator(cfg.image_channel, cfg.disc_width, cfg.disc_layers)

    def forward(self, images: torch.Tensor, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The total loss, and its terms as numbers (for the metrics)."""
        recon = self.autoencoder(images)
        rec_loss = reconstruction_loss(self.cfg, recon, images)
        if step < self.cfg.disc_start:
            # the discriminator takes part with a zero weight, so that data parallel (DDP) finds every
            # parameter used in every step
            unused = sum(p.sum() for p in self.discriminator.parameters()) * 0.0
            return rec_loss + unused, {"rec_loss": rec_loss.item()}
        d_loss = hinge_loss(self.discriminator(images), self.discriminator(recon.detach()))
        frozen = {name: p.detach() for name, p in self.discriminator.named_parameters()}
        g_loss = -functional_call(self.discriminator, frozen, (recon,)).mean()
        weight = self.adaptive_weight(rec_loss, g_loss) * self.cfg.disc_weight
        terms = {"rec_loss": rec_loss.item(), "g_loss": g_loss.item(), "d_loss": d_loss.item(),
                 "adv_weight": weight.item()}
        return rec_loss + weight * g_loss + d_loss, terms

    def adaptive_weight(self, rec_loss: torch.Tensor, g_loss: torch.Tensor) -> torch.Tensor:
        """|grad of rec_loss| / |grad of g_loss| at the decoder's last layer (VQGAN's balance)."""
        last = self.autoencoder.decoder.last_layer.weight
        rec_grad = torch.autograd.grad(rec_loss, last, retain_graph=True)[0]
        g_grad = torch.autograd.grad(g_loss, last, retain_graph=True)[0]
        return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0, 1e4).detach()
