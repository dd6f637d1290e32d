import json

import torch

from conftest import options
from core.model_artifacts import load_autoencoder
from core.models.autoencoder import Autoencoder, AutoencoderConfig, psnr
from core.stages import autoencoder


def test_shapes_follow_the_config():
    cfg = AutoencoderConfig(min_channel=4, max_channel=8, num_layers=2, latent_channel=3, image_channel=3)
    model = Autoencoder(cfg)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encoder(x)
    assert z.shape == (2, 3, 8, 8) == (2, *model.latent_shape(32))
    assert z.abs().max() <= 1  # tanh on the feature map
    assert model(x).shape == x.shape


def test_psnr_known_values():
    x = torch.zeros(1, 1, 4, 4)
    assert psnr(x, x) == float("inf")
    y = x + 2 * 10 / 255  # every pixel off by 10 grey levels
    assert abs(psnr(y, x) - 20 * torch.log10(torch.tensor(255 / 10)).item()) < 0.01


def test_tiny_autoencoder_learns(tmp_path, tiny_dataset, tiny_ae_config):
    run_options = options(tmp_path / "run", batch_size=8, max_epoch=40, max_steps=200, checkpoint_step=100)
    path = autoencoder.run(autoencoder.AutoencoderArgs(dataset_path=tiny_dataset, config_path=tiny_ae_config,
                                                       options=run_options))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    assert losses[-1] < 0.3 * losses[0]
    psnrs = [r["heldout_psnr"] for r in records if "heldout_psnr" in r]
    assert psnrs[-1] > 20 and psnrs[-1] > psnrs[0]
    model, artifact = load_autoencoder(path)
    assert artifact.provenance["step"] == 200 and artifact.provenance["inputs"][0]["path"] == str(tiny_dataset)
    assert (tmp_path / "run" / "samples" / "recon_0000200.png").exists()
