"""estimate.py and core.eta: the chain's wall time estimated before it trains, from a recorded run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import ROOT, build_dataset, run_script, script_env
from core.eta import Training, estimate, plan, summary
from core.probe import probe_seconds


def test_a_training_stage_plans_the_steps_the_trainer_will_take():
    assert Training(steps=4000, epochs=150, batch=64, items=60000).planned_steps() == 4000  # the steps end it
    assert Training(steps=4000, epochs=20, batch=64, items=1000).planned_steps() == 20 * 15  # the epochs do
    assert Training(steps=0, epochs=3, batch=10, items=95).planned_steps() == 27  # no step bound
    assert Training(steps=500, epochs=150, batch=64, items=40).planned_steps() == 150  # a batch cut to the data


def write_record(folder: Path, stages: dict, seconds: dict, probe_s: float | None, elapsed: float | None = None) -> Path:
    folder.mkdir(parents=True)
    (folder / "plan.json").write_text(json.dumps({"stages": stages, "probe_s": probe_s}))
    (folder / "timings.log").write_text("".join(f"{name}: {s} s wall; 1 KB peak\n" for name, s in seconds.items()))
    if elapsed is not None:
        (folder / "elapsed.json").write_text(json.dumps({"elapsed_s": elapsed}))
    return folder


def test_each_stage_takes_its_recorded_time_scaled_by_its_work_and_the_machine_speed(tmp_path: Path):
    record = write_record(tmp_path / "record", {"autoencoder": 4000, "generate": 1000, "report": None},
                          {"autoencoder": 800.0, "generate": 20.0, "report": 300.0}, probe_s=2.0, elapsed=900.0)
    here = plan({"autoencoder": Training(2000, 150, 64, 60000), "generate": 3000, "report": None,
                 "cascade2 transformer": Training(10, 1, 1, 10)}, probe_s=1.0)
    result = estimate(here, record)
    # half the steps, three times the images, the report as it was; a machine twice as fast
    assert result.seconds == {"autoencoder": 200.0, "generate": 30.0, "report": 150.0}
    assert result.unknown == ["cascade2 transformer"] and result.overlap == pytest.approx(900 / 1120)


@pytest.fixture
def dataset(tmp_path: Path, image_folder: Path) -> Path:
    build_dataset(image_folder, tmp_path / "data", size=16, holdout=0.25)
    return tmp_path / "data" / "dataset.json"


def test_the_estimate_line_is_printed_and_the_plan_written(tmp_path: Path, dataset: Path):
    training_images = sum(r["split"] != "heldout" for r in json.loads(dataset.read_text())["_default"].values())
    record = write_record(tmp_path / "record", {"autoencoder": 100, "fmaps": 2 * training_images, "report": None},
                          {"autoencoder": 600.0, "fmaps": 60.0, "report": 240.0}, probe_s=2.0)
    out = tmp_path / "runs" / "plan.json"
    args = ["--dataset-path", dataset, "--out", out, "--augment-copies", "3", "--train", "autoencoder=50,100,4,images",
            "--images", "fmaps=maps", "--fixed", "report", "--fixed", "export"]
    result = run_script("estimate.py", *args, "--reference", record, "--side-by-side")
    assert result.returncode == 0, result.stderr
    written = json.loads(out.read_text())
    assert written["stages"] == {"autoencoder": 50, "fmaps": 4 * training_images, "report": None, "export": None}
    assert written["probe_s"] > 0
    lines = result.stderr.splitlines()  # the console's lines go to stderr, beside the stages' progress
    assert lines[0].startswith("estimate: the stages add up to about ") and f"from {record}" in lines[0]
    # half the autoencoder's steps (300 s at the recorded speed), twice the maps (120 s), the report as it was (240 s)
    longest = [part.rsplit(" ", 2)[0] for part in lines[1].removeprefix("estimate: longest ").split(", ")]
    assert longest == ["autoencoder", "report", "fmaps"]
    assert lines[2] == "estimate: not in the record, so not counted: export"
    no_record = run_script("estimate.py", *args, "--reference", tmp_path / "none")
    assert no_record.returncode == 0 and "no record with a plan.json" in no_record.stderr


def test_a_malformed_stage_is_one_line_and_exit_2(tmp_path: Path, dataset: Path):
    result = run_script("estimate.py", "--dataset-path", dataset, "--out", tmp_path / "plan.json",
                        "--train", "autoencoder=50,100,images")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --train autoencoder=50,100,images: expected STEPS,EPOCHS,BATCH,images or maps"]
    assert not (tmp_path / "plan.json").exists()


def test_make_demo_estimates_the_chain_before_its_first_training_stage(tmp_path: Path):
    venv = Path(sys.executable).parent.parent
    result = subprocess.run(["make", "-n", "-o", f"{venv}/.installed", "demo", f"VENV={venv}", "JOBS=1",
                             f"RUNS={tmp_path / 'runs'}"], capture_output=True, text=True, timeout=60,
                            env=script_env(), cwd=ROOT)
    assert result.returncode == 0, result.stderr
    planned = [line for line in result.stdout.replace("\\\n", " ").splitlines() if "python" in line]
    first_training = next(i for i, line in enumerate(planned) if "train_autoencoder.py" in line)
    (eta,) = [line for line in planned[:first_training] if "estimate.py" in line]
    assert '--train "autoencoder=4000,150,64,images"' in eta and '--train "cascade transformer=3000,20,64,maps"' in eta
    assert "--reference docs/runs/tiny32" in eta and "--side-by-side" not in eta
    # the tiny32 preset's decoder fine-tuning is one of the fixed stages (timed by the record's)
    assert eta.count("--fixed") == 12 and "--fixed decoder" in eta and eta.count("--images") == 4


def test_a_record_without_a_machine_speed_is_not_scaled_by_one_and_says_so(tmp_path: Path):
    record = write_record(tmp_path / "record", {"report": None}, {"report": 300.0}, probe_s=None)
    result = estimate(plan({"report": None}, probe_s=1.0), record)
    assert result.seconds == {"report": 300.0} and result.speed is None
    assert "not by this machine's speed: the record has none" in summary(result, record, side_by_side=False)


def test_the_speed_probe_gives_a_time_and_the_threads_back():
    before = torch.get_num_threads()
    assert 0 < probe_seconds(steps=1, batch=2) < 60
    assert torch.get_num_threads() == before
