"""Quality report of a generated image dataset against a real one: Fréchet distance, precision/recall,
density/coverage (classifier and pixel-PCA spaces), class histogram, memorization, grids and 2-D maps."""
from pathlib import Path
from typing import Annotated, Optional

import typer

from core.cli import Device, Seed, console, entry, make_app, stage, track
from core.stages.evaluate import EvalArgs, run

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
    k: Annotated[int, typer.Option(min=1, help="neighbours for precision/recall and density/coverage")] = 5,
    seed: Seed = 0,
    device: Device = "auto",
) -> None:
    report = run(EvalArgs(real_path=real_path, generated_path=generated_path, out_dir=out_dir, num_images=num_images,
                          seed=seed, classifier_steps=classifier_steps, classifier_path=classifier_path, k=k,
                          device=device, progress=track))
    for space, metrics in report["spaces"].items():
        summary = ", ".join(f"{name} {m['value']:.3g} (real {m['real_floor']:.3g})" for name, m in metrics.items())
        console.print(f"{space}: {summary}", highlight=False)
    if "prompts" in report:
        summary = ", ".join(f"{name.replace('_', ' ')} {report['prompts'][name]['overall']:.1%}"
                            for name in ("real_heldout", "generated_seen", "generated_unseen") if name in report["prompts"])
        console.print(f"prompt agreement (named words found): {summary}", highlight=False)
    m = report["memorization"]
    console.print(f"memorization: {m['generated_rate']:.1%} of generated images (held-out real: "
                  f"{m['heldout_rate']:.1%})", highlight=False)
    console.print(f"wrote {out_dir / 'report.md'} and {out_dir / 'report.json'}")


if __name__ == "__main__":
    entry(app)
