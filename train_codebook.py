"""Train a self-organizing-map codebook over patches of a feature-map dataset."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core import codebook
from core.cli import (BatchSize, CheckpointStep, ConfigPath, DatasetPath, Device, LrStep, MaxEpoch, MaxSteps,
                      OutDir, Overwrite, Resume, Seed, console, entry, make_app, stage)
from core.training import TrainArgs

app = make_app(__doc__)


@app.command()
@stage
def main(
    dataset_path: DatasetPath,
    out_dir: OutDir,
    config_path: ConfigPath = None,
    decoder_path: Annotated[Optional[Path], typer.Option(help="autoencoder artifact, for decoded previews and PSNR")] = None,
    codebook_path: Annotated[Optional[Path], typer.Option("--codebook-path", "--init-from",
                                                          help="start from this codebook's units")] = None,
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
    args = TrainArgs(out_dir=out_dir, stage="train_codebook", batch_size=batch_size, max_epoch=max_epoch,
                     max_steps=max_steps, checkpoint_step=checkpoint_step, lr_step=lr_step, seed=seed)
    path = codebook.train(dataset_path, config_path, args, device, decoder_path, codebook_path, resume, overwrite)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    entry(app)
