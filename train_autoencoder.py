"""Train the convolutional autoencoder that maps images to feature maps and back."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import ConfigPath, DatasetPath, InitFrom, OutDir, console, entry, make_app, stage, training_command
from core.stages.autoencoder import AutoencoderArgs, run
from core.training import TrainOptions

app = make_app(__doc__)


@app.command()
@stage
@training_command()
def main(
    dataset_path: DatasetPath,
    out_dir: OutDir,
    config_path: ConfigPath = None,
    init_from: InitFrom = None,
    decode_codebook: Annotated[Optional[Path], typer.Option(help="fine-tune the decoder of --init-from (encoder "
                                                               "frozen) to decode this codebook's quantized maps")] = None,
    *,
    options: TrainOptions,
) -> None:
    path = run(AutoencoderArgs(dataset_path=dataset_path, config_path=config_path, init_from=init_from,
                               codebook_path=decode_codebook, options=options))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    entry(app)
