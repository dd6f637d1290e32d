"""The quality report: metrics with known answers, t-SNE, and the CLI on two tiny datasets."""
import json
from pathlib import Path

import pytest
import torch

from conftest import build_dataset, run_script
from core.errors import PipelineError
from core.metrics import (density_coverage, frechet_distance, memorization_rate, nearest_distances, pca,
                          precision_recall, tsne)
from core.stages.evaluate import EvalArgs, load_sets, run


def gaussian(n: int, mean: list[float], std: list[float], seed: int = 0) -> torch.Tensor:
    """Samples whose empirical mean and covariance are exactly `mean` and diag(std^2)."""
    z = torch.randn(n, len(mean), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    z = z @ torch.linalg.inv(torch.linalg.cholesky(torch.cov(z.T))).T  # whiten: covariance exactly identity
    return z * torch.tensor(std, dtype=torch.float64) + torch.tensor(mean, dtype=torch.float64)


def test_frechet_distance_of_identical_sets_is_zero():
    x = gaussian(300, [0, 1, 2, 3], [1, 2, 3, 4])
    assert abs(frechet_distance(x, x)) < 1e-8


def test_frechet_distance_matches_hand_computation():
    # diagonal covariances commute: FD = |mu_a - mu_b|^2 + sum_i (s_a,i - s_b,i)^2 in standard deviations
    a = gaussian(500, [0, 0, 0], [1, 2, 3], seed=1)
    b = gaussian(500, [3, 0, 4], [2, 1, 3], seed=2)
    expected = (3 ** 2 + 4 ** 2) + (1 - 2) ** 2 + (2 - 1) ** 2 + 0
    assert frechet_distance(a, b) == pytest.approx(expected, abs=1e-6)
    # a rotation of both sets changes nothing
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    assert frechet_distance(a @ q, b @ q) == pytest.approx(expected, abs=1e-6)


def test_identical_sets_have_full_precision_recall_and_coverage():
    x = torch.randn(200, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(x, x, k=5) == (1.0, 1.0)
    density, coverage = density_coverage(x, x, k=5)
    assert coverage == 1.0 and 0.8 < density < 1.5


def test_disjoint_sets_score_zero():
    dark = torch.randn(200, 16, generator=torch.Generator().manual_seed(0)) * 0.1 - 1
    bright = torch.randn(200, 16, generator=torch.Generator().manual_seed(1)) * 0.1 + 1
    assert frechet_distance(dark, bright) > 60  # |mu_a - mu_b|^2 alone is 16 * 2^2
    assert precision_recall(dark, bright) == (0.0, 0.0)
    assert density_coverage(dark, bright) == (0.0, 0.0)


def test_samples_of_one_distribution_score_high():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g)
    precision, recall = precision_recall(real, fake)
    density, coverage = density_coverage(real, fake)
    assert precision > 0.9 and recall > 0.9 and coverage > 0.9 and 0.7 < density < 1.3


def test_memorization_flags_copies_and_not_fresh_samples():
    g = torch.Generator().manual_seed(0)
    train, heldout, fresh = (torch.randn(n, 16, generator=g) for n in (2000, 500, 500))
    heldout_nn, _ = nearest_distances(heldout, train)
    copies = train[torch.randperm(2000, generator=g)[:300]]
    copies_nn, index = nearest_distances(copies, train, chunk=256)
    assert torch.equal(train[index], copies)
    result = memorization_rate(copies_nn, heldout_nn, percentile=5)
    assert result["generated_rate"] == 1.0
    assert result["heldout_rate"] == pytest.approx(0.05, abs=0.005)
    fresh_nn, _ = nearest_distances(fresh, train)
    assert memorization_rate(fresh_nn, heldout_nn)["generated_rate"] < 0.12


def test_pca_finds_the_long_axis():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 3, generator=g) * torch.tensor([0.1, 5.0, 1.0])
    fit = pca(x, 2)
    assert abs(fit.components[0, 1]) > 0.99 and abs(fit.components[1, 2]) > 0.99
    assert fit.project(x).shape == (400, 2) and fit.explained[0] > 0.9


def test_tsne_keeps_separated_clusters_apart():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(3, 10) * 20
    x = torch.cat([torch.randn(40, 10, generator=g) + c for c in centres])
    labels = torch.arange(3).repeat_interleave(40)
    y = tsne(x, steps=300, seed=0)
    assert y.shape == (120, 2) and torch.isfinite(y).all()
    means = torch.stack([y[labels == c].mean(0) for c in range(3)])
    nearest = torch.cdist(y, means).argmin(1)
    assert torch.equal(nearest, labels)
    assert torch.equal(tsne(x, steps=300, seed=0), y)  # deterministic given the seed


@pytest.fixture
def two_datasets(tmp_path: Path, image_folder: Path) -> tuple[Path, Path]:
    for name, seed in (("real", 0), ("generated", 1)):
        build_dataset(image_folder, tmp_path / name, size=16, channels=1, holdout=0.3, seed=seed)
    return tmp_path / "real" / "dataset.json", tmp_path / "generated" / "dataset.json"


