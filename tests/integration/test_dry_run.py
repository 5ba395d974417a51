"""--dry-run prints the plan and writes nothing; --calibrate measures the model here."""

import os

from coincide_ray import io
from coincide_ray.cli import main
from coincide_ray.toy.corpus import write_corpus


def test_dry_run_plans_and_writes_nothing(tmp_path, tiny_model, capsys):
    base = str(tmp_path)
    write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 30, seed=2)
    out = io.join(base, "run")
    assert main(["run", "--input", io.join(base, "corpus", "records.json"), "--image-root", io.join(base, "corpus"),
                 "--model", tiny_model, "--output", out, "--layers", "1,3,4", "--clusters", "100",
                 "--dry-run", "--calibrate", "6"]) == 0
    text = capsys.readouterr().out
    assert not os.path.exists(out)
    for expected in ("records: 40;", "embed: 1 blocks of 256; 0 already written, 1 to do", "embed work:",
                     "H100-hours", "k-means memory:", "largest cluster", "select: budget", "calibration:"):
        assert expected in text, expected
    # 30 good records and 10 broken ones: the sample check parses every record and looks for its
    # image, so 4 fail to parse (3 paths out of the root, 1 empty conversation) and 1 has no image
    # file; the others' problems show only when decoded (corrupt, truncated, empty, bomb) or
    # deduplicated: 35 look usable, and the budget is 20% of them
    assert "records: 40; of the first 40 checked, 35 look usable" in text
    assert "missing image file" in text and "image path outside the image root" in text
    dimension = 2 * 3 * 32
    assert f"K = 100, 50 iterations, N ~ 35, D = {dimension}" in text
    assert f"rows {35 * dimension * 4 / 1e6:.1f} MB in all" in text
    assert "select: budget ~7 records (20% of ~35 accepted)" in text
    rate = float(text.split("calibration: ")[1].split(" samples/s")[0])
    assert rate > 0
