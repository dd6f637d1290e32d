"""The quality report: metrics with known answers, t-SNE, the downstream experiment, the tokenizer ceiling, the
memorization warning, and the CLI on small datasets."""
import json
from pathlib import Path

import pytest
import torch

from conftest import build_dataset, run_script, write_shape_folder
from core.data import Dataset, load_image_dataset
from core.report.downstream import (AUGMENTED, GENERATED, REAL, SUBSET, DownstreamConfig, build_arms, compare, predict,
                                    run_arms, spread, train_classifier)
from core.errors import PipelineError
from core.metrics import (density_coverage, frechet_distance, memorization_rate, nearest_distances, pca,
                          precision_recall, tsne)
from core.model_artifacts import save_codebook
from core.models.classifier import shift_and_flip
from core.models.codebook import CodebookConfig, SOMCodebook
from core.report.ceiling import ceiling_rows, load_tokenizer
from core.report.memorization import well_above
from core.report.sets import EvalArgs, load_sets
from core.report.spaces import pixels
from core.stages.evaluate import run


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
            "--classifier-steps", 30, "--downstream-steps", 20, "--downstream-seeds", 2, "--device", "cpu")
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
    # the generated set holds the real images themselves: most are flagged, each with the image it copies,
    # and the report warns at its top and on the console
    memorized = report["memorization"]
    assert memorized["generated_rate"] > 0.5 > memorized["heldout_rate"] and memorized["well_above_floor"]
    assert len(memorized["copies"]) == round(memorized["generated_rate"] * report["generated"]["images"])
    exact = [c for c in memorized["copies"] if c["distance"] == 0]
    assert exact and all(c["generated"] == c["training"] for c in exact)  # both datasets number the folder alike
    markdown = (out / "report.md").read_text()
    top = markdown.split("Real: `")[0]
    assert "Memorization: " in top and "WARNING: the generator copies its training images" in top
    assert "WARNING: the generator copies" in result.stderr and "Memorization: " in result.stderr
    # the downstream section: six training sets (no curated set given), two seeds each, tested on every
    # labelled held-out image; the gain is of the best arm with generated images over the better one without
    section = report["downstream"]
    assert set(section["arms"]) == {"generated", "real", "real subset", "real subset, distilled",
                                    "real subset + generated", "real subset + generated, distilled"}
    assert section["baseline_arm"] in ("real subset", "real subset, distilled")
    with_generator = ("real subset + generated", "real subset + generated, distilled")
    assert section["best_arm"] == max(with_generator, key=lambda n: section["arms"][n]["accuracy"]["mean"])
    assert all(len(arm["accuracy"]["runs"]) == 2 for arm in section["arms"].values())
    assert section["test_images"] == report["real"]["heldout_images"] and "Classification Accuracy Score" in top
    assert "## Downstream accuracy" in markdown and "Classification Accuracy Score" in result.stderr
    assert "tokenizer ceiling: skipped (no --autoencoder-path given)" in result.stderr
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
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "no labels" in markdown
    assert report["downstream"] == {"skipped": "the real training images have fewer than two labelled classes"}
    assert "downstream accuracy (the real training images have fewer than two labelled classes)" in markdown


def test_a_report_on_a_tiny_unlabelled_folder_names_what_it_skipped_in_one_line(tmp_path: Path):
    """48 images without labels (10 held out) against 4 generated ones: no classifier and no k-NN metrics,
    said in one line on the console and in report.md; the Fréchet distance and the rest are written."""
    build_dataset(write_folder(tmp_path / "flat", None, count=48), tmp_path / "real", 16, channels=1)
    build_dataset(write_folder(tmp_path / "few", None, count=4), tmp_path / "generated", 16, channels=1, holdout=0.0)
    result = run_script("evaluate.py", "--real-path", tmp_path / "real" / "dataset.json", "--generated-path",
                        tmp_path / "generated" / "dataset.json", "--out-dir", tmp_path / "r",
                        "--device", "cpu")
    assert result.returncode == 0, result.stderr
    report = json.loads((tmp_path / "r" / "report.json").read_text())
    # the 10 held-out images: 6 the reference, 4 the floor's (as many as the generated set)
    assert report["real"]["heldout_images"] == 6 and set(report["spaces"]) == {"pixel_pca"}
    assert set(report["spaces"]["pixel_pca"]) == {"frechet_distance"}
    assert set(report["skipped"]) == {"classifier space and classes", "precision, recall, density and coverage",
                                      "tokenizer ceiling", "downstream accuracy"}
    assert "the generated set has 4 images" in report["skipped"]["precision, recall, density and coverage"]
    [line] = [l for l in result.stderr.splitlines() if l.startswith("Skipped: ")]
    assert "classifier space and classes (the real data has no labels" in line and "k=5" in line
    assert line in (tmp_path / "r" / "report.md").read_text() and report["memorization"]["generated_images"] == 4


