"""Choose the sampling settings (guidance scale and temperature on every level, and per-level settings with
--vary): by accuracy, images made at each setting are mixed into a classifier's training on most of the real
training images and tested on the rest (a validation split); by fidelity, their Fréchet distance to those
validation images in a classifier's features. --validation heldout validates on the real data's held-out split
instead (a share of the training images that no stage trained on). Writes sampling.json with every setting's
figures and generate.json, the generation config at the best one."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import Device, OutDir, Overrides, Seed, console, entry, make_app, stage, track
from core.errors import PipelineError
from core.report.downstream import DownstreamConfig
from core.stages.sampling import SamplingArgs, run, setting_of

app = make_app(__doc__)


def numbers(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise PipelineError(f"{flag} takes numbers separated by commas, got '{text}'") from None


@app.command()
@stage
def main(
    config_path: Annotated[Path, typer.Option(help="the generation config (generate.json)")],
    decoder_path: Annotated[Path, typer.Option(help="the autoencoder that decodes the finest level")],
    real_path: Annotated[Path, typer.Option(help="real dataset.json: only its training split is read")],
    out_dir: OutDir,
    overrides: Overrides = None,
    guidance: Annotated[str, typer.Option(help="guidance scales to try, comma-separated")] = "1,1.5,2,3",
    temperature: Annotated[str, typer.Option(help="temperatures to try, comma-separated")] = "1",
    vary: Annotated[Optional[list[str]], typer.Option(
        help="LEVEL.KEY=V1,V2,...: a level's setting tried at each value, every combination (repeatable; e.g. "
             "1.top_p=1,0.9)")] = None,
    criterion: Annotated[str, typer.Option(help="accuracy (for augmentation) or fidelity")] = "accuracy",
    validation: Annotated[str, typer.Option(help="carved (from the training images) or heldout")] = "carved",
    images: Annotated[int, typer.Option(min=10, help="images generated per setting")] = 2000,
    screen_share: Annotated[float, typer.Option(
        min=0.0, max=1.0, help="by fidelity, with more than 4 settings: each measured on this share of --images "
                               "first, the nearest quarter on all of them (0: all on all)")] = 0.25,
    seeds: Annotated[int, typer.Option(min=1, help="classifier seeds per setting")] = 2,
    steps: Annotated[int, typer.Option(min=1, help="training steps of each classifier")] = 500,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    summary = run(SamplingArgs(config_path=config_path, decoder_path=decoder_path, real_path=real_path,
                               out_dir=out_dir, overrides=tuple(overrides or ()),
                               guidance=numbers(guidance, "--guidance"),
                               temperature=numbers(temperature, "--temperature"), vary=tuple(vary or ()),
                               criterion=criterion, validation=validation, images=images, screen_share=screen_share, seeds=seeds,
                               downstream=DownstreamConfig(steps=steps), seed=seed, device=device, progress=track))
    if "screening" in summary:
        console.print(f"screened {len(summary['screening']['candidates'])} settings on "
                      f"{summary['screening']['images_per_setting']} images each; the nearest on {images}:",
                      highlight=False)
    for c in summary["candidates"]:
        if criterion == "fidelity":
            figure = f"Fréchet distance {c['frechet_distance']:.2f}"
        else:
            a = c["validation_accuracy"]
            figure = f"validation accuracy {a['mean']:.2%} ± {100 * a['std']:.2f}"
        console.print(f"{setting_text(c)}: {figure}, teacher agreement {c['teacher_agreement']:.1%}", highlight=False)
    console.print(f"chosen: {setting_text(summary['chosen'])} ({summary['validation_images']} validation images); "
                  f"wrote {out_dir / 'generate.json'} and {out_dir / 'sampling.json'}", highlight=False)


def setting_text(candidate: dict) -> str:
    named = {"guidance_scale": "guidance"}
    return ", ".join(f"{named.get(k, k)} {v:g}" if isinstance(v, (int, float)) else f"{named.get(k, k)} {v}"
                     for k, v in setting_of(candidate).items())


if __name__ == "__main__":
    entry(app)
