"""The quality report: generated images against real ones, in a classifier's feature space and a pixel-PCA
space. Fréchet distance, precision/recall (Kynkäänniemi et al. 2019), density/coverage (Naeem et al. 2020),
a memorization check, class histograms, and 2-D projections (PCA, t-SNE). Every figure comes with its
real-vs-real floor: the same metric between two disjoint real sets of the same sizes.

Two further sections: the tokenizer ceiling (the same figures for real images passed through the
autoencoder and each codebook: how much of the distance the tokenizer alone costs), and the downstream
experiment (do the generated images teach a classifier?). Each section is a module of core/report/; a
figure that the data cannot give (no labels, too few images) is skipped and named in one line."""
from __future__ import annotations

from core.artifacts import atomic_path, atomic_write_json
from core.report import ceiling, downstream, memorization, projections, prompt_agreement, sets as report_sets, spaces
from core.report.sets import EvalArgs, load_sets
from core.training import pick_device

__all__ = ["EvalArgs", "run", "markdown", "summary_lines"]


def run(args: EvalArgs) -> dict:
    """Compute every section, draw the pictures, write report.json and report.md into out_dir."""
    track = args.progress or (lambda items, description: iter(items))
    device = pick_device(args.device)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    sets = load_sets(args)
    tokenizer = ceiling.tokenizer_for(args, sets.real, device)  # checked before anything is trained
    report = report_sets.section(args, sets)
    features = spaces.compute(args, sets, device, track)
    report.update(features.report)
    report["memorization"] = memorization.section(sets.train, sets.heldout, sets.generated, args, device, track)
    report["tokenizer_ceiling"] = ceiling.section(args, tokenizer, sets.floors[0], features, device)
    report["downstream"] = downstream.section(args.downstream_config if args.downstream else None, real=sets.real,
                                              generated=sets.all_generated, seed=args.seed, device=device, track=track,
                                              teacher=features.classifier, curated_path=args.curated_path)
    prompts = prompt_agreement.section(sets.real, args.generated_path, args.out_dir, device, args.seed,
                                       steps=args.prompt_classifier_steps,
                                       progress=lambda it: track(it, "prompt classifier"))
    if prompts is not None:  # captioned real and generated images
        report["prompts"] = prompts
    report["pictures"] = projections.section(args, sets.heldout, sets.generated, features, track)
    report["skipped"] = {**spaces.skipped(report, sets), **{
        name: report[key]["skipped"] for name, key in (("tokenizer ceiling", "tokenizer_ceiling"),
                                                       ("downstream accuracy", "downstream"))
        if "skipped" in report[key]}}
    atomic_write_json(args.out_dir / "report.json", report)
    with atomic_path(args.out_dir / "report.md") as tmp:
        tmp.write_text(markdown(report))
    return report


def summary_lines(report: dict) -> list[str]:
    """The figures a user reads first, plain text (report.md's top and the console summary)."""
    lines = memorization.summary_lines(report["memorization"]) + downstream.summary_lines(report["downstream"])
    if report["skipped"]:
        lines.append("Skipped: " + "; ".join(f"{what} ({why})" for what, why in report["skipped"].items()) + ".")
    return lines


def markdown(report: dict) -> str:
    lines = ["# Quality report", ""]
    for line in summary_lines(report):
        lines += [f"**{line}**" if line.startswith("WARNING") else line, ""]
    lines += report_sets.markdown(report)
    lines += spaces.markdown(report)
    lines += ceiling.markdown(report["tokenizer_ceiling"])
    lines += downstream.markdown(report["downstream"])
    lines += spaces.classes_markdown(report)
    lines += prompt_agreement.markdown(report.get("prompts"))
    lines += memorization.markdown(report["memorization"])
    lines += projections.markdown(report["pictures"])
    return "\n".join(lines)
