"""Small data the tests make themselves, and a helper to run the stage scripts as a user would."""
from __future__ import annotations

import gzip
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from core.stages import autoencoder, codebook, fmaps, transformer  # noqa: E402 (after the path is set)
from core.training import PAUSE_ENV  # noqa: E402
from core.data import write_dataset_json  # noqa: E402
from core.stages.dataset import DatasetArgs, run as run_build  # noqa: E402
from core.training import TrainOptions  # noqa: E402
from core.models.sampling import DecodeState  # noqa: E402
from core.models.transformer import TokenShape, TokenTransformer, TransformerConfig  # noqa: E402

def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "slow: the slow tier (end-to-end make, the seed's examples, multi-node, "
                                       "kill-and-resume), run by make test-all")


TINY_AE = {"min_channel": 4, "max_channel": 8, "num_layers": 1, "latent_channel": 2, "warmup_steps": 5,
           "model_lr": 0.005}


def options(out_dir: Path, **overrides) -> TrainOptions:
    """Training options for an in-process stage run on the CPU."""
    return TrainOptions(out_dir=out_dir, **{"device": "cpu", "checkpoint_step": 1000, **overrides})


def build_dataset(source: Path, out_dir: Path, size: int = 16, **overrides) -> dict:
    """build_dataset.py's stage, in-process: grayscale, 10% held out, unless told otherwise."""
    return run_build(DatasetArgs(source=source, out_dir=out_dir, size=size, **overrides))


def script_env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0", COLUMNS="200")
    return env


def run_script(script: str, *args: str, timeout: float = 300, **popen) -> subprocess.CompletedProcess:
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=script_env(), cwd=ROOT)


def start_script(script: str, *args: str, pause_at: int | None = None) -> subprocess.Popen:
    """The script running in the background; with `pause_at`, it stops itself at that step or batch
    (core.training.pause_point), for wait_paused."""
    command = [sys.executable, str(ROOT / script), *map(str, args)]
    env = script_env() if pause_at is None else {**script_env(), PAUSE_ENV: str(pause_at)}
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def wait_paused(proc: subprocess.Popen, timeout: float = 180) -> None:
    """Wait until a script started with `pause_at` has stopped itself there."""
    deadline = time.time() + timeout
    while Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "T":
        assert proc.poll() is None, proc.communicate()
        assert time.time() < deadline, "the script did not reach its pause point"
        time.sleep(0.02)


def interrupt_paused(proc: subprocess.Popen, sig: int = signal.SIGINT) -> tuple[str, str]:
    """Send `sig` to a paused script, let it go on to handle it, and wait for its exit."""
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    return proc.communicate(timeout=120)


def shape_image(kind: int, variant: int, size: int = 16) -> np.ndarray:
    """A grayscale picture of one of three shapes (a class), jittered by `variant`."""
    rng = np.random.default_rng(variant)
    y, x = np.mgrid[0:size, 0:size]
    cy, cx = size / 2 + rng.uniform(-2, 2), size / 2 + rng.uniform(-2, 2)
    r = size / 4 + rng.uniform(-1, 1)
    if kind == 0:
        mask = (y - cy) ** 2 + (x - cx) ** 2 < r ** 2
    elif kind == 1:
        mask = (abs(y - cy) < r) & (abs(x - cx) < r)
    else:
        mask = abs(x - cx) < r / 3
    return (mask * (180 + rng.integers(0, 60)) + rng.integers(0, 20, (size, size))).clip(0, 255).astype(np.uint8)


SHAPES = {"circle": 0, "square": 1, "bar": 2}


def write_shape_folder(folder: Path, per_label: int, labels: dict[str, int] = SHAPES, seed: int = 0) -> Path:
    """A labelled sub-folder of `per_label` 16x16 PNGs for each label, drawn as the shape `labels` gives it
    (by default circle, square and bar); another `seed` draws other variants."""
    for name, kind in labels.items():
        (folder / name).mkdir(parents=True)
        for i in range(per_label):
            Image.fromarray(shape_image(kind, seed + kind * 1000 + i)).save(folder / name / f"{i:03d}.png")
    return folder


