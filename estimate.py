"""Estimate a chain's wall time before it trains, from a recorded run of the same preset: each stage's recorded
time scaled by the work planned here (steps, images) and by this machine's matmul speed. Writes the plan (which a
record of this run keeps for later estimates) and prints the estimate."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.artifacts import atomic_write_json
from core.cli import DatasetPath, console, entry, make_app, stage
from core.config import config_from_dict, load_config_file
from core.data import record_files
from core.errors import PipelineError
from core.eta import PLAN_FILE, TIMINGS_FILE, Training, estimate, plan, summary, training_maps
from core.models.autoencoder import AutoencoderConfig
from core.probe import probe_seconds

app = make_app(__doc__)


def parse(entries: list[str], what: str) -> dict[str, list[str]]:
    parsed = {}
    for item in entries:
        name, sep, values = item.partition("=")
        if not sep or not name.strip():
            raise PipelineError(f"--{what} '{item}': expected NAME=VALUES")
        parsed[name.strip()] = values.split(",")
    return parsed


def training(name: str, values: list[str], items: dict[str, int]) -> Training:
    try:
        steps, epochs, batch, kind = values
        return Training(int(steps), int(epochs), int(batch), items[kind])
    except (ValueError, KeyError):
        raise PipelineError(f"--train {name}={','.join(values)}: expected STEPS,EPOCHS,BATCH,images or maps")


def image_count(name: str, values: list[str], items: dict[str, int]) -> int:
    if len(values) == 1 and values[0] in items:
        return items[values[0]]
    try:
        (count,) = values
        return int(count)
    except ValueError:
        raise PipelineError(f"--images {name}={','.join(values)}: expected a count, images or maps")


@app.command()
@stage
def main(
    dataset_path: DatasetPath,
    out: Annotated[Path, typer.Option(help="the plan.json to write")],
    autoencoder_config: Annotated[Optional[Path], typer.Option(help="the autoencoder's config (its augmentation)")] = None,
    augment_copies: Annotated[str, typer.Option(help="the feature-map stage's --augment-copies")] = "auto",
    train: Annotated[Optional[list[str]], typer.Option(
        help="NAME=STEPS,EPOCHS,BATCH,KIND: a training stage over the training images or maps (repeatable)")] = None,
    images: Annotated[Optional[list[str]], typer.Option(
        help="NAME=COUNT: a stage over COUNT images (or over the training images or maps)")] = None,
    fixed: Annotated[Optional[list[str]], typer.Option(help="a stage whose work is the same on any data")] = None,
    reference: Annotated[Optional[Path], typer.Option(help="a record (docs/runs/NAME) of the same preset")] = None,
    side_by_side: Annotated[bool, typer.Option(help="the stages run side by side (make -j)")] = False,
) -> None:
    """Write the plan and print the estimate."""
    training_images = sum(r.get("split") != "heldout" for records in record_files(dataset_path) for r in records)
    given = load_config_file(autoencoder_config) if autoencoder_config is not None else {}
    cfg = config_from_dict(AutoencoderConfig, given, source=str(autoencoder_config or "the autoencoder's config"))
    trainings = parse(train or [], "train")
    autoencoder = (training("autoencoder", trainings["autoencoder"], {"images": training_images})
                   if "autoencoder" in trainings else None)
    items = {"images": training_images, "maps": training_maps(training_images, autoencoder, cfg, augment_copies)}
    work: dict = {name: training(name, values, items) for name, values in trainings.items()}
    work.update({name: image_count(name, values, items) for name, values in parse(images or [], "images").items()})
    work.update({name: None for name in fixed or []})
    planned = plan(work, probe_seconds())
    atomic_write_json(out, planned)
    if reference is None or not (reference / PLAN_FILE).exists() or not (reference / TIMINGS_FILE).exists():
        console.print(f"estimate: no record with a {PLAN_FILE} to time this chain by; each training stage prints "
                      "its own estimate after its first steps", highlight=False)
        return
    console.print(summary(estimate(planned, reference), reference, side_by_side), highlight=False, soft_wrap=True)


if __name__ == "__main__":
    entry(app)
