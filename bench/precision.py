"""Seconds per training step of the tiny preset's models (the autoencoder at 32 px, the base and cascade
transformers on Fashion-MNIST's token shapes, the report's classifier at 32 px) in float32 and in bfloat16
autocast, on this CPU, with the trainer's optimizer and the stages' memory settings; random data, since the
figure is the step's cost and not what it learns. Says whether --precision auto trains in bfloat16 here.

    python bench/precision.py [--threads 1] [--steps 20] [--batch 64]
"""
import sys
from pathlib import Path
from typing import Annotated

import torch
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.allocator import keep_freed_memory  # noqa: E402
from core.probe import autoencoder_step, classifier_step, seconds_per_step, transformer_step  # noqa: E402
from core.training import native_bfloat16  # noqa: E402

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


@app.command()
def main(threads: Annotated[int, typer.Option(min=1)] = 1, steps: Annotated[int, typer.Option(min=1)] = 20,
         batch: Annotated[int, typer.Option(min=1)] = 64) -> None:
    keep_freed_memory()  # as the stages run
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    native = native_bfloat16(torch.device("cpu"))
    print(f"this CPU multiplies bfloat16 natively: {'yes' if native else 'no'} "
          f"(--precision auto trains in {'bfloat16' if native else 'float32'}); {threads} thread(s), batch {batch}")
    print("| model | float32 s/step | bfloat16 s/step | ratio |\n|---|---:|---:|---:|")
    for name, build in (("autoencoder", lambda: autoencoder_step(batch)),
                        ("base transformer", lambda: transformer_step("base", batch)),
                        ("cascade transformer", lambda: transformer_step("cascade", batch)),
                        ("report classifier", lambda: classifier_step(batch))):
        full = seconds_per_step(build(), steps=steps, bfloat16=False)
        half = seconds_per_step(build(), steps=steps, bfloat16=True)
        print(f"| {name} | {full:.3f} | {half:.3f} | {half / full:.2f} |")


if __name__ == "__main__":
    app()
