import json
import shutil

import pytest
import torch

from conftest import TINY_AE, build_dataset, run_script, write_shape_folder
from core.data import load_fmap_dataset
from core.model_artifacts import load_codebook
from core.models.codebook import CodebookConfig, SOMCodebook, patchify, unpatchify, usage_counts, usage_stats
from core.stages.prune import prune


def divisors(n):
    return [d for d in range(1, n + 1) if n % d == 0]


def test_patchify_round_trip_every_patch_size():
    fmaps = torch.randn(3, 2, 8, 12)
    for ph in divisors(8):
        for pw in divisors(12):
            patches = patchify(fmaps, ph, pw)
            assert patches.shape == (3, (8 // ph) * (12 // pw), ph * pw * 2)
            assert torch.equal(unpatchify(patches, (2, 8, 12), ph, pw), fmaps)


def test_patch_holds_its_own_pixels():
    fmaps = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    patches = patchify(fmaps, 2, 2)
    top_right = fmaps[0, :, 0:2, 2:4]  # second patch in row-major order
    assert sorted(patches[0, 1].tolist()) == sorted(top_right.flatten().tolist())
    assert patchify(fmaps, 4, 4).shape == (1, 1, 32)  # the whole map: one condition token


def test_bmu_equals_brute_force():
    torch.manual_seed(0)
    codebook = SOMCodebook(CodebookConfig(image_H=4, image_W=4, image_C=3, patch_H=2, patch_W=2, num_embeddings=50))
    with torch.no_grad():
        codebook.units.normal_()
    vectors = torch.randn(3000, 12)
    brute = torch.cdist(vectors.double(), codebook.units.double()).argmin(1)
    assert torch.equal(codebook.bmu(vectors, chunk=700), brute)


def clustered(n, centers, noise=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    picks = torch.randint(len(centers), (n,), generator=g)
    return centers[picks] + noise * torch.randn(n, centers.shape[1], generator=g)


def test_training_lowers_quantization_error_on_clusters():
    torch.manual_seed(0)
    centers = torch.randn(8, 16)
    data = clustered(4096, centers).reshape(4096, 1, 4, 4)  # one 4x4x1 map per vector
    cfg = CodebookConfig(image_H=4, image_W=4, image_C=1, patch_H=4, patch_W=4, num_embeddings=16,
                         neighbourhood_radius=1.0, neighbourhood_step=50, dead_unit_step=25)
    codebook = SOMCodebook(cfg)
    with torch.no_grad():
        codebook.units.normal_(0, 0.1)  # a poor start: the training has to do the work

    def error():
        flat = data.reshape(len(data), -1)
        return codebook.distances(flat).min(1).values.mean().item() / 16

    before = error()
    optimizer = torch.optim.Adam(codebook.parameters(), lr=0.05)
    for step in range(400):
        batch = data[torch.randint(len(data), (128,))]
        loss = codebook(batch, step)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = error()
    assert after < 0.1 * before
    assert after < 0.01  # close to the clusters' own spread (0.05^2)
    assert (torch.cdist(centers, codebook.units.detach()).min(1).values < 0.2).all()  # a unit on every cluster


def test_init_from_data_uses_data_patches():
    torch.manual_seed(0)
    data = clustered(500, torch.randn(4, 8)).reshape(500, 2, 2, 2)
    codebook = SOMCodebook(CodebookConfig(image_H=2, image_W=2, image_C=2, patch_H=2, patch_W=2, num_embeddings=4))
    codebook.init_from_data(data)
    flat = patchify(data, 2, 2).reshape(-1, 8)
    gaps = (codebook.units.detach()[:, None] - flat[None]).abs().sum(-1).min(1).values
    assert (gaps == 0).all()  # every unit is a data patch
    assert usage_stats(usage_counts(codebook, data))["used_units"] == 4  # k-means++ finds every cluster


def test_prune_remaps_and_keeps_decoding():
    torch.manual_seed(0)
    cfg = CodebookConfig(image_H=4, image_W=4, image_C=2, patch_H=2, patch_W=2, num_embeddings=16)
    codebook = SOMCodebook(cfg)
    with torch.no_grad():
        codebook.units.normal_()
    fmaps = torch.randn(200, 2, 4, 4)
    counts = usage_counts(codebook, fmaps)
    threshold = int(counts.float().median())
    pruned, remap = prune(codebook, counts, threshold)
    kept = counts >= threshold
    assert pruned.cfg.num_embeddings == int(kept.sum()) and (remap[~kept] == -1).all()
    old_tokens = codebook.tokenize(fmaps)
    new_tokens = pruned.tokenize(fmaps)
    stays = kept[old_tokens]
    assert torch.equal(new_tokens[stays], remap[old_tokens[stays]])
    old_maps, new_maps = codebook.lookup(old_tokens), pruned.lookup(new_tokens)
    same_patch = patchify(old_maps, 2, 2)[stays], patchify(new_maps, 2, 2)[stays]
    assert torch.equal(*same_patch)
    assert torch.equal(pruned.grid, codebook.grid[kept])


def test_prune_threshold_too_high():
    codebook = SOMCodebook(CodebookConfig(image_H=2, image_W=2, image_C=1, patch_H=2, patch_W=2, num_embeddings=4))
    from core.errors import PipelineError
    with pytest.raises(PipelineError, match="keeps 0 of 4 units"):
        prune(codebook, torch.tensor([1, 2, 3, 0]), 10)


def test_patch_must_tile_the_map():
    from core.config import config_from_dict
    from core.errors import PipelineError
    with pytest.raises(PipelineError, match="patch 3x3 does not tile the feature map 8x8"):
        config_from_dict(CodebookConfig, {"image_H": 8, "image_W": 8, "patch_H": 3, "patch_W": 3})


@pytest.fixture(scope="module")
def fmap_dataset(tmp_path_factory):
    """The shapes dataset at 16x16, a tiny autoencoder, and its feature maps: (2, 8, 8) each, made once for the
    module's tests, which only read them."""
    root = tmp_path_factory.mktemp("fmaps")
    build_dataset(write_shape_folder(root / "shapes", 24), root / "data", size=16, holdout=0.15)
    dataset = root / "data" / "dataset.json"
    (root / "ae.json").write_text(json.dumps(TINY_AE))
    ae = root / "ae"
    result = run_script("train_autoencoder.py", "--dataset-path", dataset, "--config-path", root / "ae.json",
                        "--out-dir", ae, "--max-steps", "30", "--batch-size", "8", "--max-epoch", "100")
    assert result.returncode == 0, result.stderr
    out = root / "fmaps"
    result = run_script("generate_fmap_dataset.py", "--dataset-path", dataset, "--model-path",
                        ae / "autoencoder.safetensors", "--out-dir", out, "--num-files-folder", "25", "--batch-size", "7")
    assert result.returncode == 0, result.stderr
    return out / "dataset.json", ae / "autoencoder.safetensors", dataset


def test_fmap_dataset_matches_encoder(fmap_dataset):
    from core.model_artifacts import load_autoencoder
    from core.data import load_image_dataset, to_float
    path, ae_path, tiny_dataset = fmap_dataset
    data, info = load_fmap_dataset(path)
    images = load_image_dataset(tiny_dataset)
    assert info["fmap_shape"] == [2, 8, 8] and data.items.shape == (72, 2, 8, 8)
    assert len(list(path.parent.glob("shards/*.safetensors"))) == 3  # 72 maps, 25 a shard
    model, _ = load_autoencoder(ae_path)
    with torch.no_grad():
        expected = model.encoder(to_float(images.items))
    assert torch.allclose(data.items, expected, atol=1e-5)
    assert torch.equal(data.labels, images.labels) and torch.equal(data.is_heldout, images.is_heldout)


def test_fmap_generation_resumes(tmp_path, fmap_dataset):
    shared, ae_path, tiny_dataset = fmap_dataset
    path = tmp_path / "fmaps" / "dataset.json"
    shutil.copytree(shared.parent, path.parent)
    (path.parent / "shards" / "shard_00002.safetensors").unlink()  # as if killed before the last shard
    result = run_script("generate_fmap_dataset.py", "--dataset-path", tiny_dataset, "--model-path", ae_path,
                        "--out-dir", path.parent, "--num-files-folder", "25")
    assert result.returncode == 0 and "2 reused" in result.stderr, result.stderr
    assert load_fmap_dataset(path)[0].items.shape == (72, 2, 8, 8)


def test_codebook_and_prune_stages(tmp_path, fmap_dataset):
    path, ae_path, _ = fmap_dataset
    config = tmp_path / "cb.json"
    config.write_text(json.dumps({"image_H": 8, "image_W": 8, "image_C": 2, "patch_H": 4, "patch_W": 4,
                                  "num_embeddings": 16, "neighbourhood_step": 10, "model_lr": 0.01}))
    out = tmp_path / "cb"
    result = run_script("train_codebook.py", "--dataset-path", path, "--config-path", config, "--out-dir", out,
                        "--decoder-path", ae_path, "--max-steps", "40", "--batch-size", "8", "--max-epoch", "100",
                        "--checkpoint-step", "20")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if "quant_mse" in r]
    assert len(evals) == 2 and {"decoded_psnr", "used_units", "perplexity"} <= set(evals[-1])
    assert (out / "samples" / "quantized_0000040.png").exists()
    codebook, artifact = load_codebook(out / "codebook.safetensors")
    assert artifact.provenance["step"] == 40

    pruned_dir = tmp_path / "pruned"
    result = run_script("prune_codebook.py", "--dataset-path", path, "--codebook-path", out / "codebook.safetensors",
                        "--out-dir", pruned_dir, "--prune-threshold", "5")
    assert result.returncode == 0, result.stderr
    report = json.loads((pruned_dir / "usage_report.json").read_text())
    assert report["before"]["units"] == 16 and report["after"]["units"] == sum(c >= 5 for c in report["counts_before"])
    pruned, artifact = load_codebook(pruned_dir / "codebook.safetensors")
    assert len(artifact.extra["remap"]) == 16


def test_codebook_for_other_maps_is_refused(tmp_path, fmap_dataset):
    path, _, _ = fmap_dataset
    other = SOMCodebook(CodebookConfig(image_H=4, image_W=4, image_C=2, patch_H=2, patch_W=2, num_embeddings=4))
    from core.model_artifacts import save_codebook
    save_codebook(tmp_path / "other.safetensors", other, {})
    result = run_script("prune_codebook.py", "--dataset-path", path, "--codebook-path", tmp_path / "other.safetensors",
                        "--out-dir", tmp_path / "p")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'other.safetensors'} is for feature maps of shape (2, 4, 4) (C, H, W), "
        f"but {path} holds maps of shape (2, 8, 8)"]
    assert not (tmp_path / "p").exists()