def test_a_classifier_for_other_labels_is_refused(tmp_path: Path, two_datasets):
    real, generated = two_datasets
    run(EvalArgs(real, generated, tmp_path / "a", num_images=30, classifier_steps=2, tsne_steps=10, downstream=False,
                 device="cpu"))
    build_dataset(write_folder(tmp_path / "two", ["bright", "dark"]), tmp_path / "other", 16, channels=1, holdout=0.3, seed=0)
    other = tmp_path / "other" / "dataset.json"
    with pytest.raises(PipelineError, match="classifier does not know the labels"):
        run(EvalArgs(other, other, tmp_path / "b", classifier_path=tmp_path / "a" / "classifier.safetensors",
                     device="cpu"))


# ---------------------------------------------------------------- memorization warning

def test_a_memorization_rate_is_well_above_its_floor_only_beyond_noise():
    assert not well_above(0.05, 0.05, 1000)
    assert not well_above(0.08, 0.05, 1000)  # under twice the real rate
    assert well_above(0.12, 0.05, 1000)
    assert not well_above(0.11, 0.05, 20)  # 20 images: 2 copies more than expected is noise


# ---------------------------------------------------------------- downstream accuracy

def test_shift_and_flip_moves_each_image_by_at_most_the_shift():
    images = torch.zeros(64, 1, 9, 9)
    images[:, 0, 4, 2] = 1.0  # one bright pixel, left of centre
    shifted = shift_and_flip(images, 2, False, torch.Generator().manual_seed(0))
    where = shifted.flatten(1).argmax(1)
    rows, cols = where // 9, where % 9
    assert shifted.sum() == 64 and (rows - 4).abs().max() <= 2 and (cols - 2).abs().max() <= 2
    assert len(set(zip(rows.tolist(), cols.tolist()))) > 10  # the shifts vary
    flipped = shift_and_flip(images, 0, True, torch.Generator().manual_seed(0))
    mirrored = flipped[:, 0, 4, 6] == 1.0
    assert 10 < mirrored.sum() < 54 and torch.equal(flipped[~mirrored], images[~mirrored])
    assert torch.equal(shift_and_flip(images, 2, True, torch.Generator().manual_seed(0)),
                       shift_and_flip(images, 2, True, torch.Generator().manual_seed(0)))


@pytest.fixture
def shapes(tmp_path: Path) -> Dataset:
    """60 images of each of three shapes at 16x16, 40% held out."""
    folder = write_shape_folder(tmp_path / "shapes60", 60)
    build_dataset(folder, tmp_path / "shapes_data", 16, channels=1, holdout=0.4, seed=0)
    return load_image_dataset(tmp_path / "shapes_data" / "dataset.json")


def without_labels(data: Dataset, count: int) -> Dataset:
    labels = data.labels.clone()
    labels[:count] = -1
    return Dataset(data.items, labels, data.label_names, data.is_heldout, data.path, data.records)


