"""Generation at scale, on a run folder made by `make demo` (its generate.json and autoencoder):

- speed: the whole chain (tokens, decoder, images written, dataset.json) at several batch sizes, as the
  marginal cost of an image over a run's start-up: (T(n2) - T(n1)) / (n2 - n1) for two runs of n1 < n2
  images. Images/s, and the share of the machine's matmul peak (bench/run.py's, measured here with the
  same threads) that the transformers' FLOPs (as bench/run.py counts them) and the whole chain's
  (transformers and decoder) make. Beside the wall time, the same from CPU time (all threads, the
  image writer's included) against the matmul's FLOPs per CPU second: on a machine shared with other
  work, that one moves much less;
- profile (--profile B): where one batch's time goes, by kind of operation (torch's profiler), beside the
  PNG encoding and writing that the background thread does;
- scale: runs of many images (10,000 and 100,000): wall time, peak memory, dataset.json's size, and
  1,000,000 images extrapolated from them.

Each run is a fresh process running generate_images.py's stage, so that its peak memory is its own. Run
it on an idle machine.

    python bench/generation.py --runs runs/tiny32 --out runs/tiny32/bench_generation.json
    python bench/generation.py --runs runs/tiny32 --batches 64 --scale 10000,100000 --threads 1
    python bench/generation.py --runs runs/tiny32 --profile 64 --threads 1
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.memory import peak_rss_mb  # noqa: E402
from bench.run import flops_per_sequence, matmul_peak  # noqa: E402
from core.data import to_uint8  # noqa: E402
from core.generator import Generator  # noqa: E402
from core.stages.generate import GenerateArgs, image_file, run  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def decoder_flops(decoder: torch.nn.Module, latent_shape: tuple[int, int, int]) -> float:
    """Multiply-add FLOPs (2 per MAC) of the decoder's convolutions and linear layers for one image."""
    total = 0.0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += 2 * output.numel() * module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
        elif isinstance(module, torch.nn.Linear):
            total += 2 * output.numel() * module.in_features

    hooks = [m.register_forward_hook(count) for m in decoder.modules()]
    with torch.no_grad():
        decoder(torch.zeros(1, *latent_shape))
    for hook in hooks:
        hook.remove()
    return total


def chain_flops(runs: Path) -> dict:
    """FLOPs per image: the transformers' (bench/run.py's count) and the decoder's."""
    generator = Generator.load(runs / "generated" / "generate.json", runs / "autoencoder" / "autoencoder.safetensors")
    levels, autoencoder = generator.levels, generator.decoder
    book = levels[-1].fine_book.cfg
    transformers = sum(flops_per_sequence(level.model, training=False) for level in levels)
    return {"transformers": transformers, "decoder": decoder_flops(autoencoder.decoder, book.fmap_shape)}


def matmul_peak_per_cpu_second(size: int = 2048, repeats: int = 10) -> float:
    """bench/run.py's matmul peak, per second of this process's CPU time (all threads)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.process_time()
    for _ in range(repeats):
        a @ b
    return 2 * size ** 3 * repeats / (time.process_time() - start)


def one_run(runs: Path, images: int, batch: int, device: str, out_dir: Path) -> dict:
    """One generation run in this process: the stage's wall and CPU time, peak memory and output sizes."""
    start, cpu_start = time.perf_counter(), time.process_time()
    run(GenerateArgs(config_path=runs / "generated" / "generate.json", decoder_path=runs / "autoencoder" / "autoencoder.safetensors",
                     out_dir=out_dir, num_images=images, seed=0, batch_size=batch, device=device))
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    dataset_bytes = sum(p.stat().st_size for p in out_dir.glob("dataset*.json"))
    return {"images": images, "batch": batch, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
            "dataset_json_bytes": dataset_bytes, "peak_rss_mb": peak_rss_mb()}


