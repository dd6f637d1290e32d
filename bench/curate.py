"""Curation at scale: curate_images.py's stage on generated sets of growing size (records pointing at a pool
of 1,000 PNG files, as many labels as a small real set of 16x16 images), each in a fresh process: wall time,
peak memory and the memory per image, so that a million-image set is seen to stream (the images in batches,
a few numbers per image in memory).

    python bench/curate.py --sizes 100000,1000000 --threads 1
"""
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.memory import peak_rss_mb  # noqa: E402
from core.data import write_records  # noqa: E402
from core.stages.curate import CurateArgs, run  # noqa: E402
from core.stages.dataset import DatasetArgs, run as build_dataset  # noqa: E402

NAMES = ["a", "b", "c"]
POOL = 1000


def picture(label: int, rng: np.random.Generator) -> np.ndarray:
    """A 16x16 grey image: a bright block whose place says its class, with noise."""
    image = rng.integers(0, 40, (16, 16)).astype(np.uint8)
    image[2 + 4 * label:6 + 4 * label, 4:12] = 200
    return image


def make_sets(folder: Path, images: int) -> tuple[Path, Path]:
    """A real labelled set (60 per class) and a generated set of `images` records over a pool of files."""
    rng = np.random.default_rng(0)
    for c, name in enumerate(NAMES):
        (folder / "source" / name).mkdir(parents=True, exist_ok=True)
        for i in range(60):
            Image.fromarray(picture(c, rng)).save(folder / "source" / name / f"{i}.png")
    build_dataset(DatasetArgs(source=folder / "source", out_dir=folder / "real", size=16, channels=1, holdout=0.2))
    (folder / "gen" / "images").mkdir(parents=True, exist_ok=True)
    for i in range(POOL):
        Image.fromarray(picture(i % 3, rng)).save(folder / "gen" / "images" / f"{i:04d}.png")
    records = ({"image_fpath": f"images/{i % POOL:04d}.png", "labels": [NAMES[i % 3]], "index": i}
               for i in range(images))
    write_records(folder / "gen" / "dataset.json", records, {"kind": "generated", "images": images})
    return folder / "real" / "dataset.json", folder / "gen" / "dataset.json"


def one(images: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        real, generated = make_sets(Path(tmp), images)
        before = peak_rss_mb()
        start = time.perf_counter()
        summary = run(CurateArgs(real_path=real, generated_path=generated, out_dir=Path(tmp) / "cur", labels="asked",
                                 filter="none", teacher_steps=50, folder=False, device="cpu"))
        return {"images": images, "seconds": round(time.perf_counter() - start, 1), "kept": summary["kept"],
                "peak_rss_mb": peak_rss_mb(), "rss_before_mb": before}


def main(sizes: Annotated[str, typer.Option(help="generated set sizes, comma-separated")] = "100000,1000000",
         threads: int = 1, one_size: Annotated[int, typer.Option(hidden=True)] = 0) -> None:
    if one_size:
        print(json.dumps(one(one_size, threads)))
        return
    rows = []
    for size in (int(s) for s in sizes.split(",")):
        done = subprocess.run([sys.executable, __file__, "--one-size", str(size), "--threads", str(threads)],
                              capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{rows[-1]['images']:>9,} images: {rows[-1]['seconds']:7.1f} s, peak {rows[-1]['peak_rss_mb']:7.0f} MB "
              f"(before curation {rows[-1]['rss_before_mb']:.0f} MB)", flush=True)
    if len(rows) > 1:
        first, last = rows[0], rows[-1]
        per_image = (last["peak_rss_mb"] - first["peak_rss_mb"]) * 1e6 / (last["images"] - first["images"])
        print(f"memory per image beyond the first set: {per_image:.0f} bytes")


if __name__ == "__main__":
    typer.run(main)
