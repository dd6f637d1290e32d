import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_dataset, run_script, write_shape_folder
from core.data import crop_to_content, load_image_dataset, read_records
from core.errors import PipelineError
from core.pictures import save_image_grid
from core.stages.dataset import read_idx


def test_build_from_folder(tmp_path, image_folder):
    out = tmp_path / "ds"
    counts = build_dataset(image_folder, out, size=8, channels=1, holdout=0.25, seed=0)
    assert counts["images"] == 72 and counts["skipped"] == 0 and counts["labels"] == 3
    assert 0 < counts["heldout"] < 36
    raw = json.loads((out / "dataset.json").read_text())
    first = raw["_default"]["1"]
    assert set(first) == {"image_fpath", "labels", "split", "source_size", "content_size"}
    assert first["labels"] == ["bar"] and first["source_size"] == [16, 16] and first["content_size"] == [8, 8]
    assert Image.open(out / first["image_fpath"]).size == (8, 8)
    data = load_image_dataset(out / "dataset.json")
    assert data.items.shape == (72, 1, 8, 8) and data.items.dtype == torch.uint8
    assert data.label_names == ["bar", "circle", "square"]
    assert int(data.is_heldout.sum()) == counts["heldout"]


def test_a_small_folder_holds_out_enough_images_for_the_report(tmp_path):
    """48 images at the default 10%: 10 held out (the report's k-NN metrics need more than 5), not about 5;
    a folder of 24 holds out a quarter; --holdout 0 still holds out none."""
    write_shape_folder(tmp_path / "shapes", 16)
    write_shape_folder(tmp_path / "few", 8)
    assert build_dataset(tmp_path / "shapes", tmp_path / "a", size=8)["heldout"] == 10
    assert build_dataset(tmp_path / "few", tmp_path / "b", size=8)["heldout"] == 6
    assert build_dataset(tmp_path / "shapes", tmp_path / "c", size=8, holdout=0.0)["heldout"] == 0


def test_a_train_count_that_leaves_nothing_held_out_is_one_line(tmp_path, image_folder):
    build_dataset(image_folder, tmp_path / "all", size=8, holdout=0.25)
    heldout = build_dataset(image_folder, tmp_path / "x", size=8, holdout=0.25)["heldout"]
    result = run_script("build_dataset.py", "--source", tmp_path / "all" / "dataset.json", "--from-split", "heldout",
                        "--train-count", heldout, "--size", 8, "--out-dir", tmp_path / "few")
    assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1
    assert f"{heldout} images of its heldout split; --train-count {heldout} would hold none out" in result.stderr
    assert not (tmp_path / "few" / "dataset.json").exists()


def test_build_rgb_and_limit(tmp_path, image_folder):
    out = tmp_path / "ds"
    build_dataset(image_folder, out, size=12, channels=3, limit=10, holdout=0.0, seed=0)
    data = load_image_dataset(out / "dataset.json")
    assert data.items.shape == (10, 3, 12, 12)


def test_build_from_idx(tmp_path, idx_folder):
    out = tmp_path / "ds"
    counts = build_dataset(idx_folder, out, size=32, channels=1, holdout=0.5, seed=0)
    assert counts == {"images": 50, "skipped": 0, "train": 40, "heldout": 10, "labels": 3, "channels": 1,
                      "captions": 0}
    data = load_image_dataset(out / "dataset.json")
    assert data.items.shape == (50, 1, 32, 32)
    assert data.labels.tolist()[:3] == [0, 1, 2]  # labels "0", "1", "2" keep their order


def test_a_28_pixel_idx_source_lands_padded_not_resampled(tmp_path, idx_folder):
    build_dataset(idx_folder, tmp_path / "ds", size=32, holdout=0.0)
    data = load_image_dataset(tmp_path / "ds" / "dataset.json")
    source = torch.from_numpy(read_idx(idx_folder / "train-images-idx3-ubyte.gz").copy())
    assert torch.equal(data.items[:40, 0, 2:30, 2:30], source)  # every source pixel, unchanged
    assert torch.equal(crop_to_content(data.items[:40], [28, 28])[:, 0], source)
    info = read_records(tmp_path / "ds" / "dataset.json")[1]
    assert info["fit"] == "pad" and info["source_size"] == info["content_size"] == [28, 28]


@pytest.mark.parametrize("width,height", [(20, 13), (9, 32), (32, 32)])
def test_pad_then_crop_gives_back_the_source_pixels(tmp_path, width, height):
    rng = np.random.default_rng(width)
    array = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    (tmp_path / "src").mkdir()
    Image.fromarray(array).save(tmp_path / "src" / "a.png")
    build_dataset(tmp_path / "src", tmp_path / "ds", size=32, holdout=0.0)
    info = read_records(tmp_path / "ds" / "dataset.json")[1]
    stored = load_image_dataset(tmp_path / "ds" / "dataset.json").items
    assert info["channels"] == 3 and info["content_size"] == [width, height]
    assert torch.equal(crop_to_content(stored, info["content_size"])[0], torch.from_numpy(array).permute(2, 0, 1))


