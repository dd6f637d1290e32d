"""Markdown tables for the docs, written from runs' report.json, timings.log and metrics, so that no figure in
them drifts from its run:

    python bench/tables.py downstream runs/tiny32_lowdata100 runs/tiny32_lowdata20
    python bench/tables.py record runs/tiny32 docs/runs/tiny32       # the run's figures, kept in the repository
    python bench/tables.py check README.md docs/*.md                 # every marked table still what its runs say
    python bench/tables.py refresh README.md docs/*.md               # rewrite them

Tables: downstream (one row per arm of the report's downstream section, one column per run, mean ± standard
deviation over its seeds, then the generator's gain); ceiling (the tokenizer ceiling as multiples of the real
floor's Fréchet distance in the report classifier's features); timings (each stage's wall time, the last line of
each stage in timings.log as a rerun appends, and their sum); stages (the timings with each training stage's
best held-out figure); convergence (each training stage's held-out curve: where it flattens); summary (one row
per run: time, distance, near-copies, downstream); quality (the fp32, compressed and exported models' reports of
one run).

A run is a run folder or its record (`record`: its reports, timings.log, plan.json, the stages' best held-out
figures and held-out curves, a few tens of KB). In a markdown file, a line `<!-- tables: KIND RUN... -->` marks
the table below it as that table of those runs (paths from the repository root); `check` fails naming every
table that differs.
"""
import json
import shutil
import sys
from pathlib import Path
from typing import Annotated, Callable, Optional

import typer

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from core.eta import ELAPSED_FILE, PLAN_FILE, stage_seconds  # noqa: E402
from core.report.downstream import (AUGMENTED, CURATED, CURATED_ALONE, DISTILLED, DISTILLED_GENERATED,  # noqa: E402
                                    GENERATED, REAL, SUBSET)

ROWS = {GENERATED: "generated images alone (CAS)", CURATED_ALONE: "curated images alone (CAS)",
        REAL: "as many real images", SUBSET: "real images (the subset)",
        DISTILLED: "real images, half of each batch mixup labelled by a teacher (no generator)",
        AUGMENTED: "real + generated, asked labels", CURATED: "real + curated, curated labels",
        DISTILLED_GENERATED: "real images, half of each batch mixup of real and generated labelled by a teacher"}
REPORTS = {"report": "fp32 models", "report_compressed": "compressed models (torch, int8 weights)",
           "report_export": "export bundle (onnxruntime, no torch)"}
STAGES_FILE = "stages.json"
CURVES_FILE = "curves.json"
CURVE_METRICS = {"heldout_psnr": "held-out PSNR (dB)", "quant_mse": "quantization MSE", "heldout_loss": "held-out loss"}
MARKER = "<!-- tables: "
app = typer.Typer(add_completion=False)


# ---------------------------------------------------------------- what a run holds

def report_of(run: Path, name: str = "report") -> dict:
    return json.loads((run / name / "report.json").read_text())


def wall_time(run: Path) -> str:
    """The run's wall time: as recorded, or its stages' times added up (one at a time, that is the same)."""
    if (run / ELAPSED_FILE).exists():
        return f"{json.loads((run / ELAPSED_FILE).read_text())['elapsed_s'] / 60:.0f} min"
    return f"{sum(stage_seconds(run).values()) / 60:.0f} min"


def evaluations(run: Path) -> dict[str, list[dict]]:
    """Each training stage's held-out evaluations (its metrics.jsonl records with a best step), by the stage's
    timings.log name."""
    found = {}
    for metrics in sorted(run.glob("*/metrics.jsonl")) + sorted(run.glob("*/*/metrics.jsonl")):
        records = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
        evaluated = [r for r in records if "best_step" in r and "early_stop" not in r]
        kind, _, level = str(metrics.parent.relative_to(run)).partition("/")
        name = {"autoencoder": "autoencoder", "decoder": "decoder", "codebooks": f"codebook {level}",
                "transformers": f"{level} transformer"}.get(kind)
        if name and evaluated:
            found[name] = evaluated
    return found