def test_the_augmented_arm_is_exactly_the_subset_plus_the_generated_images(shapes: Dataset):
    train = shapes.split(heldout=False)
    generated = without_labels(shapes.split(heldout=True), 5)  # unlabelled generated images are left out
    arms = {arm.name: arm for arm in build_arms(train, generated, per_class=7, seed=0, real_share=0.25)}
    subset, fake = arms[SUBSET], arms[GENERATED]
    assert torch.bincount(subset.labels).tolist() == [7, 7, 7]
    assert torch.equal(fake.images, generated.items[5:]) and torch.equal(fake.labels, generated.labels[5:])
    assert torch.equal(arms[AUGMENTED].images, torch.cat([subset.images, fake.images]))
    assert torch.equal(arms[AUGMENTED].labels, torch.cat([subset.labels, fake.labels]))
    weights = arms[AUGMENTED].weights  # a quarter of each batch from the subset, the rest generated
    assert weights[:21].sum() == pytest.approx(0.25) and weights[21:].sum() == pytest.approx(0.75)
    assert weights[:21].unique().numel() == weights[21:].unique().numel() == 1
    assert build_arms(train, generated, per_class=7, seed=0, real_share=None)[3].weights is None
    training = {bytes(x.numpy()): int(y) for x, y in zip(train.items, train.labels)}
    for arm in (subset, arms[REAL]):  # real arms: training images with their own labels
        assert all(training[bytes(x.numpy())] == int(y) for x, y in zip(arm.images, arm.labels))
    assert len(arms[REAL].images) == len(fake.images)  # as many real images as generated ones


def test_cas_of_real_images_matches_the_real_arm_and_shuffled_labels_score_chance(shapes: Dataset):
    train, heldout = shapes.split(heldout=False), shapes.split(heldout=True)
    shuffled = train.labels[torch.randperm(len(train), generator=torch.Generator().manual_seed(0))]
    wrong = Dataset(train.items, shuffled, train.label_names, train.is_heldout, train.path, train.records)
    config = DownstreamConfig(steps=100, batch_size=32, seeds=2, subset_per_class=10)
    quiet = lambda items, description: iter(items)  # noqa: E731
    results = run_arms(build_arms(train, train, per_class=10, seed=0)[:2], heldout, 3, config, 0, torch.device("cpu"), quiet)
    cas, real = results[GENERATED]["accuracy"]["mean"], results[REAL]["accuracy"]["mean"]
    assert real > 0.9 and abs(cas - real) < 0.05
    noise = run_arms(build_arms(train, wrong, per_class=10, seed=0)[:1], heldout, 3, config, 0, torch.device("cpu"), quiet)
    assert noise[GENERATED]["accuracy"]["mean"] < 0.6  # chance is 1/3
    assert len(results[REAL]["per_class"]) == 3
    assert results[REAL]["class_counts"] == torch.bincount(train.labels).tolist()


def test_classifiers_trained_side_by_side_equal_those_trained_one_after_another(shapes: Dataset):
    train, heldout = shapes.split(heldout=False), shapes.split(heldout=True)
    arms = build_arms(train, train, per_class=10, seed=0)[:2]
    config = DownstreamConfig(steps=30, batch_size=16, seeds=2)
    quiet = lambda items, description: iter(items)  # noqa: E731
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # one core: in turn
        in_turn = run_arms(arms, heldout, 3, config, 0, torch.device("cpu"), quiet)
        torch.set_num_threads(2)  # two cores: four classifiers two at a time, each on one thread
        side_by_side = run_arms(arms, heldout, 3, config, 0, torch.device("cpu"), quiet)
    finally:
        torch.set_num_threads(before)
    assert side_by_side == in_turn


def test_batches_follow_the_weights(shapes: Dataset):
    """Images of weight 0 are never drawn: here, copies with wrong labels that would otherwise confuse it."""
    train, heldout = shapes.split(heldout=False), shapes.split(heldout=True)
    wrong = (train.labels + 1) % 3
    images, labels = torch.cat([train.items, train.items]), torch.cat([train.labels, wrong])
    weights = torch.cat([torch.ones(len(train)), torch.zeros(len(train))])
    config = {"steps": 60, "batch_size": 32, "lr": 3e-3, "model_width": 8, "features": 32, "seed": 0}
    model = train_classifier(images, labels, 3, config, torch.device("cpu"), weights=weights)
    _, predicted = predict(model, heldout.items, torch.device("cpu"))
    assert (predicted == heldout.labels).float().mean() > 0.9


def test_compare_calls_a_gain_only_beyond_the_seeds_spread():
    def arm(values, images=100):
        return {"images": images, "accuracy": spread(values)}
    results = {GENERATED: arm([0.80, 0.82]), REAL: arm([0.84, 0.86]), SUBSET: arm([0.70, 0.72]),
               AUGMENTED: arm([0.75, 0.77], 200)}
    figures = compare(results)
    assert figures["cas_over_real"] == pytest.approx(0.81 / 0.85) and figures["equal_size"]
    assert figures["gain_points"] == pytest.approx(5.0) and figures["gain_verdict"] == "gain"
    results[AUGMENTED] = arm([0.71, 0.74], 200)
    assert compare(results)["gain_verdict"] == "within the seeds' spread"
    results[AUGMENTED] = arm([0.60, 0.61], 200)
    assert compare(results)["gain_verdict"] == "loss"


