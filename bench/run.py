"""`make bench`: one JSON of figures for a trained run folder (default runs/tiny32): training throughput
of each stage, generation images/s with and without the cache, peak memory, artifact sizes, and the
share of the machine's own matmul peak that the transformer stages and generation use.

Every measurement runs in a fresh process (its peak memory is its own); run it on an idle machine.

    python bench/run.py --runs runs/tiny32 --out runs/tiny32/bench.json
"""
import json
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
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def matmul_peak(device: torch.device, size: int = 2048, repeats: int = 10) -> float:
    """FLOP/s of a large float32 matmul: the machine's practical ceiling."""
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * size ** 3 * repeats / (time.perf_counter() - start)


def flops_per_sequence(model, training: bool) -> float:
    """Matmul FLOPs of one sequence: the encoder's weights act on the conditioning tokens, the rest on
    the predicted ones (2 per weight and token forward, 6 with the backward)."""
    encoder = sum(p.numel() for n, p in model.named_parameters() if n.startswith("encoder."))
    rest = sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder.") and "emb" not in n)
    per_weight = 6 if training else 2
    return per_weight * (encoder * (model.shape.coarse_len + 1) + rest * model.shape.fine_len)


def run_config(stage_dir: Path, work: Path) -> Path:
    """The config a stage of the benchmarked run trained with (its run.json), as a config file in `work`."""
    path = work / f"{stage_dir.name}.json"
    config = json.loads((stage_dir / "run.json").read_text())["config"]
    path.write_text(json.dumps(config.get("transformer", config)))  # a transformer's holds its shape beside it
    return path


def train_throughput(runs: Path, stage: str, steps: int, device: str) -> dict:
    """items/s (tokens/s for transformers) of `steps` training steps, from the stage's own metrics."""
    from core.stages import autoencoder, codebook, transformer
    from core.training import TrainOptions
    work = Path(tempfile.mkdtemp())
    options = TrainOptions(work / "run", device=device, batch_size=128 if stage == "codebook" else 64,
                           max_epoch=1000, max_steps=steps, checkpoint_step=10**9, log_every=steps)
    fmaps = runs / "fmaps" / "dataset.json"
    book = lambda name: runs / "pruned" / name / "codebook.safetensors"
    if stage == "autoencoder":
        autoencoder.run(autoencoder.AutoencoderArgs(dataset_path=runs / "data" / "dataset.json", options=options,
                                                    config_path=run_config(runs / "autoencoder", work),
                                                    eval_images=16))
    elif stage == "codebook":
        codebook.run(codebook.CodebookArgs(dataset_path=fmaps, options=options, eval_items=16,
                                           config_path=run_config(runs / "codebooks" / "l2", work)))
    else:
        base = stage == "base"
        transformer.run(transformer.TransformerArgs(
            dataset_path=fmaps, lr_codebook_path=book("cond" if base else "l1"),
            hr_codebook_path=book("l1" if base else "l2"), options=options, base=base, test_num_sample=0,
            config_path=run_config(runs / "transformers" / stage, work), eval_items=16))
    record = [json.loads(line) for line in (work / "run" / "metrics.jsonl").read_text().splitlines()
              if "items_per_s" in json.loads(line)][-1]
    return {"items_per_s": round(record["items_per_s"], 1)}


def generation_speed(runs: Path, models: str, use_cache: bool, images: int, device: str) -> dict:
    from core.generator import Generator
    config = runs / ("generated" if models == "fp32" else "generated_compressed") / "generate.json"
    generator = Generator.load(config, runs / "autoencoder" / "autoencoder.safetensors").to(torch.device(device))
    levels = generator.levels
    generator.sample(range(2), 0, use_cache)  # warm-up
    start = time.perf_counter()
    generator.sample(range(images), 0, use_cache)
    seconds = time.perf_counter() - start
    tokens = sum(level.model.shape.fine_len for level in levels) * images
    flops = sum(flops_per_sequence(level.model, training=False) for level in levels) * images
    return {"images_per_s": round(images / seconds, 2), "tokens_per_s": round(tokens / seconds, 1),
            "model_flops_per_s": flops / seconds}


def run_one(kind: str, runs: Path, device: str) -> dict:
    """One measurement in this process."""
    name, _, option = kind.partition(":")
    if name == "train":
        result = train_throughput(runs, option, 40 if option != "codebook" else 100, device)
    else:
        models, cache = option.split(",")
        result = generation_speed(runs, models, cache == "cache", 32, device)
    result["peak_rss_mb"] = peak_rss_mb()
    if device == "cuda":
        result["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2 ** 20, 1)
    return result


@app.command()
def main(runs: Annotated[Path, typer.Option(help="a run folder made by `make demo`")] = Path("runs/tiny32"),
         out: Annotated[Path, typer.Option(help="where to write the JSON")] = Path("runs/tiny32/bench.json"),
         device: str = "cpu", one: Annotated[str, typer.Option(help="internal: one measurement")] = "") -> None:
    if one:
        print(json.dumps(run_one(one, runs, device)))
        return
    peak = matmul_peak(torch.device(device))
    figures: dict = {"device": device, "threads": torch.get_num_threads(), "matmul_peak_flops": peak,
                     "train": {}, "generate": {}, "artifacts_bytes": {}}
    kinds = [f"train:{s}" for s in ("autoencoder", "codebook", "base", "cascade")]
    kinds += [f"generate:{m},{c}" for m in ("fp32", "compressed") for c in ("cache", "nocache")
              if m == "fp32" or (runs / "generated_compressed" / "generate.json").exists()]
    for kind in kinds:
        done = subprocess.run([sys.executable, __file__, "--one", kind, "--runs", str(runs), "--device", device],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise SystemExit(f"{kind} failed:\n{done.stderr[-2000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        name, _, option = kind.partition(":")
        if name == "train" and option in ("base", "cascade"):
            from core.model_artifacts import load_transformer
            model, _ = load_transformer(runs / "transformers" / option / "model.safetensors")
            sequences_per_s = result["items_per_s"] / model.shape.fine_len
            result["model_flops_per_s"] = flops_per_sequence(model, training=True) * sequences_per_s
        if "model_flops_per_s" in result:
            result["share_of_matmul_peak"] = round(result["model_flops_per_s"] / peak, 4)
        figures[name][option] = result
        print(kind, json.dumps(result), flush=True)
    for path in sorted(runs.rglob("*.safetensors")):
        if "shards" not in path.parts and path.name != "checkpoint.safetensors":
            figures["artifacts_bytes"][str(path.relative_to(runs))] = path.stat().st_size
    out.write_text(json.dumps(figures, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    app()
