"""bench/tables.py writes the docs' tables from a run's report.json and timings.log."""
import json
from pathlib import Path

from conftest import ROOT, run_script
from core.report.downstream import AUGMENTED, GENERATED, REAL, SUBSET, compare, spread


def test_the_downstream_and_timing_tables_come_from_the_run(tmp_path: Path):
    run = tmp_path / "runs" / "lowdata"
    (run / "report").mkdir(parents=True)
    arms = {GENERATED: [0.70, 0.72], REAL: [0.84, 0.85], SUBSET: [0.84, 0.85], AUGMENTED: [0.81, 0.83]}
    arms = {name: {"images": 1000, "accuracy": spread(values)} for name, values in arms.items()}
    (run / "report" / "report.json").write_text(json.dumps({"downstream": {"arms": arms, **compare(arms)}}))
    (run / "timings.log").write_text("dataset: 20.0 s wall; 1 KB peak\nreport: 60.0 s wall; 1 KB peak\n"
                                     "report: 120.0 s wall; 1 KB peak\n")
    table = run_script("bench/tables.py", "downstream", run)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "| training set | `lowdata` |"
    assert "| real + generated, asked labels | 82.00% ± 1.41 (1,000) |" in lines
    assert lines[-1] == "| the generator's gain (verdict) | -2.50 points (loss) |"
    assert not any("as many real" in line for line in lines)
    timings = run_script("bench/tables.py", "timings", run).stdout.splitlines()
    assert "| report | 2.0 min |" in timings and timings[-1] == "| all | 2 min |"  # a rerun's line replaces the first


def test_the_ceiling_table_gives_each_stage_as_a_multiple_of_the_floor(tmp_path: Path):
    runs = []
    for name, autoencoder in (("tuned", 2.0), ("scratch", 30.0)):
        run = tmp_path / name
        (run / "report").mkdir(parents=True)
        rows = [{"images": images, "spaces": {"classifier": {"frechet_over_floor": value}}}
                for images, value in (("real images as stored", 1.0), ("autoencoder", autoencoder),
                                      ("codebook `l1` (2x2 patches: 16 tokens, 512 units)", 6.25), ("generated", 40.0))]
        (run / "report" / "report.json").write_text(json.dumps({"tokenizer_ceiling": {"rows": rows}}))
        runs.append(run)
    table = run_script("bench/tables.py", "ceiling", *runs)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0] == "| images (x real floor, classifier features) | `tuned` | `scratch` |"
    assert lines[3:] == ["| autoencoder | 2.0x | 30.0x |", "| codebook `l1` | 6.2x | 6.2x |", "| generated | 40.0x | 40.0x |"]


def test_every_marked_table_in_the_docs_is_what_its_run_records_say():
    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    result = run_script("bench/tables.py", "check", *docs)
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 200 and readme.count("<!-- tables: ") >= 2


def test_a_stale_table_is_named_and_refresh_rewrites_it(tmp_path: Path):
    marker = "<!-- tables: downstream docs/runs/tiny32_lowdata100 -->"
    page = tmp_path / "page.md"
    page.write_text(f"# Results\n\n{marker}\n| training set | `tiny32_lowdata100` |\n|---|---:|\n| edited | 99% |\n\nafter\n")
    stale = run_script("bench/tables.py", "check", page)
    assert stale.returncode == 1 and f"{page}:4: the downstream table differs" in stale.stderr
    assert run_script("bench/tables.py", "refresh", page).returncode == 0
    assert run_script("bench/tables.py", "check", page).returncode == 0
    text = page.read_text()
    assert "| edited |" not in text and "| the generator's gain (verdict) | -2.10 points (loss) |" in text
    assert text.startswith(f"# Results\n\n{marker}\n| training set |") and text.endswith("\n\nafter\n")


def test_the_stage_table_gives_each_stage_its_time_and_kept_figure(tmp_path: Path):
    run = tmp_path / "run"
    (run / "transformers" / "base").mkdir(parents=True)
    (run / "timings.log").write_text("dataset: 6.0 s wall; 1 KB peak\nbase transformer: 90.0 s wall; 1 KB peak\n")
    metrics = [{"step": 50, "heldout_loss": 2.5, "best_step": 50}, {"step": 100, "heldout_loss": 2.7, "best_step": 50}]
    (run / "transformers" / "base" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    lines = run_script("bench/tables.py", "stages", run).stdout.splitlines()
    assert lines[2:] == ["| dataset | 0.1 min |  |", "| base transformer | 1.5 min | step 50: held-out loss 2.500 |",
                         "| all stages, added up | 2 min | |"]
    record = tmp_path / "record"
    assert run_script("bench/tables.py", "record", run, record).returncode == 0
    assert run_script("bench/tables.py", "stages", record).stdout.splitlines() == lines
    other = tmp_path / "other"
    other.mkdir()
    (other / "timings.log").write_text("dataset: 12.0 s wall; 1 KB peak\n")
    both = run_script("bench/tables.py", "stages", run, other).stdout.splitlines()
    assert both[0] == ("| stage | wall time `run` | kept step: held-out figure `run` | wall time `other` "
                       "| kept step: held-out figure `other` |")
    assert both[2:] == ["| dataset | 0.1 min |  | 0.2 min |  |",
                        "| base transformer | 1.5 min | step 50: held-out loss 2.500 | - |  |",
                        "| all stages, added up | 2 min | | 0 min | |"]


def test_the_convergence_table_finds_where_each_curve_flattens_and_survives_the_record(tmp_path: Path):
    run = tmp_path / "run"
    (run / "autoencoder").mkdir(parents=True)
    (run / "timings.log").write_text("autoencoder: 60.0 s wall; 1 KB peak\n")
    psnr = {100: 20.0, 200: 24.0, 300: 25.9, 400: 26.0}  # 95% of the 6 dB gained is there by step 300
    metrics = [{"step": 10, "loss": 0.3}] + [{"step": s, "heldout_psnr": v, "best_step": s} for s, v in psnr.items()]
    (run / "autoencoder" / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in metrics))
    lines = run_script("bench/tables.py", "convergence", run).stdout.splitlines()
    assert lines[2:] == ["| autoencoder | held-out PSNR (dB) | 20 (step 100) | 24 (step 200) | 26 (step 400) | "
                         "step 300 of 400 |"]
    record = tmp_path / "record"
    assert run_script("bench/tables.py", "record", run, record).returncode == 0
    assert run_script("bench/tables.py", "convergence", record).stdout.splitlines() == lines


def test_a_one_run_table_of_several_runs_gives_each_under_its_name(tmp_path: Path):
    for name, seconds in (("first", 60.0), ("second", 180.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "timings.log").write_text(f"dataset: {seconds} s wall; 1 KB peak\n")
    result = run_script("bench/tables.py", "timings", tmp_path / "first", tmp_path / "second")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "`first`:" and "`second`:" in lines
    assert "| dataset | 1.0 min |" in lines and "| dataset | 3.0 min |" in lines
    assert run_script("bench/tables.py", "timings", tmp_path / "first").stdout.splitlines()[0].startswith("|")