def best_figures(run: Path) -> dict[str, dict]:
    """Each training stage's metrics at its kept (best) step."""
    if (run / STAGES_FILE).exists():
        return json.loads((run / STAGES_FILE).read_text())
    figures = {}
    for name, evaluated in evaluations(run).items():
        best = next((r for r in evaluated if r["step"] == evaluated[-1]["best_step"]), evaluated[-1])
        figures[name] = {k: v for k, v in best.items() if k not in ("epoch", "train_loss")}
    return figures


def curves(run: Path) -> dict[str, dict]:
    """Each training stage's held-out curve: its metric (the one its checkpoints are chosen by) at every
    evaluation."""
    if (run / CURVES_FILE).exists():
        return json.loads((run / CURVES_FILE).read_text())
    found = {}
    for name, evaluated in evaluations(run).items():
        metric = next((m for m in CURVE_METRICS if m in evaluated[-1]), None)
        if metric is not None:
            found[name] = {"metric": metric, "points": [[r["step"], r[metric]] for r in evaluated if metric in r]}
    return found


def names(runs: list[Path]) -> list[str]:
    """Each run's folder name, with its parent's where two runs share a name."""
    short = [run.name for run in runs]
    return [f"{run.parent.name}/{run.name}" if short.count(run.name) > 1 else run.name for run in runs]


def held_out(figures: dict) -> str:
    if "heldout_psnr" in figures:
        return f"held-out PSNR {figures['heldout_psnr']:.1f} dB"
    if "decoded_psnr" in figures:
        return f"decoded PSNR {figures['decoded_psnr']:.1f} dB, {figures['used_units']:,} units used"
    if "heldout_loss" in figures:
        return f"held-out loss {figures['heldout_loss']:.3f}"
    return ""


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.1f} min"


# ---------------------------------------------------------------- the tables

def downstream_table(runs: list[Path]) -> list[str]:
    sections = [report_of(run)["downstream"] for run in runs]
    lines = ["| training set | " + " | ".join(f"`{name}`" for name in names(runs)) + " |",
             "|---|" + "---:|" * len(runs)]
    for name, label in ROWS.items():
        if name == REAL or not any(name in s["arms"] for s in sections):
            continue
        cells = [(f"{s['arms'][name]['accuracy']['mean']:.2%} ± {100 * s['arms'][name]['accuracy']['std']:.2f} "
                  f"({s['arms'][name]['images']:,})") if name in s["arms"] else "" for s in sections]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append("| the generator's gain (verdict) | " + " | ".join(
        f"{s['gain_points']:+.2f} points ({s['gain_verdict']})" for s in sections) + " |")
    return lines


def ceiling_table(runs: list[Path]) -> list[str]:
    tables = [{row["images"].split(" (")[0]: row["spaces"]["classifier"]["frechet_over_floor"]
               for row in report_of(run)["tokenizer_ceiling"]["rows"]} for run in runs]
    lines = ["| images (x real floor, classifier features) | " + " | ".join(f"`{n}`" for n in names(runs)) + " |",
             "|---|" + "---:|" * len(runs)]
    for name in dict.fromkeys(name for table in tables for name in table):
        lines.append(f"| {name} | " + " | ".join(f"{t[name]:.1f}x" if name in t else "" for t in tables) + " |")
    return lines


def timings_table(run: Path) -> list[str]:
    times = stage_seconds(run)
    return (["| stage | wall time |", "|---|---:|"] + [f"| {stage} | {minutes(s)} |" for stage, s in times.items()]
            + [f"| all | {sum(times.values()) / 60:.0f} min |"])