def test_larger_images_are_letterboxed_cropped_or_resized(tmp_path):
    (tmp_path / "src").mkdir()
    Image.fromarray(np.full((40, 80), 200, np.uint8)).save(tmp_path / "src" / "wide.png")
    for fit, content in (("pad", [32, 16]), ("crop", [32, 32]), ("resize", [32, 32])):
        build_dataset(tmp_path / "src", tmp_path / fit, size=32, holdout=0.0, fit=fit)
        records, info = read_records(tmp_path / fit / "dataset.json")
        assert records[0]["source_size"] == [80, 40] and records[0]["content_size"] == content, fit
    with pytest.raises(PipelineError, match="--fit must be one of pad, crop, resize"):
        build_dataset(tmp_path / "src", tmp_path / "x", size=32, fit="stretch")


def test_transparency_lies_on_white_and_grey_sources_stay_grey(tmp_path):
    (tmp_path / "icons").mkdir()
    icon = np.zeros((8, 8, 4), np.uint8)
    icon[2:6, 2:6] = (255, 0, 0, 255)  # an opaque red square on a transparent ground
    Image.fromarray(icon, "RGBA").save(tmp_path / "icons" / "a.png")
    build_dataset(tmp_path / "icons", tmp_path / "ds", size=8, holdout=0.0)
    stored = load_image_dataset(tmp_path / "ds" / "dataset.json").items[0]
    assert stored[:, 0, 0].tolist() == [255, 255, 255] and stored[:, 3, 3].tolist() == [255, 0, 0]
    (tmp_path / "grey").mkdir()
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(tmp_path / "grey" / "a.png")  # RGB file, no colour
    assert build_dataset(tmp_path / "grey", tmp_path / "g", size=8, holdout=0.0)["channels"] == 1


def test_read_idx_matches_written(idx_folder):
    labels = read_idx(idx_folder / "train-labels-idx1-ubyte.gz")
    assert labels.shape == (40,) and labels.tolist()[:4] == [0, 1, 2, 0]
    images = read_idx(idx_folder / "train-images-idx3-ubyte.gz")
    assert images.shape == (40, 28, 28) and images.dtype == np.uint8


def test_truncated_idx_is_one_clear_error(tmp_path, idx_folder):
    path = idx_folder / "train-images-idx3-ubyte.gz"
    import gzip
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-100]))
    with pytest.raises(PipelineError, match="truncated idx data"):
        read_idx(path)


def test_refuses_to_overwrite(tmp_path, image_folder):
    out = tmp_path / "ds"
    build_dataset(image_folder, out, 8, channels=1, holdout=0.1, seed=0)
    with pytest.raises(PipelineError, match="already exists"):
        build_dataset(image_folder, out, 8, channels=1, holdout=0.1, seed=0)


def test_corrupt_image_skipped_or_refused(tmp_path, image_folder):
    (image_folder / "circle" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    out = tmp_path / "ds"
    result = run_script("build_dataset.py", "--source", image_folder, "--out-dir", out, "--size", 8)
    assert result.returncode == 0, result.stderr
    assert "1 skipped" in result.stderr and "72 images" in result.stderr
    strict_out = tmp_path / "strict"
    result = run_script("build_dataset.py", "--source", image_folder, "--out-dir", strict_out, "--strict")
    assert result.returncode == 2
    error = result.stderr.strip().splitlines()
    assert error[-1].startswith("error:") and "broken.png" in error[-1] and "Traceback" not in result.stderr
    assert not (strict_out / "dataset.json").exists()


def test_missing_source_is_one_line(tmp_path):
    result = run_script("build_dataset.py", "--source", tmp_path / "nothing", "--out-dir", tmp_path / "o")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"error: {tmp_path / 'nothing'}: no such file or folder"]


def test_grid_png(tmp_path):
    images = torch.linspace(-1, 1, 5 * 3 * 4 * 4).reshape(5, 3, 4, 4)
    save_image_grid(images, tmp_path / "g.png", columns=3)
    assert Image.open(tmp_path / "g.png").size == (3 * 6, 2 * 6)


def test_subset_of_a_dataset(tmp_path, idx_folder):
    full = tmp_path / "full"
    build_dataset(idx_folder, full, 16, channels=1, holdout=0.0, seed=0)
    subset = tmp_path / "subset"
    counts = build_dataset(full / "dataset.json", subset, 16, channels=1, holdout=0.0, seed=0, labels=["1"],
                           from_split="heldout", train_count=2)
    assert counts["images"] == 3 and counts["train"] == 2 and counts["heldout"] == 1  # test labels 1 at 1, 4, 7
    data = load_image_dataset(subset / "dataset.json")
    assert data.label_names == ["1"]
    with pytest.raises(PipelineError, match="no images labelled Dress"):
        build_dataset(full / "dataset.json", tmp_path / "x", 16, channels=1, holdout=0.0, seed=0, labels=["Dress"])


def test_excluded_labels_are_dropped_from_both_splits(tmp_path, idx_folder):
    counts = build_dataset(idx_folder, tmp_path / "rest", 16, channels=1, exclude_labels=["0", "2"])
    assert counts["labels"] == 1 and counts["images"] == 13 + 3  # label 1: 13 of 40 training, 3 of 10 test
    assert load_image_dataset(tmp_path / "rest" / "dataset.json").label_names == ["1"]
    result = run_script("build_dataset.py", "--source", idx_folder, "--out-dir", tmp_path / "typo", "--size", "16",
                        "--exclude-label", "Dres")
    assert result.returncode == 2 and result.stderr.strip().endswith("no images labelled Dres (labels: 0, 1, 2)")
    assert not (tmp_path / "typo").exists()
