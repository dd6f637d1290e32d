"""Train the convolutional autoencoder that maps images to feature maps and back."""
from core import autoencoder
from core.cli import (BatchSize, CheckpointStep, ConfigPath, DatasetPath, Device, InitFrom, LrStep, MaxEpoch,
                      MaxSteps, OutDir, Overwrite, Resume, Seed, console, entry, make_app, stage)
from core.training import TrainArgs

app = make_app(__doc__)


@app.command()
@stage
def main(
    dataset_path: DatasetPath,
    out_dir: OutDir,
    config_path: ConfigPath = None,
    device: Device = "auto",
    batch_size: BatchSize = 64,
    checkpoint_step: CheckpointStep = 1000,
    lr_step: LrStep = 0,
    max_epoch: MaxEpoch = 1,
    max_steps: MaxSteps = 0,
    seed: Seed = 0,
    init_from: InitFrom = None,
    resume: Resume = False,
    overwrite: Overwrite = False,
) -> None:
    args = TrainArgs(out_dir=out_dir, stage="train_autoencoder", batch_size=batch_size, max_epoch=max_epoch,
                     max_steps=max_steps, checkpoint_step=checkpoint_step, lr_step=lr_step, seed=seed)
    path = autoencoder.train(dataset_path, config_path, args, device, init_from, resume, overwrite)
    console.print(f"wrote {path}")


if __name__ == "__main__":
    entry(app)
