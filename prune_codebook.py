"""Drop codebook units that are the best match for fewer than --prune-threshold patches."""
from pathlib import Path
from typing import Annotated

import typer

from core.cli import BatchSize, DatasetPath, Device, OutDir, console, entry, make_app, stage
from core.stages.prune import PruneArgs, run

app = make_app(__doc__)


@app.command()
@stage
def main(
    dataset_path: DatasetPath,
    codebook_path: Annotated[Path, typer.Option(help="codebook artifact to prune")],
    out_dir: OutDir,
    prune_threshold: Annotated[int, typer.Option(min=0, help="keep units with at least N best-match uses")] = 1,
    device: Device = "auto",
    batch_size: BatchSize = 512,
) -> None:
    report = run(PruneArgs(dataset_path=dataset_path, codebook_path=codebook_path, out_dir=out_dir,
                           threshold=prune_threshold, device=device, batch_size=batch_size))
    before, after = report["before"], report["after"]
    console.print(f"kept {after['units']} of {before['units']} units; perplexity {before['perplexity']:.1f} -> "
                  f"{after['perplexity']:.1f}; quantization MSE {before['quant_mse']:.5f} -> {after['quant_mse']:.5f}")
    console.print(f"wrote {out_dir / 'codebook.safetensors'} and {out_dir / 'usage_report.json'}")


if __name__ == "__main__":
    entry(app)
