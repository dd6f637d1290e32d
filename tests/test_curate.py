"""The curation stage: the teacher's soft labels, its filters, near-copies, the choice on a validation split,
the class-folder tree; and the downstream arms that use the curated set."""
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import build_dataset, run_script, shape_image, write_colour_folder, write_generated_set, \
    write_shape_folder
from core.artifacts import load_artifact
from core.data import load_image_dataset
from core.generator import Generator
from core.report.downstream import (CURATED, CURATED_ALONE, DISTILLED, DISTILLED_GENERATED, SUBSET, DownstreamConfig,
                                    build_arms, load_curated, pool_batch, soft_cross_entropy, train_classifier)
from core.stages.curate import CurateArgs, Rule, Scores, run, select
from core.report.sets import TEACHER_FILE
from core.stages.evaluate import EvalArgs, run as evaluate

NAMES = ["bar", "circle", "square"]  # the label names, sorted; shape_image's kinds are circle, square, bar
KIND_NAMES = ["circle", "square", "bar"]
QUICK = DownstreamConfig(steps=40, batch_size=32)


@pytest.fixture
def real(tmp_path: Path) -> Path:
    write_shape_folder(tmp_path / "shapes", 30)
    build_dataset(tmp_path / "shapes", tmp_path / "real", size=16, channels=1, holdout=0.3, seed=0)
    return tmp_path / "real" / "dataset.json"


def novel_shapes(count: int, first_variant: int = 7000) -> tuple[list[np.ndarray], list[int]]:
    """Shapes of variants the real set does not have, and their true kinds."""
    kinds = [i % 3 for i in range(count)]
    return [shape_image(k, first_variant + i) for i, k in enumerate(kinds)], kinds


def curate(real: Path, generated: Path, out: Path, **overrides) -> dict:
    settings = {"teacher_steps": 80, "choice_seeds": 1, "downstream": QUICK, "device": "cpu", **overrides}
    return run(CurateArgs(real_path=real, generated_path=generated, out_dir=out, **settings))


def kept_records(out: Path) -> list[dict]:
    return list(json.loads((out / "dataset.json").read_text())["_default"].values())


def test_the_agree_filter_drops_most_images_relabelled_at_random(tmp_path: Path, real: Path):
    images, kinds = novel_shapes(120)
    rng = np.random.default_rng(0)
    asked = [int(k) if i % 2 == 0 else int((k + rng.integers(1, 3)) % 3) for i, k in enumerate(kinds)]  # half wrong
    generated = write_generated_set(tmp_path / "gen", images, [KIND_NAMES[a] for a in asked])
    summary = curate(real, generated, tmp_path / "cur", labels="asked", filter="agree")
    kept = {int(r["index"]) for r in kept_records(tmp_path / "cur")}
    wrong = {i for i in range(120) if asked[i] != kinds[i]}
    assert len(kept & wrong) <= 0.2 * len(wrong)  # most wrongly labelled images are gone
    assert len(kept - wrong) >= 0.5 * (120 - len(wrong))  # most right ones stay
    assert summary["agreement"] == pytest.approx(0.5, abs=0.15)
    assert summary["dropped"]["teacher"] >= 0.8 * len(wrong) - summary["dropped"]["near_copies"]
    asked_counts = {KIND_NAMES[k]: n for k, n in enumerate(np.bincount(asked, minlength=3))}
    shares = {name: kept_count / asked_counts[name] for name, kept_count in summary["kept_per_class"].items()}
    # balanced: every class keeps the smallest share of its asked images, to within one image
    assert all(0 <= shares[name] - min(shares.values()) < 1 / asked_counts[name] for name in shares)


