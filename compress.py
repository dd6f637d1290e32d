"""Compress an autoencoder or transformer: weights clustered into shared values and fine-tuned, then
quantized to int8 and fine-tuned again on the stage's own data. Writes the compressed artifact (read by
every stage like the original) and report.json (sizes and held-out quality before and after)."""
from pathlib import Path
from typing import Annotated

import typer

from core.cli import ConfigPath, OutDir, console, entry, make_app, stage, training_command
from core.stages.compress import CompressArgs, run
from core.training import TrainOptions

app = make_app(__doc__)


@app.command()
@stage
@training_command(exclude=("lr_step", "max_epoch", "max_steps"), checkpoint_step=100)
def main(
    model_path: Annotated[Path, typer.Option(help="autoencoder or transformer artifact to compress")],
    dataset_path: Annotated[Path, typer.Option(help="its training data: the image dataset.json (autoencoder) "
                                                    "or the feature-map dataset.json (transformer)")],
    out_dir: OutDir,
    config_path: ConfigPath = None,
    *,
    options: TrainOptions,
) -> None:
    report = run(CompressArgs(model_path=model_path, dataset_path=dataset_path, config_path=config_path,
                              options=options))
    if not report:  # not the main process of a torchrun
        return
    sizes, quality = report["size_bytes"], report["quality"]
    console.print(f"size: {sizes['before']} -> {sizes['after']} bytes ({report['ratio']:.2f}x smaller)")
    console.print(f"{report['metric']}: {quality['before']:.4f} -> {quality['after']:.4f} "
                  f"(clustered, before fine-tuning: {quality['clustered_no_finetune']:.4f})")
    console.print(f"wrote {report['artifact']} and {out_dir / 'report.json'}")


if __name__ == "__main__":
    entry(app)
