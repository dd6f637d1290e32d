"""Train a base (decoder-only) or cascade (encoder-decoder) transformer over codebook tokens
(the seed's train_quantized_transformer.py)."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core import cascade
from core.cli import (BatchSize, CheckpointStep, ConfigPath, DatasetPath, Device, LrStep, MaxEpoch, MaxSteps,
                      OutDir, Overwrite, Resume, Seed, console, entry, make_app, stage)
from core.training import TrainArgs

app = make_app(__doc__)


@app.command()
@stage
def main(
    dataset_path: DatasetPath,
    lr_codebook_path: Annotated[Path, typer.Option(help="codebook of the conditioning level (base: the whole-map condition codebook)")],
    hr_codebook_path: Annotated[Path, typer.Option(help="codebook of the level this model predicts")],
    out_dir: OutDir,
    train_base_model: Annotated[bool, typer.Option(help="train the base (decoder-only) model; otherwise a cascade model")] = False,
    config_path: ConfigPath = None,
    decoder_path: Annotated[Optional[Path], typer.Option(help="autoencoder artifact, for sample grids")] = None,
    model_path: Annotated[Optional[Path], typer.Option("--model-path", "--init-from",
                                                       help="start from this transformer's weights")] = None,
    load_optim: Annotated[bool, typer.Option(help="with --model-path set to a checkpoint.safetensors: keep its optimizer state too")] = False,
    test_num_sample: Annotated[int, typer.Option(min=0, help="images in each sample grid")] = 8,
    temperature: Annotated[float, typer.Option(min=0.0, help="sampling temperature of the sample grids")] = 1.0,
    use_activation_checkpoint: Annotated[bool, typer.Option(help="recompute activations in backward to save memory")] = False,
    device: Device = "auto",
    batch_size: BatchSize = 64,
    checkpoint_step: CheckpointStep = 1000,
    lr_step: LrStep = 0,
    max_epoch: MaxEpoch = 1,
    max_steps: MaxSteps = 0,
    seed: Seed = 0,
    resume: Resume = False,
    overwrite: Overwrite = False,
) -> None:
    args = TrainArgs(out_dir=out_dir, stage="train_transformer", batch_size=batch_size, max_epoch=max_epoch,
                     max_steps=max_steps, checkpoint_step=checkpoint_step, lr_step=lr_step, seed=seed)
    path = cascade.train(dataset_path, lr_codebook_path, hr_codebook_path, config_path, args, device,
                         train_base_model, decoder_path, model_path, load_optim, use_activation_checkpoint, test_num_sample,
                         temperature, resume, overwrite)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    entry(app)