def in_child(runs: Path, images: int, batch: int, device: str, threads: int) -> dict:
    """one_run in a fresh process, in a fresh out dir (deleted after)."""
    out_dir = Path(tempfile.mkdtemp(prefix="bench-gen-", dir=runs))
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    try:
        done = subprocess.run([sys.executable, __file__, "--one", f"{images},{batch},{out_dir}", "--runs", str(runs),
                               "--device", device], capture_output=True, text=True, env=env)
        if done.returncode != 0:
            raise SystemExit(f"run of {images} images failed:\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)


def speed_row(runs: Path, batch: int, device: str, threads: int, flops: dict, peak: float, cpu_peak: float) -> dict:
    small, large = (8, 48) if batch == 1 else (2 * batch, 10 * batch)
    first, second = (in_child(runs, n, batch, device, threads) for n in (small, large))
    per_image = (second["seconds"] - first["seconds"]) / (large - small)
    cpu_per_image = (second["cpu_seconds"] - first["cpu_seconds"]) / (large - small)
    chain = flops["transformers"] + flops["decoder"]
    return {"batch": batch, "ms_per_image": round(per_image * 1e3, 3), "images_per_s": round(1 / per_image, 1),
            "share_transformers": round(flops["transformers"] / per_image / peak, 3),
            "share_chain": round(chain / per_image / peak, 3),
            "cpu_ms_per_image": round(cpu_per_image * 1e3, 3), "share_chain_cpu": round(chain / cpu_per_image / cpu_peak, 3),
            "startup_s": round(first["seconds"] - small * per_image, 2), "peak_rss_mb": second["peak_rss_mb"]}


# torch operations by what they do in the chain (self CPU time); the rest of the wall time is Python
KINDS = {"matmul (linear layers)": ("aten::addmm", "aten::mm", "aten::bmm"),
         "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu", "aten::_scaled_dot_product_attention_math",
                       "aten::_scaled_dot_product_efficient_attention", "aten::_scaled_dot_product_flash_attention"),
         "decoder convolutions": ("aten::mkldnn_convolution", "aten::convolution", "aten::_convolution",
                                  "aten::upsample_nearest2d", "aten::cudnn_convolution"),
         "cache and tensor copies": ("aten::copy_", "aten::cat", "aten::index", "aten::index_select"),
         "sampling (softmax, sort, cumsum, search)": ("aten::_softmax", "aten::sort", "aten::cumsum", "aten::searchsorted",
                                                      "aten::topk", "aten::_log_softmax", "aten::multinomial",
                                                      "aten::rand", "aten::uniform_", "aten::masked_fill_", "aten::scatter")}


def profile_batch(runs: Path, batch: int, device: str) -> dict:
    """Seconds of one batch by kind of work: torch operations grouped by KINDS, the Python between them,
    and the PNG encoding of its images (done by the background thread in a run)."""
    from torch.profiler import ProfilerActivity, profile

    generator = Generator.load(runs / "generated" / "generate.json", runs / "autoencoder" / "autoencoder.safetensors")
    generator.to(torch.device(device))
    generator.sample(range(batch), 0)  # warm-up
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        images, _ = generator.sample(range(batch, 2 * batch), 0)
        wall = time.perf_counter() - start
    seconds = {kind: 0.0 for kind in KINDS}
    other_ops = 0.0
    for event in prof.key_averages():
        kind = next((k for k, names in KINDS.items() if event.key in names), None)
        if kind is None:
            other_ops += event.self_cpu_time_total / 1e6
        else:
            seconds[kind] += event.self_cpu_time_total / 1e6
    seconds["other torch operations"] = other_ops
    seconds["Python and dispatch"] = max(0.0, wall - sum(seconds.values()))
    start = time.perf_counter()
    for image in to_uint8(images):
        image_file(image, "png")
    seconds["PNG encoding (background thread)"] = time.perf_counter() - start
    return {"batch": batch, "wall_s": wall, "ms_per_image": {k: round(v / batch * 1e3, 3) for k, v in seconds.items()}}