def write_colour_folder(folder: Path, count: int) -> Path:
    """One flat folder (no labels) of `count` 16x16 colour PNGs: the three shapes, each in a colour."""
    folder.mkdir(parents=True)
    colours = np.array([[220, 40, 40], [40, 160, 60], [50, 80, 220]], dtype=np.float32) / 255
    for i in range(count):
        grey = shape_image(i % 3, 5000 + i).astype(np.float32)
        rgb = grey[..., None] * colours[(i // 3) % 3]
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(folder / f"{i:03d}.png")
    return folder


def write_generated_set(folder: Path, images: list[np.ndarray], labels: list[str | None]) -> Path:
    """A generated dataset.json (as generate_images.py lays it out) of these images and asked labels."""
    (folder / "images").mkdir(parents=True)
    records = []
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image).save(folder / "images" / f"{i:06d}.png")
        records.append({"image_fpath": f"images/{i:06d}.png", "labels": [label] if label else [], "index": i})
    write_dataset_json(folder / "dataset.json", records, {"kind": "generated", "images": len(records)},
                       {"runs": [{"stage": "test"}]})
    return folder / "dataset.json"


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """Three labelled sub-folders of 24 PNGs each."""
    return write_shape_folder(tmp_path / "shapes", 24)


def write_idx(path: Path, array: np.ndarray) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def idx_folder(tmp_path: Path) -> Path:
    """MNIST-format files: 40 training and 10 test images of 28x28 with labels."""
    folder = tmp_path / "idx"
    folder.mkdir()
    for prefix, count in (("train", 40), ("t10k", 10)):
        labels = np.arange(count) % 3
        images = np.stack([shape_image(int(k), i, 28) for i, k in enumerate(labels)])
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder


@pytest.fixture
def tiny_dataset(tmp_path: Path, image_folder: Path) -> Path:
    """dataset.json of the shapes at 16x16, 10% held out."""
    out = tmp_path / "data"
    build_dataset(image_folder, out, size=16, holdout=0.15)
    return out / "dataset.json"


@pytest.fixture
def tiny_ae_config(tmp_path: Path) -> Path:
    path = tmp_path / "ae.json"
    path.write_text(json.dumps(TINY_AE))
    return path


@pytest.fixture(scope="session")
def pipeline(tmp_path_factory) -> dict:
    """The chain up to codebooks on the shapes dataset, made once per test session (in-process):
    16x16 images -> (2, 8, 8) feature maps -> codebooks for the whole map (1 token), 4x4 patches
    (4 tokens) and 2x2 patches (16 tokens)."""
    root = tmp_path_factory.mktemp("pipeline")
    folder = write_shape_folder(root / "shapes", 24)
    build_dataset(folder, root / "data", 16, holdout=0.15)
    ae_config = root / "ae.json"
    ae_config.write_text(json.dumps(TINY_AE))
    ae = autoencoder.run(autoencoder.AutoencoderArgs(
        dataset_path=root / "data" / "dataset.json", config_path=ae_config,
        options=options(root / "ae", batch_size=8, max_epoch=100, max_steps=60)))
    fmaps.run(fmaps.FmapArgs(dataset_path=root / "data" / "dataset.json", model_path=ae, out_dir=root / "fmaps",
                             device="cpu", batch_size=32, shard_size=1000))
    paths = {"root": root, "dataset": root / "data" / "dataset.json", "autoencoder": ae,
             "fmaps": root / "fmaps" / "dataset.json"}
    for name, patch, units in (("cond", 8, 8), ("l1", 4, 16), ("l2", 2, 32)):
        config = root / f"cb_{name}.json"
        config.write_text(json.dumps({"image_H": 8, "image_W": 8, "image_C": 2, "patch_H": patch, "patch_W": patch,
                                      "num_embeddings": units, "model_lr": 0.01}))
        paths[name] = codebook.run(codebook.CodebookArgs(dataset_path=paths["fmaps"], config_path=config,
                                   options=options(root / f"cb_{name}", batch_size=8, max_epoch=100, max_steps=30)))
    return paths


@pytest.fixture(scope="session")
def models(pipeline) -> dict:
    """A base (cond -> l1) and a cascade (l1 -> l2) transformer trained briefly on the pipeline's tokens,
    and a generation config naming them."""
    root = pipeline["root"]
    config = root / "tf.json"
    config.write_text(json.dumps({"in_dim": 32, "hidden_dim": 64, "num_dec_layers": 2, "num_enc_layers": 1,
                                  "self_attn_heads": 2, "cross_attn_heads": 2, "model_lr": 0.003, "warmup_steps": 5}))
    paths = dict(pipeline)
    for name, base, lr, hr in (("base", True, "cond", "l1"), ("cascade", False, "l1", "l2")):
        paths[name] = transformer.run(transformer.TransformerArgs(
            dataset_path=pipeline["fmaps"], lr_codebook_path=pipeline[lr], hr_codebook_path=pipeline[hr],
            config_path=config, base=base, test_num_sample=0,
            options=options(root / name, batch_size=8, max_epoch=100, max_steps=40)))
    levels = {"0": {"model_path": str(paths["base"]), "lr_codebook_path": str(pipeline["cond"]),
                    "hr_codebook_path": str(pipeline["l1"]), "temperature": 1.0},
              "1": {"model_path": str(paths["cascade"]), "lr_codebook_path": str(pipeline["l1"]),
                    "hr_codebook_path": str(pipeline["l2"]), "temperature": 0.8, "top_k": 8}}
    paths["generate_config"] = root / "generate.json"
    paths["generate_config"].write_text(json.dumps(levels))
    return paths


# ---------------------------------------------------------------- helpers shared by test modules

SMALL_TRANSFORMER = dict(in_dim=32, hidden_dim=64, num_dec_layers=2, num_enc_layers=2, self_attn_heads=4,
                         cross_attn_heads=2)


def small_transformer(kind, fine_len=12, window=None, **overrides):
    """A small TokenTransformer of random weights (seed 0), in eval mode."""
    cfg = TransformerConfig(**{**SMALL_TRANSFORMER, **overrides}, use_sliding_window=window is not None,
                            sliding_window=window or 256)
    shape = TokenShape(kind, coarse_vocab=5, fine_vocab=7, coarse_len=1 if kind == "base" else 4, fine_len=fine_len,
                       num_labels=3)
    torch.manual_seed(0)
    return TokenTransformer(cfg, shape).eval()


def random_inputs(model, batch=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = model.shape
    return (torch.randint(0, shape.num_labels + 1, (batch,), generator=g),
            torch.randint(0, shape.coarse_vocab, (batch, shape.coarse_len), generator=g),
            torch.randint(0, shape.fine_vocab, (batch, shape.fine_len), generator=g))


def teacher_forced(model, labels, lr, hr, use_cache, scale=1.0, text=None):
    """Logits at every position from the DecodeState, fed the given tokens (and caption ids)."""
    dec = DecodeState(model, labels, lr, scale, use_cache, text=text)
    rows = []
    for p in range(hr.shape[1]):
        rows.append(dec.logits_at(p))
        dec.set(p, hr[:, p])
    return torch.stack(rows, 1)


def generate_cli(models, out, *extra, config=None, decoder=None):
    return run_script("generate_images.py", "--config-path", config or models["generate_config"], "--decoder-path",
                      decoder or models["autoencoder"], "--out-dir", out, "--device", "cpu", *map(str, extra))


def generated_files(out):
    """Every image's bytes and the dataset.json, by path relative to the out dir."""
    paths = sorted(out.glob("images/*/*.png")) + [out / "dataset.json"]
    return {str(p.relative_to(out)): p.read_bytes() for p in paths}