def stages_table(runs: list[Path]) -> list[str]:
    """Each stage's wall time and kept held-out figure: a pair of columns per run (a run without the stage:
    -)."""
    times, figures = [stage_seconds(run) for run in runs], [best_figures(run) for run in runs]
    tags = [""] if len(runs) == 1 else [f" `{name}`" for name in names(runs)]
    lines = ["| stage |" + "".join(f" wall time{tag} | kept step: held-out figure{tag} |" for tag in tags),
             "|---|" + "---:|---|" * len(runs)]
    for stage in dict.fromkeys(stage for run_times in times for stage in run_times):
        cells = []
        for run_times, run_figures in zip(times, figures):
            best = run_figures.get(stage)
            kept = f"step {best['step']:,}: {held_out(best)}" if best else ""
            cells.append(f" {minutes(run_times[stage]) if stage in run_times else '-'} | {kept} |")
        lines.append(f"| {stage} |" + "".join(cells))
    lines.append("| all stages, added up |" + "".join(f" {sum(t.values()) / 60:.0f} min | |" for t in times))
    if any((run / ELAPSED_FILE).exists() for run in runs):
        lines.append("| start to end (stages side by side) |"
                     + "".join(f" {wall_time(run) if (run / ELAPSED_FILE).exists() else '-'} | |" for run in runs))
    return lines


def convergence_table(run: Path) -> list[str]:
    """Per training stage, its held-out figure at the first evaluation, at half its steps and at its end, and
    the first step with 95% of the improvement it made over the whole run: where its curve flattens."""
    lines = ["| stage | held-out figure | first evaluation | half the steps | end | 95% of the gain by |",
             "|---|---|---:|---:|---:|---:|"]
    for stage, curve in curves(run).items():
        points = curve["points"]
        higher = curve["metric"] == "heldout_psnr"
        best = (max if higher else min)(v for _, v in points)
        first, last_step = points[0][1], points[-1][0]
        half = min(points, key=lambda p: abs(p[0] - last_step / 2))
        reached = next(step for step, v in points if abs(v - first) >= 0.95 * abs(best - first))
        lines.append(f"| {stage} | {CURVE_METRICS[curve['metric']]} | {first:.4g} (step {points[0][0]:,}) | "
                     f"{half[1]:.4g} (step {half[0]:,}) | {points[-1][1]:.4g} (step {last_step:,}) | "
                     f"step {reached:,} of {last_step:,} |")
    return lines


def summary_table(runs: list[Path]) -> list[str]:
    lines = ["| run | wall time | Fréchet distance, classifier (real floor) | near-copies (real) "
             "| CAS / as many real | the generator's gain (verdict) |", "|---|---:|---:|---:|---:|---|"]
    for name, run in zip(names(runs), runs):
        report = report_of(run)
        space = "classifier" if "classifier" in report["spaces"] else "pixel_pca"
        distance = report["spaces"][space]["frechet_distance"]
        copies = report["memorization"]
        down = report["downstream"]
        cas = f"{down['cas_over_real']:.0%}" if down.get("cas_over_real") is not None else "-"
        gain = f"{down['gain_points']:+.2f} points ({down['gain_verdict']})" if "gain_points" in down else "-"
        lines.append(f"| `{name}` | {wall_time(run)} | {distance['value']:.1f} "
                     f"({distance['real_floor']:.2f}){'' if space == 'classifier' else ' pixel PCA'} | "
                     f"{copies['generated_rate']:.1%} ({copies['heldout_rate']:.0%}) | {cas} | {gain} |")
    return lines


def quality_table(run: Path) -> list[str]:
    lines = ["| images from | Fréchet distance, classifier (real floor) | recall (real floor) "
             "| Fréchet distance, pixel PCA (real floor) | near-copies |", "|---|---:|---:|---:|---:|"]
    for folder, label in REPORTS.items():
        if not (run / folder / "report.json").exists():
            continue
        report = report_of(run, folder)
        classifier = report["spaces"].get("classifier", {})
        pixels = report["spaces"]["pixel_pca"]
        cell = lambda m: f"{m['value']:.3g} ({m['real_floor']:.3g})" if m else "-"
        lines.append(f"| {label} | {cell(classifier.get('frechet_distance'))} | {cell(classifier.get('recall'))} | "
                     f"{cell(pixels['frechet_distance'])} | {report['memorization']['generated_rate']:.1%} |")
    return lines


