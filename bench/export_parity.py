"""How closely a bundle's runner follows torch generation on a real run: for the same labels, condition
tokens and uniform numbers (each image's torch generator, replayed), the share of images whose tokens
are identical at every level, and the largest pixel difference of the images decoded from torch's tokens.

    python bench/export_parity.py --config-path runs/tiny32/generated_compressed/generate.json \
        --decoder-path runs/tiny32/compressed/autoencoder/autoencoder.safetensors --bundle runs/tiny32/export
"""
import json
import sys
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import numpy as np
import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.data import to_uint8  # noqa: E402
from core.model_artifacts import load_autoencoder  # noqa: E402
from core.models.sampling import generate_tokens  # noqa: E402
from core.generator import load_levels, parse_config  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


class ReplaySource:
    """The runner's random source, replaying each image's torch generator."""

    def __init__(self, seeds: list[int], count: int):
        self.streams = []
        for seed in seeds:
            generator = torch.Generator().manual_seed(seed)
            self.streams.append(iter(torch.rand(count, generator=generator).tolist()))

    def uniform(self, rows):
        return np.array([next(self.streams[r]) for r in rows], dtype=np.float32)


@app.command()
def main(config_path: Annotated[Path, typer.Option()], decoder_path: Annotated[Path, typer.Option()],
         bundle: Annotated[Path, typer.Option()], images: int = 64, temperature: float = -1.0) -> None:
    """temperature: -1 keeps the config's; 0 compares greedy decoding."""
    sys.path.insert(0, str(bundle))
    import runner
    torch.set_num_threads(1)
    levels = load_levels(parse_config(config_path), config_path)
    if temperature >= 0:
        for level in levels:
            level.settings = replace(level.settings, temperature=temperature)
    generator = runner.Generator(bundle, threads=1)
    shape = levels[0].model.shape
    labels = torch.arange(images) % max(1, shape.num_labels) if shape.num_labels else torch.full((images,), shape.null_label)
    counts = levels[0].cond_counts.float()
    cond = torch.stack([torch.multinomial(counts[label] + 1e-9, 1, generator=torch.Generator().manual_seed(i))
                        for i, label in enumerate(labels.tolist())])
    seeds = [1000 + i for i in range(images)]
    # torch.rand(1) per draw gives the same numbers as one torch.rand(count) call from the same seed
    source, generators = ReplaySource(seeds, 4096), [torch.Generator().manual_seed(s) for s in seeds]
    tokens, mine = cond, cond.numpy()
    same = np.ones(images, dtype=bool)
    for i, (level, mine_level) in enumerate(zip(levels, generator.levels)):
        with torch.no_grad():
            tokens = generate_tokens(level.model, labels, tokens, level.settings, generators)
        settings = {key: getattr(level.settings, key) for key in runner.SETTINGS}
        mine = runner.generate_tokens(mine_level, labels.numpy(), mine, settings, source)
        same &= (mine == tokens.numpy()).all(1)
        tokens, mine = tokens, tokens.numpy()  # the next level starts from torch's tokens in both
    decoder, _ = load_autoencoder(decoder_path)
    with torch.no_grad():
        expected = to_uint8(decoder.decoder(levels[-1].fine_book.lookup(tokens)).clamp(-1, 1)).numpy().astype(int)
    pixels = np.abs(generator.images(tokens.numpy()).astype(int) - expected)
    print(json.dumps({"images": images, "identical_tokens": float(same.mean()),
                      "max_pixel_difference": int(pixels.max()), "mean_pixel_difference": float(pixels.mean())}))


if __name__ == "__main__":
    app()
