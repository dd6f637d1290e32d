"""The chain's wall time, estimated before it trains: each stage's time in a recorded run of the same preset
(a docs/runs/ record with its plan.json), scaled by the work planned here against the work planned there
(training steps, images) and by this machine's speed on one core against the recorded machine's: the time of a
training step of the tiny preset's autoencoder and cascade transformer (core.probe). A matrix product alone
misleads: a 512x512 product in bfloat16 ran 4.5x faster on a 2-core Xeon with AMX units than on a 2-core Zen 4
with AVX512-BF16, the models' training steps 1.3 to 1.6x (bench/precision.py on both), and the chain 1.2x.

A plan lists every stage of the chain with its work: a training stage's steps (its step count, or fewer when its
epoch count ends it first, as the trainer counts them), an image stage's images, or a fixed stage (pruning,
export, the reports: their work does not grow with the data here)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from core.models.augment import copies_for, passes_over
from core.models.autoencoder import AutoencoderConfig
from core.training import steps_to_take

PLAN_FILE = "plan.json"
TIMINGS_FILE = "timings.log"
ELAPSED_FILE = "elapsed.json"  # a record's wall time from start to end, when its stages ran side by side


@dataclass
class Training:
    """A training stage: at most `steps` steps and `epochs` passes over `items` items in batches of `batch`."""
    steps: int
    epochs: int
    batch: int
    items: int

    def planned_steps(self) -> int:
        batch = min(self.batch, self.items) or 1  # the trainer cuts a batch larger than the data to the data
        return steps_to_take(self.items, batch, self.epochs, self.steps)


def training_maps(training_images: int, autoencoder: Training | None, cfg: AutoencoderConfig,
                  augment_copies: int | str) -> int:
    """The feature-map stage's training maps: each training image and its augmented copies (none when the
    autoencoder's run turns augmentation off, as a short pass over a large set does)."""
    augments = cfg.augments and (autoencoder is None or passes_over(
        training_images, autoencoder.steps, autoencoder.epochs, autoencoder.batch) >= cfg.augment_min_epochs)
    return training_images * (1 + copies_for(augment_copies, training_images, augments))


def plan(work: dict[str, Training | int | None], probe_s: float) -> dict:
    """The plan.json record: each stage's work (steps, images, or None for a fixed stage) and the machine's speed
    (core.probe.probe_seconds)."""
    stages = {name: w.planned_steps() if isinstance(w, Training) else w for name, w in work.items()}
    return {"stages": stages, "probe_s": probe_s}


def stage_seconds(run: Path) -> dict[str, float]:
    """Each stage's wall time in a run's timings.log (the last line of a stage, as a rerun appends)."""
    last = {}
    for line in (run / TIMINGS_FILE).read_text().splitlines():
        if ": " in line and " s wall" in line:
            stage, rest = line.split(": ", 1)
            last[stage] = float(rest.split(" s wall")[0])
    return last


@dataclass
class Estimate:
    seconds: dict[str, float]  # per stage planned here
    unknown: list[str]  # stages the reference did not run
    overlap: float  # the reference's start-to-end time over its stages' sum (1: one at a time)
    speed: float | None  # this machine's speed over the reference machine's (None: the record has no probe)

    @property
    def added_up(self) -> float:
        return sum(self.seconds.values())


def estimate(here: dict, reference: Path) -> Estimate:
    """The stages of plan `here` timed by the run recorded in `reference` (its plan.json and timings.log)."""
    there = json.loads((reference / PLAN_FILE).read_text())
    times = stage_seconds(reference)
    speed = there["probe_s"] / here["probe_s"] if there.get("probe_s") else None
    seconds, unknown = {}, []
    for stage, work in here["stages"].items():
        if stage not in times or stage not in there["stages"]:
            unknown.append(stage)
            continue
        recorded_work = there["stages"][stage]
        scale = work / recorded_work if work is not None and recorded_work else 1.0
        seconds[stage] = times[stage] * scale / (speed or 1.0)
    elapsed = reference / ELAPSED_FILE
    overlap = (json.loads(elapsed.read_text())["elapsed_s"] / sum(times.values())) if elapsed.exists() else 1.0
    return Estimate(seconds, unknown, overlap, speed)


def minutes(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds >= 90 else f"{seconds:.0f} s"


def summary(result: Estimate, reference: Path, side_by_side: bool) -> str:
    """The lines printed at the chain's start."""
    longest = sorted(result.seconds.items(), key=lambda item: -item[1])[:4]
    lines = [f"estimate: the stages add up to about {minutes(result.added_up)} on this machine"
             + (f", about {minutes(result.added_up * result.overlap)} start to end with stages side by side"
                if side_by_side and result.overlap < 1 else "")
             + f" (from {reference}, scaled by the work planned here and "
             + (f"by this machine's speed at training steps, {result.speed:.2f}x the recorded one's)" if result.speed
                else "not by this machine's speed: the record has none)"),
             "estimate: longest " + ", ".join(f"{stage} {minutes(s)}" for stage, s in longest)]
    if result.unknown:
        lines.append(f"estimate: not in the record, so not counted: {', '.join(result.unknown)}")
    return "\n".join(lines)
