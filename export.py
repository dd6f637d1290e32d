"""Export the generator of a generation config (every level's transformer, the last level's codebook, the
autoencoder's decoder; compressed or not) as one bundle for onnxruntime: ONNX graphs, entropy-coded
weights and runner.py, which generates images from it with numpy and onnxruntime only (no PyTorch)."""
from pathlib import Path
from typing import Annotated

import typer

from core.cli import OutDir, Overrides, Overwrite, console, entry, make_app, stage
from core.stages.export import ExportArgs, bundle_size, run

app = make_app(__doc__)


@app.command()
@stage
def main(
    config_path: Annotated[Path, typer.Option(help="generation config: one entry per cascade level, as for generate_images.py")],
    decoder_path: Annotated[Path, typer.Option(help="autoencoder artifact")],
    out_dir: OutDir,
    overrides: Overrides = None,
    overwrite: Overwrite = False,
    full_size: Annotated[bool, typer.Option(help="keep the padding the dataset build added around smaller images")] = False,
) -> None:
    manifest = run(ExportArgs(config_path=config_path, decoder_path=decoder_path, out_dir=out_dir, overwrite=overwrite,
                              full_size=full_size, overrides=tuple(overrides or ())))
    console.print(f"wrote {manifest.parent} ({bundle_size(manifest.parent)['total']} bytes); generate with "
                  f"python {manifest.parent / 'runner.py'} --out-dir DIR --num-images N")


if __name__ == "__main__":
    entry(app)
