"""Generate images with the cascade of transformers: one config entry per level, decoded by the
autoencoder. Writes the images, grid.png and a dataset.json recording each image's provenance."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import Device, OutDir, Overrides, Overwrite, Seed, console, entry, make_app, stage, track
from core.errors import PipelineError
from core.stages.generate import GenerateArgs, PromptsArgs, run, run_prompts

app = make_app(__doc__)


@app.command()
@stage
def main(
    config_path: Annotated[Path, typer.Option(help="JSON with one entry per cascade level: \"0\" (base), \"1\", ...")],
    decoder_path: Annotated[Path, typer.Option(help="autoencoder artifact")],
    out_dir: OutDir,
    overrides: Overrides = None,
    num_images: Annotated[int, typer.Option(min=1, help="images to generate")] = 64,
    seed: Seed = 0,
    batch_size: Annotated[int, typer.Option(min=1, help="images generated at once (a run that continues keeps its first)")] = 256,
    format: Annotated[str, typer.Option("--format", help="png or jpg")] = "png",
    device: Device = "auto",
    no_cache: Annotated[bool, typer.Option(help="recompute every position (slow; for checks)")] = False,
    overwrite: Overwrite = False,
    full_size: Annotated[bool, typer.Option(help="keep the padding the dataset build added around smaller images "
                                                 "(default: images come back at their source's size)")] = False,
    prompts_file: Annotated[Optional[Path], typer.Option(help="a file of prompts, one per line: --num-images images "
                                                              "of each, in OUT/set_000, set_001, ...")] = None,
) -> None:
    if format not in ("png", "jpg"):
        raise PipelineError("--format must be png or jpg")
    args = GenerateArgs(config_path=config_path, decoder_path=decoder_path, out_dir=out_dir,
                        overrides=tuple(overrides or ()), num_images=num_images,
                        seed=seed, batch_size=batch_size, fmt=format, device=device, overwrite=overwrite,
                        use_cache=not no_cache, full_size=full_size, progress=lambda items: track(items, "batches"))
    if prompts_file is not None:
        path = run_prompts(PromptsArgs(generate=args, prompts_path=prompts_file,
                                       progress=lambda items: track(items, "prompts")))
        console.print(f"wrote {num_images} images per prompt of {prompts_file}, {out_dir / 'grid.png'} and {path}")
        return
    path = run(args)
    console.print(f"wrote {num_images} images, {out_dir / 'grid.png'} and {path}")


if __name__ == "__main__":
    entry(app)
