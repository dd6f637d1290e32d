"""Choose the sampling settings (guidance scale, temperature) of images meant to train a classifier: images
made at each setting are mixed into a classifier's training on most of the real training images and tested on
the rest (a validation split; the held-out split is never read). Writes sampling.json with every setting's
figures and generate.json, the generation config at the best one."""
from pathlib import Path
from typing import Annotated

import typer

from core.cli import Device, OutDir, Overrides, Seed, console, entry, make_app, stage, track
from core.errors import PipelineError
from core.report.downstream import DownstreamConfig
from core.stages.sampling import SamplingArgs, run

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
    images: Annotated[int, typer.Option(min=10, help="images generated per setting")] = 2000,
    seeds: Annotated[int, typer.Option(min=1, help="classifier seeds per setting")] = 2,
    steps: Annotated[int, typer.Option(min=1, help="training steps of each classifier")] = 500,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    summary = run(SamplingArgs(config_path=config_path, decoder_path=decoder_path, real_path=real_path,
                               out_dir=out_dir, overrides=tuple(overrides or ()),
                               guidance=numbers(guidance, "--guidance"),
                               temperature=numbers(temperature, "--temperature"), images=images, seeds=seeds,
                               downstream=DownstreamConfig(steps=steps), seed=seed, device=device, progress=track))
    for c in summary["candidates"]:
        a = c["validation_accuracy"]
        console.print(f"guidance {c['guidance_scale']:g}, temperature {c['temperature']:g}: validation accuracy "
                      f"{a['mean']:.2%} ± {100 * a['std']:.2f}, teacher agreement {c['teacher_agreement']:.1%}",
                      highlight=False)
    chosen = summary["chosen"]
    console.print(f"chosen: guidance {chosen['guidance_scale']:g}, temperature {chosen['temperature']:g} "
                  f"({summary['validation_images']} validation images); wrote {out_dir / 'generate.json'} and "
                  f"{out_dir / 'sampling.json'}", highlight=False)


if __name__ == "__main__":
    entry(app)
