"""Generation speed with and without the key/value cache, for the tiny preset's cascade transformer at
several sequence lengths. Each measurement runs in a fresh process so that its peak memory is its own.

    python bench/generation.py                # prints one JSON line per (length, cache) and a table
"""
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

import torch
import typer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from core.config import load_config  # noqa: E402
from core.models.sampling import DecodeSettings, generate_tokens  # noqa: E402
from core.models.transformer import TokenShape, TokenTransformer, TransformerConfig  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def measure(length: int, use_cache: bool, batch: int, device: str) -> dict:
    torch.manual_seed(0)
    cfg = load_config(TransformerConfig, ROOT / "configs" / "transformer_tiny_cascade.json")
    shape = TokenShape("cascade", coarse_vocab=512, fine_vocab=1024, coarse_len=max(1, length // 4), fine_len=length, num_labels=10)
    model = TokenTransformer(cfg, shape).to(device).eval()
    labels = torch.randint(0, 10, (batch,), device=device)
    coarse_tokens = torch.randint(0, 512, (batch, shape.coarse_len), device=device)
    generators = [torch.Generator().manual_seed(i) for i in range(batch)]
    settings = DecodeSettings(temperature=1.0)
    generate_tokens(model, labels[:2], coarse_tokens[:2], settings, generators[:2], use_cache)  # warm-up
    start = time.perf_counter()
    generate_tokens(model, labels, coarse_tokens, settings, generators, use_cache)
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    return {"length": length, "cache": use_cache, "batch": batch, "seconds": round(seconds, 3),
            "images_per_s": round(batch / seconds, 2), "tokens_per_s": round(batch * length / seconds, 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "parameters": sum(p.numel() for p in model.parameters())}


@app.command()
def main(lengths: Annotated[str, typer.Option(help="comma-separated sequence lengths")] = "16,64,256",
         batch: Annotated[int, typer.Option(help="images per batch (generate_images.py uses 64)")] = 64,
         device: str = "cpu",
         one: Annotated[str, typer.Option(help="internal: LENGTH:CACHE, measured in this process")] = "") -> None:
    if one:
        length, cache = one.split(":")
        print(json.dumps(measure(int(length), cache == "1", batch, device)))
        return
    rows = []
    for length in map(int, lengths.split(",")):
        for cache in (True, False):
            out = subprocess.run([sys.executable, __file__, "--one", f"{length}:{int(cache)}", "--batch", str(batch),
                                  "--device", device], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout))
            print(out.stdout.strip(), flush=True)
    print("\nlength  cache  images/s  tokens/s  peak RSS MB  speed-up")
    for cached, plain in zip(rows[::2], rows[1::2]):
        for row in (cached, plain):
            speedup = f"{cached['images_per_s'] / plain['images_per_s']:.1f}x" if row is cached else ""
            print(f"{row['length']:6d}  {str(row['cache']):5s}  {row['images_per_s']:8.2f}  {row['tokens_per_s']:8.0f}"
                  f"  {row['peak_rss_mb']:11.0f}  {speedup}")


if __name__ == "__main__":
    app()