@app.command()
def main(runs: Annotated[Path, typer.Option(help="a run folder made by `make demo`")] = Path("runs/tiny32"),
         out: Annotated[Path, typer.Option(help="where to write the JSON")] = Path("runs/tiny32/bench_generation.json"),
         device: str = "cpu",
         batches: Annotated[str, typer.Option(help="batch sizes of the speed table (empty: none)")] = "1,16,64,256",
         scale: Annotated[str, typer.Option(help="image counts of the scale runs (empty: none)")] = "10000,100000",
         scale_batch: Annotated[int, typer.Option(help="batch size of the scale runs")] = 256,
         threads: Annotated[int, typer.Option(help="OMP_NUM_THREADS of the runs (0: torch's default)")] = 0,
         profile: Annotated[int, typer.Option(help="only profile one batch of this size")] = 0,
         one: Annotated[str, typer.Option(help="internal: IMAGES,BATCH,OUT_DIR, run in this process")] = "") -> None:
    if profile:
        if threads:
            torch.set_num_threads(threads)
        result = profile_batch(runs, profile, device)
        total = sum(result["ms_per_image"].values())
        print(f"one batch of {profile}: {result['wall_s']:.2f} s; per image:")
        for kind, ms in sorted(result["ms_per_image"].items(), key=lambda item: -item[1]):
            print(f"  {kind:42s} {ms:7.3f} ms  {ms / total:6.1%}")
        return
    if one:
        images, batch, out_dir = one.split(",", 2)
        print(json.dumps(one_run(runs, int(images), int(batch), device, Path(out_dir))))
        return
    if threads:
        torch.set_num_threads(threads)
    peak = matmul_peak(torch.device(device))
    cpu_peak = matmul_peak_per_cpu_second() if device == "cpu" else float("nan")
    flops = chain_flops(runs)
    figures = {"device": device, "threads": torch.get_num_threads(), "matmul_peak_flops": peak,
               "matmul_peak_flops_per_cpu_s": cpu_peak, "flops_per_image": flops, "speed": [], "scale": []}
    print(f"matmul peak {peak / 1e9:.1f} GFLOP/s, {cpu_peak / 1e9:.1f} per CPU second ({figures['threads']} threads); "
          f"per image: transformers {flops['transformers'] / 1e6:.1f} MFLOP, decoder {flops['decoder'] / 1e6:.1f} MFLOP",
          flush=True)
    print("batch  ms/image  images/s  share (transformers)  share (chain)  CPU ms/image  share (chain, CPU)  "
          "start-up s  peak RSS MB", flush=True)
    for batch in [int(b) for b in batches.split(",") if b]:
        row = speed_row(runs, batch, device, threads, flops, peak, cpu_peak)
        figures["speed"].append(row)
        print(f"{row['batch']:5d}  {row['ms_per_image']:8.2f}  {row['images_per_s']:8.1f}  "
              f"{row['share_transformers']:20.1%}  {row['share_chain']:13.1%}  {row['cpu_ms_per_image']:12.2f}  "
              f"{row['share_chain_cpu']:18.1%}  {row['startup_s']:10.1f}  {row['peak_rss_mb']:11.0f}", flush=True)
    counts = [int(n) for n in scale.split(",") if n]
    if counts:
        print("images  batch  wall s  ms/image  CPU ms/image  peak RSS MB  dataset.json MB  bytes/record", flush=True)
    for count in counts:
        row = in_child(runs, count, scale_batch, device, threads)
        row["bytes_per_record"] = round(row["dataset_json_bytes"] / count, 1)
        figures["scale"].append(row)
        print(f"{count:6d}  {scale_batch:5d}  {row['seconds']:6.1f}  {row['seconds'] / count * 1e3:8.2f}  "
              f"{row['cpu_seconds'] / count * 1e3:12.2f}  "
              f"{row['peak_rss_mb']:11.0f}  {row['dataset_json_bytes'] / 1e6:15.1f}  {row['bytes_per_record']:12.1f}",
              flush=True)
    if len(figures["scale"]) >= 2:  # a straight line through the two largest runs
        a, b = figures["scale"][-2:]
        slope = (b["seconds"] - a["seconds"]) / (b["images"] - a["images"])
        figures["extrapolated_1m_s"] = round(b["seconds"] + slope * (1_000_000 - b["images"]), 1)
        print(f"1,000,000 images, extrapolated: {figures['extrapolated_1m_s'] / 3600:.2f} h "
              f"({slope * 1e3:.2f} ms per image between {a['images']} and {b['images']})")
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