def test_unlabelled_generated_images_skip_the_downstream_section_with_one_line(tmp_path: Path, two_datasets):
    real, _ = two_datasets
    build_dataset(write_folder(tmp_path / "flat", None, count=40), tmp_path / "unlabelled", 16, channels=1,
                  holdout=0.0, seed=0)
    unlabelled = tmp_path / "unlabelled" / "dataset.json"
    result = run_script("evaluate.py", "--real-path", real, "--generated-path", unlabelled, "--out-dir", tmp_path / "r",
                        "--num-images", 30, "--classifier-steps", 5, "--device", "cpu")
    assert result.returncode == 0, result.stderr
    [line] = [l for l in result.stderr.splitlines() if "downstream" in l.lower()]
    assert "downstream accuracy (the generated records carry no labels of the real data)" in line
    assert line in (tmp_path / "r" / "report.md").read_text()


# ---------------------------------------------------------------- the tokenizer ceiling

def test_the_ceiling_of_identical_sets_is_zero(shapes: Dataset):
    images = shapes.items[:60]
    projection = pca(pixels(images), 8)
    featurizers = {"pixel_pca": lambda x: projection.project(pixels(x)).float()}
    references = {"pixel_pca": featurizers["pixel_pca"](images)}
    [row] = ceiling_rows([("the reference itself", images)], references, featurizers, {"pixel_pca": 3.0}, k=3)
    metrics = row["spaces"]["pixel_pca"]
    assert abs(metrics["frechet_distance"]) < 1e-6 and abs(metrics["frechet_over_floor"]) < 1e-6
    assert metrics["precision"] == metrics["recall"] == 1.0


def test_the_ceiling_section_reconstructs_the_floor_through_every_codebook(tmp_path: Path, pipeline):
    data = pipeline["dataset"]
    books = [pipeline[name] for name in ("cond", "l1", "l2")]
    report = run(EvalArgs(data, data, tmp_path / "r", num_images=20, classifier_steps=5, tsne_steps=10, k=2,
                          downstream=False, autoencoder_path=pipeline["autoencoder"], codebook_paths=books,
                          device="cpu"))
    ceiling = report["tokenizer_ceiling"]
    names = [row["images"] for row in ceiling["rows"]]
    assert names[:2] == ["real images as stored", "autoencoder"] and names[-1] == "generated"
    assert [name.split("`")[1] for name in names[2:5]] == ["cb_cond", "cb_l1", "cb_l2"]
    assert "(8x8 patches: 1 token, 8 units)" in names[2] and "(2x2 patches: 16 tokens, 32 units)" in names[4]
    for space, metrics in report["spaces"].items():
        stored = ceiling["rows"][0]["spaces"][space]["frechet_distance"]  # the floor's first draw
        low, high = metrics["frechet_distance"]["real_floor_range"]
        assert low - 1e-9 <= stored <= high + 1e-9
        generated = ceiling["rows"][-1]["spaces"][space]
        assert generated["frechet_over_floor"] == pytest.approx(
            metrics["frechet_distance"]["value"] / metrics["frechet_distance"]["real_floor"])
    markdown = (tmp_path / "r" / "report.md").read_text()
    assert "## Tokenizer ceiling" in markdown and "| autoencoder |" in markdown
    # a codebook made for other feature maps is refused, naming both
    other = tmp_path / "other.safetensors"
    save_codebook(other, SOMCodebook(CodebookConfig(image_H=4, image_W=4, image_C=2, patch_H=2, patch_W=2,
                                                    num_embeddings=4)), {"stage": "test"})
    with pytest.raises(PipelineError, match=r"other.safetensors is for feature maps of shape \(2, 4, 4\)"):
        load_tokenizer(pipeline["autoencoder"], [other], (1, 16, 16), torch.device("cpu"))
    # bad tokenizer flags fail at once, in one line
    for flags, message in ((["--autoencoder-path", tmp_path / "missing.safetensors"], "missing.safetensors"),
                           (["--ceiling-codebook", books[0]], "--ceiling-codebook needs --autoencoder-path"),
                           (["--autoencoder-path", pipeline["autoencoder"], "--ceiling-decoder", pipeline["autoencoder"]],
                            "--ceiling-decoder needs --ceiling-codebook")):
        result = run_script("evaluate.py", "--real-path", data, "--generated-path", data, "--out-dir", tmp_path / "bad",
                            "--k", 2, "--device", "cpu", *flags)
        assert result.returncode == 2 and message in result.stderr and len(result.stderr.strip().splitlines()) == 1
        assert not (tmp_path / "bad" / "report.json").exists()


