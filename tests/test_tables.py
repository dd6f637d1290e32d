"""bench/tables.py writes the docs' tables from a run's report.json and timings.log."""
import json
from pathlib import Path

from conftest import run_script
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
