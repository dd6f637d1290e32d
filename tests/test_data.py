import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import build_dataset, run_script
from core.data import load_image_dataset
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
    assert set(first) == {"image_fpath", "labels", "split"} and first["labels"] == ["bar"]
    assert Image.open(out / first["image_fpath"]).size == (8, 8)
    data = load_image_dataset(out / "dataset.json")
    assert data.items.shape == (72, 1, 8, 8) and data.items.dtype == torch.uint8
    assert data.label_names == ["bar", "circle", "square"]
    assert int(data.is_heldout.sum()) == counts["heldout"]


def test_build_rgb_and_limit(tmp_path, image_folder):
    out = tmp_path / "ds"
    build_dataset(image_folder, out, size=12, channels=3, limit=10, holdout=0.0, seed=0)
    data = load_image_dataset(out / "dataset.json")
    assert data.items.shape == (10, 3, 12, 12)


def test_build_from_idx(tmp_path, idx_folder):
    out = tmp_path / "ds"
    counts = build_dataset(idx_folder, out, size=32, channels=1, holdout=0.5, seed=0)
    assert counts == {"images": 50, "skipped": 0, "train": 40, "heldout": 10, "labels": 3}
    data = load_image_dataset(out / "dataset.json")
    assert data.items.shape == (50, 1, 32, 32)
    assert data.labels.tolist()[:3] == [0, 1, 2]  # labels "0", "1", "2" keep their order


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
