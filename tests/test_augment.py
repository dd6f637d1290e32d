"""Augmentation: deterministic per seed, the identity when off, and what each setting does."""
import json
from dataclasses import replace

import torch

from conftest import TINY_AE, run_script
from core.data import load_fmap_dataset
from core.model_artifacts import load_autoencoder
from core.models.augment import augment, augmentation_generator
from core.models.autoencoder import AutoencoderConfig
from core.stages.autoencoder import augmentation_for_run
from core.training import TrainOptions

SETTINGS = {"flip": True, "shift": 2, "jitter": 0.2}


def batch(seed=0, channels=3):
    return torch.rand(6, channels, 12, 12, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_the_same_seed_gives_the_same_batch_and_another_seed_another():
    images = batch()
    first = augment(images, augmentation_generator(7, 3), **SETTINGS)
    assert torch.equal(first, augment(images, augmentation_generator(7, 3), **SETTINGS))
    assert not torch.equal(first, augment(images, augmentation_generator(7, 4), **SETTINGS))
    assert first.shape == images.shape and first.min() >= -1 and first.max() <= 1


def test_off_is_the_identity_and_each_setting_does_what_it_says():
    images = batch(channels=1)
    generator = lambda: augmentation_generator(0, 1)
    assert torch.equal(augment(images, generator(), flip=False, shift=0, jitter=0.0), images)
    flipped = augment(images, generator(), flip=True, shift=0, jitter=0.0)
    assert all(torch.equal(f, i) or torch.equal(f, i.flip(-1)) for f, i in zip(flipped, images))
    assert any(not torch.equal(f, i) for f, i in zip(flipped, images))
    moved = augment(images, generator(), flip=False, shift=1, jitter=0.0)
    inner = [any(torch.equal(m[:, 1:-1, 1:-1], i[:, 1 + dy:11 + dy, 1 + dx:11 + dx])
                 for dy in (-1, 0, 1) for dx in (-1, 0, 1)) for m, i in zip(moved, images)]
    assert all(inner)  # each image is its own pixels moved by at most one pixel


def test_feature_map_copies_are_augmented_training_items(tmp_path, tiny_dataset):
    config = tmp_path / "ae.json"
    config.write_text(json.dumps({**TINY_AE, "augment_flip": True, "augment_shift": 1}))
    run = lambda *extra: run_script(*extra)
    assert run("train_autoencoder.py", "--dataset-path", tiny_dataset, "--config-path", config, "--out-dir",
               tmp_path / "ae", "--max-steps", "2", "--batch-size", "8").returncode == 0
    ae = tmp_path / "ae" / "autoencoder.safetensors"
    for name in ("a", "b"):
        result = run("generate_fmap_dataset.py", "--dataset-path", tiny_dataset, "--model-path", ae,
                     "--out-dir", tmp_path / name, "--augment-copies", "2", "--num-files-folder", "50")
        assert result.returncode == 0, result.stderr
    data, info = load_fmap_dataset(tmp_path / "a" / "dataset.json")
    training = int((~data.is_heldout).sum()) // 3
    assert len(data) == 72 + 2 * training and info["augment"]["copies"] == 2
    copies = [r.get("augmented", 0) for r in data.records]
    assert copies.count(1) == copies.count(2) == training and not data.is_heldout[72:].any()
    assert not torch.equal(data.items[72], data.items[int((~data.is_heldout).nonzero()[0])])
    assert torch.equal(data.items, load_fmap_dataset(tmp_path / "b" / "dataset.json")[0].items)  # per seed


def test_augmentation_is_off_for_a_run_of_few_passes(tmp_path):
    """A large set seen a few times (fewer passes than augment_min_epochs) trains on its images as they are;
    a small set seen many times is augmented."""
    cfg = AutoencoderConfig(augment_flip=True, augment_shift=2, augment_min_epochs=10)
    few = TrainOptions(out_dir=tmp_path, batch_size=64, max_epoch=150, max_steps=4000)  # 60,000 images: 4.3 passes
    assert not augmentation_for_run(cfg, 60000, few).augments
    assert augmentation_for_run(cfg, 1000, few).augments  # 1,000 images: 150 passes
    assert augmentation_for_run(replace(cfg, augment_min_epochs=0), 60000, few).augments


def test_a_small_set_through_an_autoencoder_that_did_not_augment_gets_the_configs_copies(tmp_path, tiny_dataset,
                                                                                          pipeline):
    """An autoencoder trained without augmentation (a large set) makes no copies of its own; a small set tuned
    through it names the preset's config (--augment-config), whose augmentation the copies then use."""
    assert not load_autoencoder(pipeline["autoencoder"])[0].cfg.augments
    config = tmp_path / "ae.json"
    config.write_text(json.dumps({**TINY_AE, "augment_flip": True, "augment_shift": 1}))
    common = ("generate_fmap_dataset.py", "--dataset-path", tiny_dataset, "--model-path", pipeline["autoencoder"],
              "--augment-copies", "auto")
    assert run_script(*common, "--out-dir", tmp_path / "own").returncode == 0
    result = run_script(*common, "--out-dir", tmp_path / "preset", "--augment-config", config)
    assert result.returncode == 0, result.stderr
    own, preset = (load_fmap_dataset(tmp_path / name / "dataset.json") for name in ("own", "preset"))
    training = int((~own[0].is_heldout).sum())
    assert len(own[0]) == 72 and "augment" not in own[1]
    assert preset[1]["augment"] == {"copies": 8, "seed": 0, "flip": True, "shift": 1, "jitter": 0.0}
    assert len(preset[0]) == 72 + 8 * training
