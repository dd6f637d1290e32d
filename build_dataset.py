"""Build a dataset.json (tinydb) of resized images from an image folder or MNIST-format idx files."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import OutDir, Overwrite, Seed, console, entry, make_app, stage, track
from core.errors import PipelineError
from core.stages.dataset import DatasetArgs, run

app = make_app(__doc__)


@app.command()
@stage
def main(
    source: Annotated[Path, typer.Option(help="a folder of images (sub-folder name = label), a folder of idx files, one idx(.gz) file, or a dataset.json")],
    out_dir: OutDir,
    size: Annotated[int, typer.Option(min=4, max=4096, help="images are stored at size x size")] = 32,
    channels: Annotated[Optional[int], typer.Option(min=1, max=3, help="1 (grayscale) or 3 (RGB); leave it out to "
                                                                       "detect it (3 if any image has colour)")] = None,
    fit: Annotated[str, typer.Option(help="an image of another size: pad (centred on its border colour; one that "
                                          "fits keeps every pixel), crop (the centred square) or resize")] = "pad",
    limit: Annotated[Optional[int], typer.Option(min=1, help="keep at most N images (per split, for idx files)")] = None,
    holdout: Annotated[float, typer.Option(min=0.0, max=0.9, help="fraction held out for evaluation (folders; idx files use t10k)")] = 0.1,
    label: Annotated[Optional[list[str]], typer.Option(help="keep only images with this label (repeatable)")] = None,
    exclude_label: Annotated[Optional[list[str]], typer.Option(help="drop the images with this label (repeatable)")] = None,
    from_split: Annotated[Optional[str], typer.Option(help="keep only images of this split of the source: train or heldout")] = None,
    train_count: Annotated[Optional[int], typer.Option(min=0, help="the first N images are the training split, the rest held out")] = None,
    train_per_class: Annotated[Optional[int], typer.Option(min=1, help="keep the first N training images of each label; held-out images are all kept (a low-data benchmark)")] = None,
    captions: Annotated[Optional[Path], typer.Option(help="CSV (file,caption) or JSON ({file: caption}) of captions; "
                                                        "a text file beside an image (photo.txt) is its caption too")] = None,
    strict: Annotated[bool, typer.Option(help="refuse a corrupt image instead of skipping it")] = False,
    seed: Seed = 0,
    overwrite: Overwrite = False,
) -> None:
    if channels not in (None, 1, 3):
        raise PipelineError("--channels must be 1 or 3")
    if from_split not in (None, "train", "heldout"):
        raise PipelineError("--from-split must be train or heldout")
    counts = run(DatasetArgs(source=source, out_dir=out_dir, size=size, channels=channels, fit=fit, limit=limit,
                             holdout=holdout, seed=seed, strict=strict, overwrite=overwrite, labels=label,
                             exclude_labels=exclude_label,
                             from_split=from_split, train_count=train_count, train_per_class=train_per_class,
                             captions=captions,
                             progress=lambda items: track(items, "images")))
    console.print(f"wrote {out_dir / 'dataset.json'}: {counts['images']} images of {counts['channels']} channel(s) "
                  f"({counts['train']} train, {counts['heldout']} held out, {counts['labels']} labels"
                  f"{', %d captioned' % counts['captions'] if counts['captions'] else ''}), "
                  f"{counts['skipped']} skipped")


if __name__ == "__main__":
    entry(app)
