"""Train a self-organizing-map codebook over patches of a feature-map dataset."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import ConfigPath, DatasetPath, OutDir, console, entry, make_app, stage, training_command
from core.stages.codebook import CodebookArgs, run
from core.training import TrainOptions

app = make_app(__doc__)


@app.command()
@stage
@training_command()
def main(
    dataset_path: DatasetPath,
    out_dir: OutDir,
    config_path: ConfigPath = None,
    decoder_path: Annotated[Optional[Path], typer.Option(help="autoencoder artifact, for decoded previews and PSNR")] = None,
    init_from: Annotated[Optional[Path], typer.Option(help="start from this codebook's units")] = None,
    *,
    options: TrainOptions,
) -> None:
    path = run(CodebookArgs(dataset_path=dataset_path, config_path=config_path, decoder_path=decoder_path,
                            init_from=init_from, options=options))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    entry(app)
