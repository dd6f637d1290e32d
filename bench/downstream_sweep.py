"""How the downstream gain moves with the number of curated images per real image and with the real share of
each batch, on a run folder made by `make demo` or `make lowdata` (its data, curated set and report): the
report's "real subset + curated" arm retrained with a class-balanced sample of the curated images, the same
classifier, steps and seeds, tested on the real held-out images. The report's arms without a generator are
printed beside it.

    python bench/downstream_sweep.py --runs runs/tiny32_lowdata100 --per-real 1,3,10 --shares 0.25,0.5,0.75
"""
import json
import sys
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.data import load_image_dataset  # noqa: E402
from core.report import downstream  # noqa: E402
from core.report.sets import at_source_size  # noqa: E402


def curated_arm(subset: downstream.Arm, curated: downstream.Curated, per_real: float | None, share: float,
                seed: int) -> downstream.Arm:
    """The subset + `per_real` curated images per real image (None: all of them), `share` of each batch real."""
    count = len(curated.data) if per_real is None else min(len(curated.data), int(per_real * len(subset.images)))
    chosen = downstream.balanced_subset(curated.data.labels, max(1, count // len(subset.labels.unique())), seed)
    k = curated.targets.shape[1]
    return downstream.Arm(f"{per_real} per real, share {share}", torch.cat([subset.images, curated.data.items[chosen]]),
                          torch.cat([subset.labels, curated.data.labels[chosen]]),
                          downstream.half_and_half(len(subset.images), len(chosen), share),
                          targets=torch.cat([F.one_hot(subset.labels, k).float(), curated.targets[chosen]]))


def main(runs: Annotated[Path, typer.Option(help="a run folder with data/, curated/ and report/")],
         per_real: Annotated[str, typer.Option(help="curated images per real image, comma-separated")] = "1,3,10",
         shares: Annotated[str, typer.Option(help="real shares of each batch, comma-separated (at 10 per real)")]
         = "0.25,0.5,0.75",
         seeds: int = 3, threads: int = 1, out: Annotated[Path | None, typer.Option()] = None) -> None:
    torch.set_num_threads(threads)
    report = json.loads((runs / "report" / "report.json").read_text())["downstream"]
    config = downstream.DownstreamConfig(**report["config"])
    generated = load_image_dataset(runs / "generated" / "dataset.json")
    real = at_source_size(load_image_dataset(runs / "data" / "dataset.json"), generated.items.shape[-2:])
    train, heldout = real.split(heldout=False), real.split(heldout=True)
    curated = downstream.load_curated(runs / "curated" / "dataset.json", real.label_names)
    images, labels = downstream.labelled(train)
    subset_ids = downstream.balanced_subset(labels, config.subset_per_class, 0)
    subset = downstream.Arm(downstream.SUBSET, images[subset_ids], labels[subset_ids])
    settings = downstream.classifier_settings(config)
    test_images, test_labels = downstream.labelled(heldout)
    grid = [(float(r), 0.5) for r in per_real.split(",")] + [(10.0, float(s)) for s in shares.split(",") if float(s) != 0.5]
    rows = []
    for name in downstream.NO_GENERATOR:
        if name in report["arms"]:
            a = report["arms"][name]["accuracy"]
            print(f"{name:>34}: {a['mean']:.2%} ± {100 * a['std']:.2f} (the report's)", flush=True)
    for ratio, share in grid:
        arm = curated_arm(subset, curated, ratio, share, 0)
        result = downstream.accuracy_over_seeds([arm], test_images, test_labels, len(real.label_names), settings,
                                                seeds=seeds, seed=0, device=torch.device("cpu"))[arm.name]
        rows.append({"per_real": ratio, "real_share": share, "curated_images": len(arm.images) - len(subset.images),
                     "accuracy": result})
        print(f"{ratio:>5g} curated per real, real share {share:.2f} ({rows[-1]['curated_images']:,} images): "
              f"{result['mean']:.2%} ± {100 * result['std']:.2f}", flush=True)
    if out is not None:
        out.write_text(json.dumps({"runs": str(runs), "seeds": seeds, "rows": rows}, indent=1))


if __name__ == "__main__":
    typer.run(main)
