import json
import math

import torch

from conftest import TINY_AE, options
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


def test_a_latent_left_to_the_data_is_wider_for_colour():
    cfg = AutoencoderConfig(latent_channel=None)
    assert cfg.for_images(1).latent_channel == 4
    assert cfg.for_images(3).latent_channel == 8
    assert cfg.for_images(3).image_channel == 3
    assert AutoencoderConfig(latent_channel=5).for_images(3).latent_channel == 5  # a number given is kept
    assert Autoencoder(cfg.for_images(3)).latent_shape(32) == (8, 8, 8)


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


def test_each_half_of_the_adversarial_pair_learns_from_its_own_loss():
    from core.models.discriminator import AdversarialAutoencoder, hinge_loss
    torch.manual_seed(0)
    cfg = AutoencoderConfig(image_channel=1, min_channel=4, max_channel=8, num_layers=1, latent_channel=2,
                            disc_weight=0.7, disc_width=8)
    model = AdversarialAutoencoder(cfg)
    images = torch.rand(4, 1, 16, 16) * 2 - 1
    loss, terms = model(images, step=0)
    loss.backward()
    disc_grads = [p.grad.clone() for p in model.discriminator.parameters()]
    model.zero_grad()
    recon = model.autoencoder(images).detach()
    hinge_loss(model.discriminator(images), model.discriminator(recon)).backward()
    for got, own in zip(disc_grads, [p.grad for p in model.discriminator.parameters()]):
        assert torch.allclose(got, own, atol=1e-6)  # the autoencoder's adversarial term does not train it
    model.zero_grad()
    recon = model.autoencoder(images)
    rec = ((recon - images) ** 2).mean()
    weight = model.adaptive_weight(rec, -model.discriminator(recon).mean()) * cfg.disc_weight
    (rec - weight * model.discriminator(recon).mean()).backward()
    assert torch.isclose(torch.tensor(terms["adv_weight"]), weight)
    first = next(model.autoencoder.parameters())
    expected = first.grad.clone()
    model.zero_grad()
    model(images, step=0)[0].backward()
    assert torch.allclose(first.grad, expected, atol=1e-6)  # nor does its loss move the autoencoder


def test_the_adversarial_phase_trains_on_a_tiny_set(tmp_path, tiny_dataset):
    config = tmp_path / "gan.json"
    config.write_text(json.dumps({**TINY_AE, "disc_weight": 0.5, "disc_start": 20, "disc_width": 8}))
    run_options = options(tmp_path / "run", batch_size=8, max_epoch=100, max_steps=60, checkpoint_step=20)
    path = autoencoder.run(autoencoder.AutoencoderArgs(dataset_path=tiny_dataset, config_path=config,
                                                       options=run_options))
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    adversarial = [r for r in records if "d_loss" in r]
    assert [r["step"] for r in adversarial] == [30, 40, 50, 60]  # logged every 10 steps, from step 20 on
    for name in ("d_loss", "g_loss", "rec_loss"):
        values = [r[name] for r in adversarial]
        assert all(math.isfinite(v) for v in values) and len(set(values)) == len(values), name
    model, artifact = load_autoencoder(path)
    assert not any(name.startswith("discriminator") for name in artifact.tensors)  # only the autoencoder ships
    assert artifact.provenance["step"] >= 20  # the kept checkpoint is one of the adversarial phase


def test_a_decoder_fine_tuned_on_quantized_maps_decodes_them_better(tmp_path, pipeline):
    from core.data import load_image_dataset, to_float
    from core.model_artifacts import load_codebook
    config = tmp_path / "ae.json"
    config.write_text(json.dumps({**TINY_AE, "model_lr": 0.003, "warmup_steps": 0}))
    run_options = options(tmp_path / "tuned", batch_size=8, max_epoch=100, max_steps=80, checkpoint_step=40)
    path = autoencoder.run(autoencoder.AutoencoderArgs(dataset_path=pipeline["dataset"], config_path=config,
                                                       init_from=pipeline["autoencoder"],
                                                       codebook_path=pipeline["l2"], options=run_options))
    original, _ = load_autoencoder(pipeline["autoencoder"])
    tuned, artifact = load_autoencoder(path)
    assert artifact.extra["quantized_by"]["path"] == str(pipeline["l2"])
    for a, b in zip(original.encoder.state_dict().values(), tuned.encoder.state_dict().values()):
        assert torch.equal(a, b)  # the encoder, which the feature maps and codebooks came from, is kept
    codebook, _ = load_codebook(pipeline["l2"])
    data = load_image_dataset(pipeline["dataset"])
    images = to_float(data.split(heldout=True).items)
    with torch.no_grad():
        quantized = codebook.lookup(codebook.tokenize(original.encoder(images)))
        assert psnr(tuned.decoder(quantized), images) > psnr(original.decoder(quantized), images) + 0.5


def test_the_decoder_fine_tuned_adversarially_keeps_the_encoder_and_ships_no_discriminator(tmp_path, pipeline):
    """The tiny32 preset's decoder stage: fine-tuning on quantized maps with the adversarial loss from step 0."""
    config = tmp_path / "decoder.json"
    config.write_text(json.dumps({"model_lr": 0.001, "disc_weight": 0.5, "disc_start": 0, "disc_width": 8}))
    run_options = options(tmp_path / "tuned", batch_size=8, max_epoch=100, max_steps=30, checkpoint_step=10)
    path = autoencoder.run(autoencoder.AutoencoderArgs(dataset_path=pipeline["dataset"], config_path=config,
                                                       init_from=pipeline["autoencoder"],
                                                       codebook_path=pipeline["l2"], options=run_options))
    records = [json.loads(line) for line in (tmp_path / "tuned" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "d_loss" in r] == [10, 20, 30]
    original, _ = load_autoencoder(pipeline["autoencoder"])
    tuned, artifact = load_autoencoder(path)
    assert not any(name.startswith("discriminator") for name in artifact.tensors)
    for a, b in zip(original.encoder.state_dict().values(), tuned.encoder.state_dict().values()):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(original.decoder.state_dict().values(),
                                                     tuned.decoder.state_dict().values()))


def test_decoder_fine_tuning_needs_the_autoencoder(tmp_path, pipeline):
    from conftest import run_script
    result = run_script("train_autoencoder.py", "--dataset-path", pipeline["dataset"], "--decode-codebook",
                        pipeline["l2"], "--out-dir", tmp_path / "x")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "error: --decode-codebook fine-tunes a trained decoder: give the autoencoder with --init-from"]