def test_the_balance_keeps_the_asked_proportions_and_a_failed_class_does_not_empty_the_set():
    asked = torch.tensor([0] * 40 + [1] * 40 + [2] * 20)
    probs = F.one_hot(asked, 3).float()
    probs[asked == 2] = torch.tensor([1.0, 0.0, 0.0])  # the teacher rejects every image of class 2
    probs[60:80] = torch.tensor([0.0, 0.0, 1.0])  # and half of class 1's
    scores = Scores(asked, probs, torch.ones(100))
    kept, carried, _, failed = select(scores, Rule("asked", "agree", 0.5), 3)
    assert failed == [2]
    assert torch.bincount(carried[kept], minlength=3).tolist() == [20, 20, 0]  # class 0 down to class 1's share
    probs[asked == 2] = torch.tensor([0.0, 0.0, 1.0])  # class 2 half accepted: in the balance, half of its 20
    probs[90:] = torch.tensor([1.0, 0.0, 0.0])
    kept, carried, _, failed = select(Scores(asked, probs, torch.ones(100)), Rule("asked", "agree", 0.5), 3)
    assert failed == [] and torch.bincount(carried[kept], minlength=3).tolist() == [20, 20, 10]
    probs[asked == 0] = torch.tensor([0.0, 1.0, 0.0])  # two classes rejected outright: the median share is 0
    probs[asked == 2] = torch.tensor([1.0, 0.0, 0.0])
    kept, carried, _, failed = select(Scores(asked, probs, torch.ones(100)), Rule("asked", "agree", 0.5), 3)
    assert failed == [0, 2] and torch.bincount(carried[kept], minlength=3).tolist() == [0, 20, 0]


