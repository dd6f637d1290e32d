"""Quality report of a generated image dataset against a real one: Fréchet distance, precision/recall,
density/coverage (classifier and pixel-PCA spaces), class histogram, memorization, grids and 2-D maps; the
tokenizer ceiling (with --autoencoder-path); and the downstream accuracy of classifiers trained on the
generated images (when both sets carry labels)."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import Device, Seed, console, entry, make_app, stage, track
from core.report.downstream import DownstreamConfig
from core.errors import PipelineError
from core.stages.evaluate import EvalArgs, run, summary_lines

app = make_app(__doc__)


@app.command()
@stage
def main(
    real_path: Annotated[Path, typer.Option(help="real dataset.json: held-out split = reference, training split = "
                                                 "what memorization is checked against and the classifier learns")],
    generated_path: Annotated[Path, typer.Option(help="dataset.json of generated images")],
    out_dir: Annotated[Path, typer.Option(help="where report.json, report.md, the pictures and the classifier go")],
    num_images: Annotated[int, typer.Option(min=2, help="images compared per set, at most")] = 1000,
    classifier_steps: Annotated[int, typer.Option(min=1, help="training steps of the feature classifier")] = 500,
    classifier_path: Annotated[Optional[Path], typer.Option(help="reuse this classifier artifact")] = None,
    prompt_classifier_steps: Annotated[int, typer.Option(
        min=1, help="training steps of the word classifier (prompt agreement, captioned sets)")] = 600,
    k: Annotated[int, typer.Option(min=1, help="neighbours for precision/recall and density/coverage")] = 5,
    autoencoder_path: Annotated[Optional[Path], typer.Option(
        help="the generator's autoencoder: the tokenizer ceiling section (real images reconstructed)")] = None,
    ceiling_codebook: Annotated[Optional[list[Path]], typer.Option(
        help="a codebook of that autoencoder's feature maps, for the ceiling section (repeatable)")] = None,
    ceiling_decoder: Annotated[Optional[Path], typer.Option(
        help="the decoder generation uses, when it was fine-tuned on the last codebook's maps: the ceiling section "
             "adds that codebook's maps decoded by it")] = None,
    downstream: Annotated[bool, typer.Option(
        help="train classifiers on the generated images and on real ones, test them on the real held-out "
             "images (needs labels in both sets)")] = True,
    curated_path: Annotated[Optional[Path], typer.Option(
        help="curate_images.py's dataset.json of these generated images: adds the curated arms")] = None,
    downstream_seeds: Annotated[int, typer.Option(min=1, help="seeds per downstream training set")] = 3,
    downstream_steps: Annotated[int, typer.Option(min=1, help="training steps of each downstream classifier")] = 500,
    downstream_per_class: Annotated[int, typer.Option(
        min=1, help="real images per class in the subset that the generated images are added to")] = 100,
    downstream_mix: Annotated[str, typer.Option(
        help="batches of the subset + generated training set: equal (half real, half generated) or proportional "
             "(drawn uniformly from all its images)")] = "equal",
    downstream_flip: Annotated[bool, typer.Option(
        help="mirror images left-right in the downstream training (turn off for digits or text)")] = True,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    if downstream_mix not in ("equal", "proportional"):
        raise PipelineError(f"--downstream-mix must be equal or proportional, got '{downstream_mix}'")
    config = DownstreamConfig(steps=downstream_steps, seeds=downstream_seeds, subset_per_class=downstream_per_class,
                              flip=downstream_flip, real_share=0.5 if downstream_mix == "equal" else None)
    report = run(EvalArgs(real_path=real_path, generated_path=generated_path, out_dir=out_dir, num_images=num_images,
                          seed=seed, classifier_steps=classifier_steps, classifier_path=classifier_path, k=k,
                          prompt_classifier_steps=prompt_classifier_steps,
                          downstream=downstream, downstream_config=config,
                          curated_path=curated_path, autoencoder_path=autoencoder_path,
                          codebook_paths=list(ceiling_codebook or []), decoder_path=ceiling_decoder, device=device,
                          progress=track))
    for line in summary_lines(report):
        console.print(f"[bold red]{line}[/bold red]" if line.startswith("WARNING") else line, highlight=False)
    for space, metrics in report["spaces"].items():
        summary = ", ".join(f"{name} {m['value']:.3g} (real {m['real_floor']:.3g})" for name, m in metrics.items())
        console.print(f"{space}: {summary}", highlight=False)
    ceiling = report["tokenizer_ceiling"]
    if "skipped" in ceiling:
        console.print(f"tokenizer ceiling: skipped ({ceiling['skipped']})", highlight=False)
    else:
        space = next(iter(ceiling["rows"][0]["spaces"]))
        figures = ", ".join(f"{row['images'].split(' (')[0]} {row['spaces'][space]['frechet_distance']:.3g}"
                            for row in ceiling["rows"])
        console.print(f"tokenizer ceiling, Fréchet distance in {space.replace('_', ' ')} space: {figures}",
                      highlight=False)
    if "prompts" in report:
        summary = ", ".join(f"{name.replace('_', ' ')} {report['prompts'][name]['overall']:.1%}"
                            for name in ("real_heldout", "generated_seen", "generated_unseen") if name in report["prompts"])
        console.print(f"prompt agreement (named words found): {summary}", highlight=False)
    console.print(f"wrote {out_dir / 'report.md'} and {out_dir / 'report.json'}")


if __name__ == "__main__":
    entry(app)
