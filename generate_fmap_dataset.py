"""Encode an image dataset with a trained autoencoder into a feature-map dataset (safetensors shards)."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import BatchSize, DatasetPath, Device, OutDir, Seed, console, entry, make_app, stage, track
from core.errors import PipelineError
from core.stages.fmaps import FmapArgs, run

app = make_app(__doc__)


@app.command()
@stage
def main(
    dataset_path: DatasetPath,
    model_path: Annotated[Path, typer.Option(help="autoencoder artifact")],
    out_dir: OutDir,
    device: Device = "auto",
    batch_size: BatchSize = 256,
    num_files_folder: Annotated[int, typer.Option(min=1, help="feature maps per shard file")] = 10000,
    augment_copies: Annotated[str, typer.Option(help="augmented copies of each training image (with the autoencoder "
                                                     "config's augmentation) as extra training maps: a number, or "
                                                     "auto (about 8,000 training maps, at most 8 copies)")] = "0",
    augment_config: Annotated[Optional[Path], typer.Option(help="an autoencoder config whose augment_* settings the "
                                                               "copies use (default: the autoencoder's own)")] = None,
    seed: Seed = 0,
) -> None:
    if augment_copies != "auto" and not augment_copies.isdigit():
        raise PipelineError(f"--augment-copies must be a number or auto, got '{augment_copies}'")
    summary = run(FmapArgs(dataset_path=dataset_path, model_path=model_path, out_dir=out_dir, device=device,
                           batch_size=batch_size, shard_size=num_files_folder, augment_copies=augment_copies,
                           augment_config=augment_config, seed=seed,
                           progress=lambda items: track(items, "shards")))
    console.print(f"wrote {out_dir / 'dataset.json'}: {summary['items']} feature maps of shape "
                  f"{tuple(summary['fmap_shape'])} in {summary['shards']} shards "
                  f"({summary['reused_shards']} reused from an earlier run)")


if __name__ == "__main__":
    entry(app)
