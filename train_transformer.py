"""Train a base (decoder-only) or cascade (encoder-decoder) transformer over codebook tokens
(the seed's train_quantized_transformer.py)."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import ConfigPath, DatasetPath, OutDir, console, entry, make_app, stage, training_command
from core.stages.transformer import TransformerArgs, run
from core.training import TrainOptions

app = make_app(__doc__)


@app.command()
@stage
@training_command()
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
    *,
    options: TrainOptions,
) -> None:
    path = run(TransformerArgs(dataset_path=dataset_path, lr_codebook_path=lr_codebook_path,
                               hr_codebook_path=hr_codebook_path, base=train_base_model, config_path=config_path,
                               decoder_path=decoder_path, init_from=model_path, load_optim=load_optim,
                               use_checkpointing=use_activation_checkpoint, test_num_sample=test_num_sample,
                               temperature=temperature, options=options))
    console.print(f"wrote {path}")


if __name__ == "__main__":
    entry(app)