def test_cli_writes_the_report_and_reuses_its_classifier(tmp_path: Path, two_datasets):
    real, generated = two_datasets
    out = tmp_path / "report"
    args = ("--real-path", real, "--generated-path", generated, "--out-dir", out, "--num-images", 40,
            "--classifier-steps", 30, "--device", "cpu")
    result = run_script("evaluate.py", *args)
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "report.json").read_text())
    assert set(report["spaces"]) == {"classifier", "pixel_pca"}
    # a small real training split gets few PCA axes (about ten images per axis), not 64
    assert report["pixel_pca"]["components"] == max(2, report["pixel_pca"]["fit_images"] // 10) < 64
    for metrics in report["spaces"].values():
        assert set(metrics) == {"frechet_distance", "precision", "recall", "density", "coverage"}
        assert all(set(m) == {"value", "real_floor", "real_floor_range"} for m in metrics.values())
    assert report["classes"]["names"] == ["bar", "circle", "square"]
    assert sum(report["classes"]["generated"]) == report["generated"]["images"]
    assert 0 <= report["classifier"]["heldout_accuracy"] <= 1 and not report["classifier"]["reused"]
    # the generated set holds the real training images themselves: most are flagged
    assert report["memorization"]["generated_rate"] > 0.5 > report["memorization"]["heldout_rate"]
    markdown = (out / "report.md").read_text()
    for picture in ("grids.png", "pca.png", "tsne.png", "nearest.png"):
        assert (out / picture).stat().st_size > 0 and f"]({picture})" in markdown
    again = run_script("evaluate.py", *args)
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "report.json").read_text())["classifier"]["reused"]


def test_cli_refuses_images_of_another_size(tmp_path: Path, image_folder: Path, two_datasets):
    real, _ = two_datasets
    build_dataset(image_folder, tmp_path / "small", size=8, channels=1, holdout=0.3, seed=0)
    small = tmp_path / "small" / "dataset.json"
    result = run_script("evaluate.py", "--real-path", real, "--generated-path", small, "--out-dir", tmp_path / "r",
                        "--device", "cpu")
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr
    assert str(real) in lines[0] and str(small) in lines[0] and "1x16x16" in lines[0] and "1x8x8" in lines[0]


def test_a_real_set_without_held_out_images_is_refused(tmp_path: Path, image_folder: Path):
    build_dataset(image_folder, tmp_path / "all", size=16, channels=1, holdout=0.0, seed=0)
    path = tmp_path / "all" / "dataset.json"
    with pytest.raises(PipelineError, match="no held-out images"):
        load_sets(EvalArgs(path, path, tmp_path / "r"))


def test_a_small_held_out_split_shares_itself_with_the_floor(tmp_path: Path):
    """Few-shot: the real held-out set is smaller than num_images. The floor is still held-out images,
    as many as the generated ones, none of them in the reference."""
    build_dataset(write_folder(tmp_path / "flat", None, count=100), tmp_path / "real", 16, channels=1, holdout=0.4, seed=0)
    path = tmp_path / "real" / "dataset.json"
    held_out = len(load_sets(EvalArgs(path, path, tmp_path / "r")).real.split(heldout=True))
    sets = load_sets(EvalArgs(path, path, tmp_path / "r", num_images=1000))  # more generated than held-out
    assert sets.floor_source == "training" and len(sets.heldout) == held_out
    few = held_out // 3
    generated = tmp_path / "generated"
    build_dataset(write_folder(tmp_path / "few", None, count=few), generated, 16, channels=1, holdout=0.0, seed=1)
    sets = load_sets(EvalArgs(path, generated / "dataset.json", tmp_path / "r", num_images=1000))
    assert sets.floor_source == "held-out" and len(sets.generated) == len(sets.floors[0]) == few
    assert len(sets.heldout) == held_out - few
    reference = {bytes(x.numpy()) for x in sets.heldout.items}
    assert not reference & {bytes(x.numpy()) for x in sets.floors[0].items}


def write_folder(folder: Path, classes: list[str] | None, count: int = 60) -> Path:
    """Dark and bright noise images, in one sub-folder per class or (classes None) all in one folder."""
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for i in range(count):
        sub = folder / classes[i % len(classes)] if classes else folder
        sub.mkdir(parents=True, exist_ok=True)
        level = 60 if i % 2 else 190
        Image.fromarray((level + rng.integers(0, 50, (16, 16))).astype(np.uint8)).save(sub / f"{i:03d}.png")
    return folder


def test_unlabelled_real_data_gets_the_pixel_space_only(tmp_path: Path):
    build_dataset(write_folder(tmp_path / "flat", None), tmp_path / "real", 16, channels=1, holdout=0.3, seed=0)
    path = tmp_path / "real" / "dataset.json"
    report = run(EvalArgs(path, path, tmp_path / "r", tsne_steps=50, device="cpu"))
    assert set(report["spaces"]) == {"pixel_pca"} and "classifier" not in report and "classes" not in report
    assert "no labels" in (tmp_path / "r" / "report.md").read_text()


def test_a_classifier_for_other_labels_is_refused(tmp_path: Path, two_datasets):
    real, generated = two_datasets
    run(EvalArgs(real, generated, tmp_path / "a", num_images=30, classifier_steps=2, tsne_steps=10, device="cpu"))
    build_dataset(write_folder(tmp_path / "two", ["bright", "dark"]), tmp_path / "other", 16, channels=1, holdout=0.3, seed=0)
    other = tmp_path / "other" / "dataset.json"
    with pytest.raises(PipelineError, match="classifier does not know the labels"):
        run(EvalArgs(other, other, tmp_path / "b", classifier_path=tmp_path / "a" / "classifier.safetensors",
                     device="cpu"))
