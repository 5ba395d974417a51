"""jobs/reproduce.py --quick: the miniature of the paper's table, end to end at toy size."""

import re
import subprocess
import sys
from pathlib import Path

JOBS = Path(__file__).resolve().parents[2] / "jobs"


def test_reproduce_quick_prints_every_row(tmp_path):
    out = subprocess.run([sys.executable, str(JOBS / "reproduce.py"), "--quick", "--output", str(tmp_path)],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {line.split("|")[1].strip(): line for line in out.stdout.splitlines() if line.startswith("| ")}
    expected = {"coincide", "no-transfer", "no-density", "uniform", "coincide-random-within", "random (seed 1)",
                "random (seed 2)", "random (seed 3)", "full data"}
    assert expected <= set(rows), sorted(rows)
    for name in expected:
        cells = [c.strip() for c in rows[name].split("|")[2:-1]]
        assert int(cells[0]) > 0 and all(re.fullmatch(r"\d+\.\d+", c) for c in cells[1:-1]), rows[name]
        assert re.fullmatch(r"\d+ of \d+", cells[-1])
    assert rows["full data"].split("|")[-3].strip() == "100.0"  # Rel. of full data to itself
    budget = int(0.2 * 150)  # the quick corpus: 150 training records, 20%
    assert int(rows["random (seed 1)"].split("|")[2]) == budget >= int(rows["coincide"].split("|")[2])
    assert int(rows["full data"].split("|")[2]) == 150
