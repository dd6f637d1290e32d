"""Markdown tables for the docs, written from runs' report.json and timings.log, so that no figure in them
drifts from its run:

    python bench/tables.py downstream runs/tiny32_lowdata100 runs/tiny32_lowdata20
    python bench/tables.py timings runs/tiny32_lowdata100
    python bench/tables.py ceiling runs/tiny32_transfer/tuned100 runs/tiny32_transfer/scratch100

downstream: one row per arm of the report's downstream section, one column per run (mean ± standard deviation
over its seeds), then the generator's gain. timings: each stage's wall time from timings.log (the last line of
each stage, as a rerun appends) and their sum. ceiling: the report's tokenizer ceiling, one column per run, as
multiples of the real floor's Fréchet distance in the report classifier's features (which stage loses detail).
"""
import json
import sys
from pathlib import Path

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.report.downstream import (AUGMENTED, CURATED, CURATED_ALONE, DISTILLED, GENERATED, REAL,  # noqa: E402
                                    SUBSET)

ROWS = {GENERATED: "generated images alone (CAS)", CURATED_ALONE: "curated images alone (CAS)",
        REAL: "as many real images", SUBSET: "real images (the subset)",
        DISTILLED: "real images, half of each batch mixup labelled by a teacher (no generator)",
        AUGMENTED: "real + generated, asked labels", CURATED: "real + curated, curated labels"}
app = typer.Typer(add_completion=False)


def downstream_of(run: Path) -> dict:
    return json.loads((run / "report" / "report.json").read_text())["downstream"]


@app.command()
def downstream(runs: list[Path]) -> None:
    sections = [downstream_of(run) for run in runs]
    print("| training set | " + " | ".join(f"`{run.name}`" for run in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for name, label in ROWS.items():
        if name == REAL or not any(name in s["arms"] for s in sections):
            continue
        cells = [(f"{s['arms'][name]['accuracy']['mean']:.2%} ± {100 * s['arms'][name]['accuracy']['std']:.2f} "
                  f"({s['arms'][name]['images']:,})") if name in s["arms"] else "" for s in sections]
        print(f"| {label} | " + " | ".join(cells) + " |")
    print("| the generator's gain (verdict) | " + " | ".join(
        f"{s['gain_points']:+.2f} points ({s['gain_verdict']})" for s in sections) + " |")


@app.command()
def ceiling(runs: list[Path]) -> None:
    reports = [json.loads((run / "report" / "report.json").read_text()) for run in runs]
    tables = [{row["images"].split(" (")[0]: row["spaces"]["classifier"]["frechet_over_floor"]
               for row in r["tokenizer_ceiling"]["rows"]} for r in reports]
    print("| images (x real floor, classifier features) | " + " | ".join(f"`{run.name}`" for run in runs) + " |")
    print("|---|" + "---:|" * len(runs))
    for name in dict.fromkeys(name for table in tables for name in table):
        print(f"| {name} | " + " | ".join(f"{t[name]:.1f}x" if name in t else "" for t in tables) + " |")


@app.command()
def timings(run: Path) -> None:
    last: dict[str, float] = {}
    for line in (run / "timings.log").read_text().splitlines():
        if ": " in line and " s wall" in line:
            stage, rest = line.split(": ", 1)
            last[stage] = float(rest.split(" s wall")[0])
    print("| stage | wall time |\n|---|---:|")
    for stage, seconds in last.items():
        print(f"| {stage} | {seconds / 60:.1f} min |")
    print(f"| all | {sum(last.values()) / 60:.0f} min |")


if __name__ == "__main__":
    app()