def run_by_run(table: Callable[[Path], list[str]]) -> Callable[[list[Path]], list[str]]:
    """A table of one run as a table of runs: each run's in turn, under its name when there are several."""
    def tables(runs: list[Path]) -> list[str]:
        lines: list[str] = []
        for run in runs:
            if len(runs) > 1:
                lines += ([""] if lines else []) + [f"`{run.name}`:", ""]
            lines += table(run)
        return lines
    return tables


TABLES = {"downstream": downstream_table, "ceiling": ceiling_table, "summary": summary_table,
          "convergence": run_by_run(convergence_table), "timings": run_by_run(timings_table),
          "stages": stages_table, "quality": run_by_run(quality_table)}


# ---------------------------------------------------------------- marked tables in markdown files

def marked_tables(text: str) -> list[tuple[int, int, list[str]]]:
    """(first, end, the marker's words) of each marked table: lines[first:end] are the table's lines."""
    lines, found = text.splitlines(), []
    for i, line in enumerate(lines):
        if line.startswith(MARKER) and line.rstrip().endswith("-->"):
            end = i + 1
            while end < len(lines) and lines[end].startswith("|"):
                end += 1
            found.append((i + 1, end, line[len(MARKER):].rstrip()[:-3].split()))
    return found


def expected(words: list[str]) -> list[str]:
    kind, runs = words[0], [ROOT / w for w in words[1:]]
    if kind not in TABLES or not runs:
        raise SystemExit(f"a marker names table '{kind}' with {len(runs)} runs; tables: {', '.join(TABLES)}")
    return TABLES[kind](runs)


@app.command()
def check(files: list[Path]) -> None:
    stale = []
    for path in files:
        text = path.read_text()
        for first, end, words in marked_tables(text):
            if text.splitlines()[first:end] != expected(words):
                stale.append(f"{path}:{first + 1}: the {words[0]} table differs from {' '.join(words[1:])}")
    if stale:
        print("\n".join(stale + ["(python bench/tables.py refresh FILES rewrites them)"]), file=sys.stderr)
        raise SystemExit(1)


@app.command()
def refresh(files: list[Path]) -> None:
    for path in files:
        lines = path.read_text().splitlines()
        for first, end, words in reversed(marked_tables(path.read_text())):
            lines[first:end] = expected(words)
        path.write_text("\n".join(lines) + "\n")


@app.command()
def record(run: Path, dest: Path, elapsed_s: Annotated[Optional[float], typer.Option(
        help="the run's wall time from start to end, when its stages ran side by side")] = None) -> None:
    """Keep a run's figures: its reports' report.json, its timings.log and its stages' best figures."""
    dest.mkdir(parents=True, exist_ok=True)
    if elapsed_s is not None:
        (dest / ELAPSED_FILE).write_text(json.dumps({"elapsed_s": elapsed_s}) + "\n")
    for folder in REPORTS:
        if (run / folder / "report.json").exists():
            (dest / folder).mkdir(exist_ok=True)
            shutil.copy(run / folder / "report.json", dest / folder / "report.json")
    shutil.copy(run / "timings.log", dest / "timings.log")
    if (run / PLAN_FILE).exists():  # the work its stages did: estimate.py times later chains by this record
        shutil.copy(run / PLAN_FILE, dest / PLAN_FILE)
    (dest / STAGES_FILE).write_text(json.dumps(best_figures(run), indent=1) + "\n")
    (dest / CURVES_FILE).write_text(json.dumps(curves(run)) + "\n")


def printer(kind: str):
    def show(runs: list[Path]) -> None:
        print("\n".join(TABLES[kind](runs)))
    show.__name__ = kind
    return show


for kind in TABLES:
    app.command(name=kind)(printer(kind))

if __name__ == "__main__":
    app()
