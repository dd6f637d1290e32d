"""Seconds per training step of the tiny preset's models (the autoencoder at 32 px, the base and cascade
transformers on Fashion-MNIST's token shapes) in float32 and in bfloat16 autocast, on this CPU, with the
trainer's optimizer; random data, since the figure is the step's cost and not what it learns. Says whether
--precision auto trains in bfloat16 here.

    python bench/precision.py [--threads 1] [--steps 20] [--batch 64]
"""
import dataclasses
import sys
import time
from pathlib import Path
from typing import Annotated, Callable

import torch
import torch.nn.functional as F
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.config import load_config  # noqa: E402
from core.models.autoencoder import Autoencoder, AutoencoderConfig, reconstruction_loss  # noqa: E402
from core.models.transformer import TokenShape, TokenTransformer, TransformerConfig  # noqa: E402
from core.training import native_bfloat16  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
PRESET = ROOT / "configs" / "tiny32"


def autoencoder_step(batch: int) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]:
    cfg = dataclasses.replace(load_config(AutoencoderConfig, PRESET / "autoencoder.json"), image_channel=1,
                              latent_channel=4)
    images = torch.rand(batch, 1, 32, 32) * 2 - 1
    return Autoencoder(cfg), lambda model: reconstruction_loss(cfg, model(images).float(), images)


def transformer_step(kind: str, batch: int) -> tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]:
    cfg = load_config(TransformerConfig, PRESET / f"transformer_{kind}.json")
    coarse = (127, 1) if kind == "base" else (512, 16)
    fine = (512, 16) if kind == "base" else (1024, 64)
    shape = TokenShape(kind=kind, coarse_vocab=coarse[0], coarse_len=coarse[1], fine_vocab=fine[0],
                       fine_len=fine[1], num_labels=10)
    labels = torch.randint(0, 10, (batch,))
    coarse_tokens = torch.randint(0, coarse[0], (batch, coarse[1]))
    targets = torch.randint(0, fine[0], (batch, fine[1]))
    inputs = torch.cat([torch.full((batch, 1), shape.start_token), targets[:, :-1]], 1)
    positions = torch.arange(fine[1]).expand(batch, fine[1])

    def loss(model: torch.nn.Module) -> torch.Tensor:
        logits = model(labels, coarse_tokens, inputs, positions)
        logits = logits[0] if isinstance(logits, tuple) else logits
        return F.cross_entropy(logits.float().reshape(-1, fine[0]), targets.reshape(-1))
    return TokenTransformer(cfg, shape), loss


def seconds_per_step(model: torch.nn.Module, loss_fn: Callable, *, steps: int, bfloat16: bool) -> float:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            loss = loss_fn(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for _ in range(3):
        step()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - started) / steps


@app.command()
def main(threads: Annotated[int, typer.Option(min=1)] = 1, steps: Annotated[int, typer.Option(min=1)] = 20,
         batch: Annotated[int, typer.Option(min=1)] = 64) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    native = native_bfloat16(torch.device("cpu"))
    print(f"this CPU multiplies bfloat16 natively: {'yes' if native else 'no'} "
          f"(--precision auto trains in {'bfloat16' if native else 'float32'}); {threads} thread(s), batch {batch}")
    print("| model | float32 s/step | bfloat16 s/step | ratio |\n|---|---:|---:|---:|")
    for name, build in (("autoencoder", lambda: autoencoder_step(batch)),
                        ("base transformer", lambda: transformer_step("base", batch)),
                        ("cascade transformer", lambda: transformer_step("cascade", batch))):
        model, loss_fn = build()
        full = seconds_per_step(model, loss_fn, steps=steps, bfloat16=False)
        half = seconds_per_step(model, loss_fn, steps=steps, bfloat16=True)
        print(f"| {name} | {full:.3f} | {half:.3f} | {half / full:.2f} |")


if __name__ == "__main__":
    app()
