"""--dry-run prints the plan and writes nothing; --calibrate measures the model here."""

import os

from coincide_ray import io
from coincide_ray.cli import main
from coincide_ray.corpus import write_corpus


def test_dry_run_plans_and_writes_nothing(tmp_path, tiny_model, capsys):
    base = str(tmp_path)
    write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 30, seed=2)
    out = io.join(base, "run")
    assert main(["run", "--input", io.join(base, "corpus", "records.json"), "--image-root", io.join(base, "corpus"),
                 "--model", tiny_model, "--output", out, "--layers", "1,3,4", "--clusters", "100",
                 "--dry-run", "--calibrate", "6"]) == 0
    text = capsys.readouterr().out
    assert not os.path.exists(out)
    for expected in ("records: 40;", "embed: 1 blocks of 64; 0 already written, 1 to do", "embed work:",
                     "H100-hours", "k-means memory:", "largest cluster", "select: budget", "calibration:"):
        assert expected in text, expected
    # 30 good records and 10 broken ones, of which the sample check sees the broken ones
    assert "look usable (problems:" in text and "missing image file" in text
    dimension = 2 * 3 * 32
    assert f"D = {dimension}" in text
