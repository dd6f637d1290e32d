"""Training steps of the tiny preset's models on random data (the autoencoder at 32 px, the base and cascade
transformers on Fashion-MNIST's token shapes, the report's classifier at 32 px), with the trainer's optimizer: a
machine's speed at the chain's own work. The ETA scales a recorded run by it (core.eta); bench/precision.py prints
it per model and precision."""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from core.config import load_config
from core.models.autoencoder import Autoencoder, AutoencoderConfig, reconstruction_loss
from core.models.classifier import FeatureClassifier
from core.models.transformer import TokenShape, TokenTransformer, TransformerConfig
from core.training import native_bfloat16

PRESET = Path(__file__).resolve().parent.parent / "configs" / "tiny32"
Step = tuple[torch.nn.Module, Callable[[torch.nn.Module], torch.Tensor]]  # a model and its loss on a fixed batch


def autoencoder_step(batch: int) -> Step:
    cfg = dataclasses.replace(load_config(AutoencoderConfig, PRESET / "autoencoder.json"), image_channel=1,
                              latent_channel=4)
    images = torch.rand(batch, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return Autoencoder(cfg), lambda model: reconstruction_loss(cfg, model(images).float(), images)


def classifier_step(batch: int) -> Step:
    """The report's and curation's classifier, laid out as they train it (channels last)."""
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(batch, 1, 32, 32, generator=generator) * 2 - 1).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    model = FeatureClassifier(1, 10).to(memory_format=torch.channels_last)
    return model, lambda model: F.cross_entropy(model(images).float(), labels)


def transformer_step(kind: str, batch: int) -> Step:
    """The base (kind "base") or cascade transformer of the tiny preset, at Fashion-MNIST's token counts."""
    cfg = load_config(TransformerConfig, PRESET / f"transformer_{kind}.json")
    coarse = (127, 1) if kind == "base" else (512, 16)
    fine = (512, 16) if kind == "base" else (1024, 64)
    shape = TokenShape(kind=kind, coarse_vocab=coarse[0], coarse_len=coarse[1], fine_vocab=fine[0],
                       fine_len=fine[1], num_labels=10)
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (batch,), generator=generator)
    coarse_tokens = torch.randint(0, coarse[0], (batch, coarse[1]), generator=generator)
    targets = torch.randint(0, fine[0], (batch, fine[1]), generator=generator)
    inputs = torch.cat([torch.full((batch, 1), shape.start_token), targets[:, :-1]], 1)
    positions = torch.arange(fine[1]).expand(batch, fine[1])

    def loss(model: torch.nn.Module) -> torch.Tensor:
        logits = model(labels, coarse_tokens, inputs, positions)
        logits = logits[0] if isinstance(logits, tuple) else logits
        return F.cross_entropy(logits.float().reshape(-1, fine[0]), targets.reshape(-1))
    return TokenTransformer(cfg, shape), loss


def seconds_per_step(step: Step, *, steps: int, bfloat16: bool, warmup: int = 3) -> float:
    """The mean time of `steps` training steps (AdamW), after `warmup` untimed ones."""
    model, loss_fn = step
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_once() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            loss = loss_fn(model)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for _ in range(warmup):
        train_once()
    started = time.perf_counter()
    for _ in range(steps):
        train_once()
    return (time.perf_counter() - started) / steps


def probe_seconds(steps: int = 5, batch: int = 16) -> float:
    """Seconds for one training step of the autoencoder plus one of the cascade transformer, on one thread, in
    the precision training uses on this CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            bfloat16 = native_bfloat16(torch.device("cpu"))
            return sum(seconds_per_step(build(), steps=steps, bfloat16=bfloat16)
                       for build in (lambda: autoencoder_step(batch), lambda: transformer_step("cascade", batch)))
    finally:
        torch.set_num_threads(threads)
