"""Size on disk, peak memory and images/s of generation for the float32 models in torch, the compressed
models in torch (decoded to float32, and run with int8 weights) and the export bundle's runner (numpy and
onnxruntime, no torch), on one run folder made by `make demo` and `make export`.

Every measurement runs in a fresh process, so that its peak memory (RSS) is its own; each is repeated
and the best rate kept (the others are printed too), which is the fairest figure on a shared CPU.

    python bench/export.py --runs runs/tiny32 --bundle runs/tiny32/export --out runs/tiny32/bench_export.json
"""
import io
import json
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Annotated

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.memory import peak_rss_mb  # noqa: E402
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
KINDS = ("fp32 torch", "compressed torch", "int8 torch", "export")


def torch_speed(runs: Path, kind: str, images: int, batch: int, threads: int) -> dict:
    """images/s of generate_images.py's batches (the key/value cache on), and the bytes the models hold."""
    import torch
    from core.model_artifacts import load_transformer
    from core.generator import Generator
    torch.set_num_threads(threads)
    int8 = kind == "int8 torch"
    fp32 = kind == "fp32 torch"
    config = runs / ("generated" if fp32 else "generated_compressed") / "generate.json"
    decoder_path = runs / ("autoencoder/autoencoder.safetensors" if fp32 else "compressed/autoencoder/autoencoder.safetensors")
    generator = Generator.load(config, decoder_path, int8=int8)
    for level in generator.levels:  # loading runs compressed transformers in int8; decode them for "compressed torch"
        level.model = load_transformer(level.settings.model_path, int8=int8)[0]
    modules = [level.model for level in generator.levels] + [generator.decoder.decoder, generator.levels[-1].fine_book]
    model_bytes = sum(t.numel() * t.element_size() for m in modules for t in m.state_dict().values())
    generator.sample(range(batch), 0)  # warm-up
    start = time.perf_counter()
    for first in range(0, images, batch):
        generator.sample(range(first, min(images, first + batch)), 0)
    seconds = time.perf_counter() - start
    return {"images_per_s": round(images / seconds, 2), "model_bytes": model_bytes}


def export_speed(bundle: Path, images: int, batch: int, threads: int) -> dict:
    """images/s of the bundle's runner, in a process where torch cannot be imported."""
    sys.modules["torch"] = None  # the runner must not need it
    sys.path.insert(0, str(bundle))
    import numpy as np
    import runner
    generator = runner.Generator(bundle, threads)
    weight_bytes = sum(int(np.prod(spec["shape"])) * (1 if spec["dtype"] == "int8" else 4)
                       for spec in generator.manifest["weights"].values())
    generator.generate_batch(range(batch), 0)  # warm-up
    start = time.perf_counter()
    for first in range(0, images, batch):
        generator.generate_batch(range(first, min(images, first + batch)), 0)
    seconds = time.perf_counter() - start
    return {"images_per_s": round(images / seconds, 2), "model_bytes": weight_bytes}


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def tar_gz_bytes(folder: Path) -> int:
    """The bundle as one download: a tar.gz of its folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", compresslevel=9) as tar:
        tar.add(folder, arcname=folder.name)
    return len(buffer.getvalue())


def sizes(runs: Path, bundle: Path) -> dict:
    """Bytes on disk of what each way of generating needs."""
    config = json.loads((runs / "generated" / "generate.json").read_text())
    books = sorted({runs / level[key] for level in config.values() for key in ("lr_codebook_path", "hr_codebook_path")})
    fp32 = [runs / level["model_path"] for level in config.values()] + [runs / "autoencoder/autoencoder.safetensors"]
    compressed = [runs / level["model_path"].replace("transformers/", "compressed/", 1) for level in config.values()]
    compressed.append(runs / "compressed/autoencoder/autoencoder.safetensors")
    total = lambda paths: sum(p.stat().st_size for p in paths)  # noqa: E731
    figures = {"fp32 artifacts": total(fp32 + books), "compressed artifacts": total(compressed + books),
               "bundle folder": folder_bytes(bundle), "bundle tar.gz": tar_gz_bytes(bundle),
               "bundle weights": (bundle / "weights.safetensors").stat().st_size}
    figures["fp32 / bundle folder"] = round(figures["fp32 artifacts"] / figures["bundle folder"], 2)
    figures["fp32 / bundle tar.gz"] = round(figures["fp32 artifacts"] / figures["bundle tar.gz"], 2)
    return figures


def measure(kind: str, runs: Path, bundle: Path, images: int, batch: int, threads: int) -> dict:
    command = [sys.executable, __file__, "--one", kind, "--runs", str(runs), "--bundle", str(bundle),
               "--images", str(images), "--batch", str(batch), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


@app.command()
def main(runs: Annotated[Path, typer.Option(help="a run folder made by `make demo`")] = Path("runs/tiny32"),
         bundle: Annotated[Path, typer.Option(help="the compressed generator's bundle (make export)")] = Path("runs/tiny32/export"),
         out: Annotated[Path, typer.Option(help="where to write the JSON")] = Path("runs/tiny32/bench_export.json"),
         images: Annotated[int, typer.Option(help="images generated per measurement")] = 256,
         batch: Annotated[int, typer.Option(help="images per batch")] = 64,
         threads: Annotated[int, typer.Option(help="threads of torch and onnxruntime")] = 1,
         repeats: Annotated[int, typer.Option(help="measurements of each kind; the best rate is kept")] = 3,
         one: Annotated[str, typer.Option(help="internal: one measurement in this process")] = "") -> None:
    if one:
        result = export_speed(bundle, images, batch, threads) if one == "export" else \
            torch_speed(runs, one, images, batch, threads)
        print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))
        return
    figures = {"images": images, "batch": batch, "threads": threads, "sizes_bytes": sizes(runs, bundle), "runs": {}}
    print(json.dumps(figures["sizes_bytes"]), flush=True)
    for _ in range(repeats):  # kinds alternate, so that a busy spell of the machine hits each alike
        for kind in KINDS:
            result = measure(kind, runs, bundle, images, batch, threads)
            figures["runs"].setdefault(kind, []).append(result)
            print(kind, json.dumps(result), flush=True)
    best = {kind: max(results, key=lambda r: r["images_per_s"]) for kind, results in figures["runs"].items()}
    figures["best"] = best
    base = best["fp32 torch"]
    print(f"\n{'':18s} {'images/s':>9s} {'vs fp32':>8s} {'peak RSS MB':>12s} {'model MB':>9s}")
    for kind, row in best.items():
        print(f"{kind:18s} {row['images_per_s']:9.1f} {row['images_per_s'] / base['images_per_s']:7.2f}x "
              f"{row['peak_rss_mb']:12.0f} {row['model_bytes'] / 2 ** 20:9.2f}")
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