def test_image_dataset_is_not_a_fmap_dataset(tmp_path, tiny_dataset):
    result = run_script("train_codebook.py", "--dataset-path", tiny_dataset, "--out-dir", tmp_path / "cb")
    assert result.returncode == 2 and "expected a feature-map dataset" in result.stderr


def test_a_config_without_shape_keys_takes_the_maps_shape(tmp_path, fmap_dataset):
    path, _, _ = fmap_dataset
    config = tmp_path / "cb.json"
    for name, patch, tokens in (("cond", "map", 1), ("fine", 2, 16)):
        config.write_text(json.dumps({"patch_H": patch, "patch_W": patch, "num_embeddings": 8}))
        result = run_script("train_codebook.py", "--dataset-path", path, "--config-path", config,
                            "--out-dir", tmp_path / name, "--max-steps", "3", "--batch-size", "8")
        assert result.returncode == 0, result.stderr
        codebook, artifact = load_codebook(tmp_path / name / "codebook.safetensors")
        assert codebook.cfg.fmap_shape == (2, 8, 8) and codebook.cfg.num_patches == tokens
        assert artifact.config["image_H"] == 8  # the artifact holds the sizes it was made for


def test_a_wrong_shape_given_explicitly_fails_in_one_line(tmp_path, fmap_dataset):
    path, _, _ = fmap_dataset
    config = tmp_path / "cb.json"
    config.write_text(json.dumps({"image_H": 32, "image_W": 32, "image_C": 4, "patch_H": 8, "patch_W": 8}))
    result = run_script("train_codebook.py", "--dataset-path", path, "--config-path", config, "--out-dir", tmp_path / "c")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {config}: image_C 4, image_H 32, image_W 32, but {path} holds feature maps of shape (2, 8, 8) "
        "(C, H, W); leave image_C/H/W out to take them from the data"]
    assert not (tmp_path / "c").exists()