def test_soft_labels_sum_to_one_and_round_trip_through_the_records_and_the_folder(tmp_path: Path, real: Path):
    images, kinds = novel_shapes(60)
    generated = write_generated_set(tmp_path / "gen", images, [KIND_NAMES[k] for k in kinds])
    curate(real, generated, tmp_path / "cur", labels="teacher", filter="none")
    records = kept_records(tmp_path / "cur")
    soft = torch.tensor([r["soft_label"] for r in records])
    assert torch.allclose(soft.sum(1), torch.ones(len(records)), atol=1e-3)
    assert all(r["labels"] == [NAMES[int(torch.tensor(r["soft_label"]).argmax())]] for r in records)
    assert all(r["curation"]["teacher_agrees"] == (r["curation"]["teacher"] == r["curation"]["asked"])
               for r in records)
    curated = load_curated(tmp_path / "cur" / "dataset.json", NAMES)
    assert torch.allclose(curated.targets, soft) and len(curated.data) == len(records)
    generated_images = load_image_dataset(generated)
    by_index = {int(r["index"]): i for i, r in enumerate(records)}
    for index, row in by_index.items():  # the curated records point at the generated images themselves
        assert torch.equal(curated.data.items[row], generated_images.items[index])
    with open(tmp_path / "cur" / "folder" / "soft_labels.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["file", "label", *NAMES] and len(rows) == len(records) + 1
    for (file, label, *probs), record in zip(rows[1:], records):
        assert file.startswith(f"{label}/") and (tmp_path / "cur" / "folder" / file).is_file()
        assert [float(p) for p in probs] == pytest.approx(record["soft_label"])


def test_near_copies_of_training_images_are_dropped(tmp_path: Path, real: Path):
    train = load_image_dataset(real).split(heldout=False)
    copies = [train.items[i, 0].numpy() for i in range(12)]
    images, kinds = novel_shapes(30)
    generated = write_generated_set(tmp_path / "gen", copies + images,
                                    [train.label_names[int(train.labels[i])] for i in range(12)] +
                                    [KIND_NAMES[k] for k in kinds])
    summary = curate(real, generated, tmp_path / "cur", labels="asked", filter="none")
    kept = {int(r["index"]) for r in kept_records(tmp_path / "cur")}
    assert not kept & set(range(12)) and summary["dropped"]["near_copies"] >= 12
    assert all("nearest training image" in r["curation"]["kept"] for r in kept_records(tmp_path / "cur"))


@pytest.mark.parametrize("validation", ["carved", "heldout"])
def test_the_choice_is_made_on_a_validation_split_and_recorded(tmp_path: Path, real: Path, validation: str):
    """Carved: a fifth of the training images; heldout (a chain's validation share): the held-out split, with
    the teacher and the classifiers fitting every training image."""
    images, kinds = novel_shapes(60)
    generated = write_generated_set(tmp_path / "gen", images, [KIND_NAMES[k] for k in kinds])
    summary = curate(real, generated, tmp_path / "cur", validation=validation)
    choice = summary["choice"]
    train_count = len(load_image_dataset(real).split(heldout=False))
    heldout_count = len(load_image_dataset(real).split(heldout=True))
    if validation == "carved":
        assert choice["fit_images"] + choice["validation_images"] == train_count
        assert choice["validation_images"] == pytest.approx(0.2 * train_count, abs=3)
    else:
        assert (choice["fit_images"], choice["validation_images"]) == (train_count, heldout_count)
    candidates = [c for c in choice["candidates"].values() if "labels" in c]
    best = max(candidates, key=lambda c: c["accuracy"]["mean"])
    assert (summary["rule"]["labels"], summary["rule"]["filter"]) == (best["labels"], best["filter"])
    assert "real alone" in choice["candidates"] and len(candidates) == 5


def test_an_unlabelled_set_gets_no_teacher_in_one_line_and_still_loses_its_near_copies(tmp_path: Path):
    build_dataset(write_colour_folder(tmp_path / "flat", 40), tmp_path / "real", size=16, holdout=0.25, seed=0)
    real = tmp_path / "real" / "dataset.json"
    train = load_image_dataset(real).split(heldout=False)
    copies = [train.items[i].permute(1, 2, 0).numpy() for i in range(5)]
    generated = write_generated_set(tmp_path / "gen", copies + [np.full((16, 16, 3), 90, np.uint8)] * 5, [None] * 10)
    result = run_script("curate_images.py", "--real-path", real, "--generated-path", generated,
                        "--out-dir", tmp_path / "cur", "--device", "cpu")
    assert result.returncode == 0, result.stderr
    assert sum("no labels: no teacher" in line for line in (result.stdout + result.stderr).splitlines()) == 1
    kept = {int(r["index"]) for r in kept_records(tmp_path / "cur")}
    assert kept == set(range(5, 10))
    assert not (tmp_path / "cur" / "teacher.safetensors").exists()


@pytest.mark.parametrize("flag", ["--labels", "--validation"])
def test_a_bad_label_mode_or_validation_is_one_line_and_exit_2(tmp_path: Path, real: Path, flag: str):
    result = run_script("curate_images.py", "--real-path", real, "--generated-path", real,
                        "--out-dir", tmp_path / "cur", flag, "guess")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and f"{flag} must be one of" in result.stderr
    assert not (tmp_path / "cur").exists()


def test_the_distillation_loss_with_one_hot_targets_is_cross_entropy():
    logits, labels = torch.randn(16, 5), torch.randint(5, (16,))
    assert soft_cross_entropy(logits, F.one_hot(labels, 5).float()) == pytest.approx(
        float(F.cross_entropy(logits, labels)), rel=1e-6)


def test_the_distilled_and_curated_arms_train_on_exactly_the_images_they_name(tmp_path: Path, real: Path):
    images, kinds = novel_shapes(60)
    generated = write_generated_set(tmp_path / "gen", images, [KIND_NAMES[k] for k in kinds])
    curate(real, generated, tmp_path / "cur", labels="blend", filter="none")
    curated = load_curated(tmp_path / "cur" / "dataset.json", NAMES)
    data = load_image_dataset(real)
    train = data.split(heldout=False)
    teacher = train_classifier(train.items, train.labels, 3, {**vars(QUICK), "seed": 0}, torch.device("cpu"))
    arms = {a.name: a for a in build_arms(train, load_image_dataset(generated).relabelled(NAMES), per_class=10,
                                          seed=0, real_share=0.5, teacher=teacher, curated=curated, num_classes=3)}
    subset = arms[SUBSET]
    assert arms[DISTILLED].teacher is teacher and torch.equal(arms[DISTILLED].images, subset.images)
    assert torch.equal(arms[CURATED].images, torch.cat([subset.images, curated.data.items]))
    assert torch.equal(arms[CURATED].targets, torch.cat([F.one_hot(subset.labels, 3).float(), curated.targets]))
    assert arms[CURATED].weights[:len(subset.images)].sum() == pytest.approx(0.5)
    assert torch.equal(arms[CURATED_ALONE].images, curated.data.items)
    distilled_generated = arms[DISTILLED_GENERATED]
    assert distilled_generated.teacher is teacher and torch.equal(distilled_generated.images, subset.images)
    assert torch.equal(distilled_generated.mixup_pool, torch.cat([subset.images, load_image_dataset(generated).items]))
    assert distilled_generated.mixup_weights[:len(subset.images)].sum() == pytest.approx(0.5)


def test_the_mixed_half_is_drawn_from_the_pool_by_its_weights():
    pool = torch.arange(3, dtype=torch.uint8).mul(100).view(3, 1, 1, 1).expand(3, 1, 4, 4).contiguous()
    generator = torch.Generator().manual_seed(0)
    cpu = torch.device("cpu")
    drawn = pool_batch(pool, torch.tensor([0.0, 0.0, 1.0]), count=8, shift=0, flip=False, generator=generator, device=cpu)
    assert drawn.shape == (8, 1, 4, 4) and torch.allclose(drawn, torch.full_like(drawn, 200 / 127.5 - 1))
    uniform = pool_batch(pool, None, count=200, shift=0, flip=False, generator=generator, device=cpu)
    assert len(uniform[:, 0, 0, 0].unique()) == 3


def test_the_report_adds_the_curated_arms_and_measures_the_gain_over_the_best_arm_without_a_generator(
        tmp_path: Path, real: Path):
    images, kinds = novel_shapes(60)
    generated = write_generated_set(tmp_path / "gen", images, [KIND_NAMES[k] for k in kinds])
    curate(real, generated, tmp_path / "cur", labels="teacher", filter="none")
    report = evaluate(EvalArgs(real, generated, tmp_path / "report", num_images=30, classifier_steps=80, k=2,
                               curated_path=tmp_path / "cur" / "dataset.json", device="cpu",
                               downstream_config=DownstreamConfig(steps=30, batch_size=32, seeds=2)))
    # the feature classifier is the curation's teacher (the same recipe on the same images), kept beside the report
    assert report["classifier"]["reused"] and report["classifier"]["path"] == str(tmp_path / "cur" / TEACHER_FILE)
    teacher = load_artifact(tmp_path / "cur" / TEACHER_FILE)
    kept = load_artifact(tmp_path / "report" / "classifier.safetensors")
    assert kept.config == teacher.config and all(torch.equal(kept.tensors[k], v) for k, v in teacher.tensors.items())
    section = report["downstream"]
    assert list(section["arms"]) == ["generated", CURATED_ALONE, "real", SUBSET, DISTILLED,
                                     "real subset + generated", CURATED, DISTILLED_GENERATED]
    arms = section["arms"]
    baseline = max(arms[SUBSET]["accuracy"]["mean"], arms[DISTILLED]["accuracy"]["mean"])
    best = max(arms[name]["accuracy"]["mean"] for name in ("real subset + generated", CURATED, DISTILLED_GENERATED))
    assert section["gain_points"] == pytest.approx(100 * (best - baseline))
    assert section["cas_curated"] == arms[CURATED_ALONE]["accuracy"]["mean"]
    assert "curated images, curated labels" in (tmp_path / "report" / "report.md").read_text()


def choose_sampling(models: dict, out: Path, *flags):
    """choose_sampling.py on the tiny chain's generator and real data, writing into `out`."""
    return run_script("choose_sampling.py", "--config-path", models["generate_config"], "--decoder-path",
                      models["autoencoder"], "--real-path", models["dataset"], "--out-dir", out, *flags)


def test_the_sampling_choice_measures_each_setting_on_the_validation_split_and_writes_the_config(
        tmp_path: Path, models: dict):
    out = tmp_path / "sampling"
    result = choose_sampling(models, out, "--guidance", "1,2", "--images", 24, "--seeds", 1, "--steps", 10,
                             "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "sampling.json").read_text())
    assert [c["guidance_scale"] for c in summary["candidates"]] == [1.0, 2.0]
    best = max(summary["candidates"], key=lambda c: c["validation_accuracy"]["mean"])
    assert summary["chosen"] == {"guidance_scale": best["guidance_scale"], "temperature": 1.0}
    assert summary["fit_images"] + summary["validation_images"] == len(
        load_image_dataset(models["dataset"]).split(heldout=False))
    config = json.loads((out / "generate.json").read_text())
    assert all(level["guidance_scale"] == best["guidance_scale"] for level in config.values())
    generator = Generator.load(out / "generate.json", models["autoencoder"])  # its paths resolve from anywhere
    assert generator.levels[0].settings.guidance_scale == best["guidance_scale"]
    bad = choose_sampling(models, out, "--guidance", "1,x")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--guidance takes numbers" in bad.stderr


def test_the_sampling_choice_screens_a_large_grid_and_chooses_among_the_nearest_quarter(tmp_path: Path, models: dict):
    out = tmp_path / "screened"
    result = choose_sampling(models, out, "--guidance", "1,2", "--criterion", "fidelity", "--validation", "heldout",
                             "--vary", "1.temperature=1,0.3", "--vary", "0.top_p=1,0.5", "--images", 40, "--steps", 10,
                             "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "sampling.json").read_text())
    screening = summary["screening"]
    assert screening["images_per_setting"] == 10 and len(screening["candidates"]) == 8
    nearest = sorted(screening["candidates"], key=lambda c: c["frechet_distance"])[:2]
    keys = ("guidance_scale", "1.temperature", "0.top_p")
    assert sorted(tuple(c[k] for k in keys) for c in summary["candidates"]) == sorted(
        tuple(c[k] for k in keys) for c in nearest)
    assert all(c["images"] > 10 for c in summary["candidates"])
    best = min(summary["candidates"], key=lambda c: c["frechet_distance"])
    assert tuple(summary["chosen"][k] for k in keys) == tuple(best[k] for k in keys)


def test_the_sampling_choice_by_fidelity_tries_every_level_setting_and_keeps_the_nearest(tmp_path: Path, models: dict):
    out = tmp_path / "fidelity"
    result = choose_sampling(models, out, "--guidance", "1", "--criterion", "fidelity", "--validation", "heldout",
                             "--vary", "1.temperature=1,0.3", "--vary", "0.top_p=1,0.5", "--images", 24, "--steps", 10,
                             "--device", "cpu")
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "sampling.json").read_text())
    tried = [(c["1.temperature"], c["0.top_p"]) for c in summary["candidates"]]
    assert tried == [(1, 1), (1, 0.5), (0.3, 1), (0.3, 0.5)]
    best = min(summary["candidates"], key=lambda c: c["frechet_distance"])
    assert summary["chosen"] == {"guidance_scale": 1.0, "temperature": 1.0, "1.temperature": best["1.temperature"],
                                 "0.top_p": best["0.top_p"]}
    heldout = load_image_dataset(models["dataset"]).split(heldout=True)
    assert summary["validation_images"] == len(heldout) and "chosen: guidance 1" in result.stderr
    generator = Generator.load(out / "generate.json", models["autoencoder"])
    assert generator.levels[1].settings.temperature == best["1.temperature"]
    assert generator.levels[0].settings.top_p == best["0.top_p"] and generator.levels[0].settings.temperature == 1.0
    bad = choose_sampling(models, out, "--criterion", "fidelity", "--vary", "1.model_path=a,b")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "not a sampling setting" in bad.stderr