def test_a_fine_tuned_decoder_adds_the_last_codebooks_maps_decoded_by_it(tmp_path: Path, pipeline):
    """--ceiling-decoder: one more row, the finest codebook's maps through that decoder (here the autoencoder's
    own, so the row equals the codebook's)."""
    data = pipeline["dataset"]
    books = [pipeline[name] for name in ("cond", "l1", "l2")]
    report = run(EvalArgs(data, data, tmp_path / "r", num_images=20, classifier_steps=5, tsne_steps=10, k=2,
                          downstream=False, autoencoder_path=pipeline["autoencoder"], codebook_paths=books,
                          decoder_path=pipeline["autoencoder"], device="cpu"))
    ceiling = report["tokenizer_ceiling"]
    rows = {row["images"].split(" (")[0]: row["spaces"] for row in ceiling["rows"]}
    assert [row["images"] for row in ceiling["rows"]][-2] == "codebook `cb_l2`, the fine-tuned decoder"
    assert rows["codebook `cb_l2`, the fine-tuned decoder"] == rows["codebook `cb_l2`"]
    assert ceiling["decoder"]["path"] == str(pipeline["autoencoder"])


# ---------------------------------------------------------------- the low-data benchmark's dataset

def test_train_per_class_keeps_that_many_training_images_of_each_label(tmp_path: Path, image_folder: Path):
    build_dataset(image_folder, tmp_path / "all", 16, holdout=0.3, seed=0)
    build_dataset(image_folder, tmp_path / "few", 16, holdout=0.3, seed=0, train_per_class=5)
    everything = load_image_dataset(tmp_path / "all" / "dataset.json")
    few = load_image_dataset(tmp_path / "few" / "dataset.json")
    assert torch.bincount(few.split(heldout=False).labels).tolist() == [5, 5, 5]
    held_out = [r["image_fpath"] for r in few.records if r["split"] == "heldout"]
    assert held_out == [r["image_fpath"] for r in everything.records if r["split"] == "heldout"]  # untouched


def test_the_real_arm_is_the_subset_when_it_has_as_many_images_as_generated(shapes: Dataset):
    train, generated = shapes.split(heldout=False), shapes.split(heldout=True)
    per_class = len(generated) // 3
    assert len(generated) == 3 * per_class < len(train)  # a balanced subset as large as the generated set
    arms = {arm.name: arm for arm in build_arms(train, generated, per_class=per_class, seed=0)}
    assert arms[REAL].same_as == SUBSET and torch.equal(arms[REAL].images, arms[SUBSET].images)
    assert build_arms(train, generated, per_class=per_class - 1, seed=0)[1].same_as is None


def test_the_real_arm_reuses_the_subset_when_both_hold_every_real_image(shapes: Dataset):
    train, heldout = shapes.split(heldout=False), shapes.split(heldout=True)
    per_class = int(torch.bincount(train.labels).max())
    arms = build_arms(train, train, per_class=per_class, seed=0)  # as many generated as real: all of them
    assert [a.same_as for a in arms if a.name == REAL] == [SUBSET]
    config = DownstreamConfig(steps=5, batch_size=8, seeds=1)
    results = run_arms(arms, heldout, 3, config, 0, torch.device("cpu"), lambda items, description: iter(items))
    assert results[REAL]["accuracy"] == results[SUBSET]["accuracy"] and results[REAL]["same_as"] == SUBSET
    assert list(results) == [arm.name for arm in arms]
    assert build_arms(train, train, per_class=2, seed=0)[1].same_as is None
