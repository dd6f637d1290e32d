"""Curate generated images for training a classifier: a teacher trained on the real training images gives
each one its soft label, near-copies of training images are dropped, and the labels carried and the filter
are chosen on validation images that the generator never saw (or set here). Writes the curated dataset.json,
summary.json, the teacher, and the kept images as a class-folder tree with their soft labels in a CSV."""
from pathlib import Path
from typing import Annotated

import typer

from core.cli import BatchSize, Device, OutDir, Seed, console, entry, make_app, stage, track
from core.report.downstream import DownstreamConfig
from core.stages.curate import CurateArgs, run

app = make_app(__doc__)


@app.command()
@stage
def main(
    real_path: Annotated[Path, typer.Option(help="real dataset.json: its training split teaches the teacher "
                                                 "(the held-out split is never read)")],
    generated_path: Annotated[Path, typer.Option(help="dataset.json of generated images")],
    out_dir: OutDir,
    labels: Annotated[str, typer.Option(help="labels the curated images carry: asked (the label generated for), "
                                             "teacher (its soft label), blend (half each), or auto (chosen on a "
                                             "validation split)")] = "auto",
    filter: Annotated[str, typer.Option(help="images dropped besides near-copies: none, agree (the teacher "
                                             "disagrees with the asked label), confident (the least confident "
                                             "half of each class), or auto")] = "auto",
    teacher_steps: Annotated[int, typer.Option(min=1, help="training steps of the teacher")] = 500,
    validation: Annotated[str, typer.Option(
        help="the choice's validation images: carved (a fifth of each class's training images) or heldout (the "
             "real set's held-out split: a chain's validation share, which the generator never saw)")] = "carved",
    choice_images: Annotated[int, typer.Option(min=10, help="generated images the choice is measured on")] = 5000,
    choice_seeds: Annotated[int, typer.Option(min=1, help="seeds per candidate of the choice")] = 2,
    choice_steps: Annotated[int, typer.Option(
        min=1, help="training steps of each classifier of the choice (the report's downstream steps)")] = 500,
    flip: Annotated[bool, typer.Option(
        help="mirror images left-right in the choice's classifiers (turn off for digits or text)")] = True,
    folder: Annotated[bool, typer.Option(help="also write OUT/folder/<label>/*.png and soft_labels.csv")] = True,
    seed: Seed = 0,
    device: Device = "auto",
    batch_size: BatchSize = 1024,
) -> None:
    summary = run(CurateArgs(real_path=real_path, generated_path=generated_path, out_dir=out_dir, labels=labels,
                             filter=filter, validation=validation, teacher_steps=teacher_steps, choice_images=choice_images,
                             choice_seeds=choice_seeds, folder=folder,
                             downstream=DownstreamConfig(steps=choice_steps, flip=flip), seed=seed, device=device,
                             batch_size=batch_size, progress=track))
    if "choice" in summary:
        figures = ", ".join(f"{name} {c['accuracy']['mean']:.1%}" for name, c in summary["choice"]["candidates"].items())
        console.print(f"validation accuracy ({summary['choice']['validation_images']} images): {figures}",
                      highlight=False)
    rule, dropped = summary["rule"], summary["dropped"]
    agreement = f"; the teacher agrees with {summary['agreement']:.1%} of the asked labels" if "agreement" in summary else ""
    console.print(f"kept {summary['kept']:,} of {summary['generated']['images']:,} ({rule['labels']} labels, filter "
                  f"{rule['filter']}); dropped {dropped['near_copies']} near-copies, {dropped['teacher']} by the "
                  f"teacher, {dropped['balance']} to balance the classes{agreement}", highlight=False)
    if summary["left_out_of_the_balance"]:
        console.print(f"left out of the balance, the teacher accepting too few of their images: "
                      f"{', '.join(summary['left_out_of_the_balance'])}", highlight=False)
    console.print(f"wrote {out_dir / 'dataset.json'} and {out_dir / 'summary.json'}")


if __name__ == "__main__":
    entry(app)
