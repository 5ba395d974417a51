import json

import numpy as np
import pyarrow as pa

from coincide_ray import schema
from coincide_ray.report import bars, label_figures, scatter


def test_label_figures_match_a_direct_count(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    records = [{"id": f"r{i}", "concept": ["a", "b", "c"][i % 3], "skill": ["x", "y"][rng.integers(2)]}
               for i in range(n)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    cluster = rng.integers(0, 5, n)
    selected = rng.random(n) < 0.2
    selection = pa.table({schema.SAMPLE_ID: [r["id"] for r in records], schema.CLUSTER: cluster,
                          schema.RANK: np.zeros(n, np.int64), schema.SELECTED: selected})
    got = label_figures(str(tmp_path / "records.json"), ["concept", "skill"], selection)
    label = [f"{r['concept']}/{r['skill']}" for r in records]
    purity = sum(max(sum(1 for i in range(n) if cluster[i] == c and label[i] == g) for g in set(label))
                 for c in set(cluster.tolist())) / n
    assert abs(got["purity"] - purity) < 1e-12
    assert got["groups"] == len(set(label))
    for g in set(label):
        assert got["per_group"][g]["records"] == label.count(g)
        assert got["per_group"][g]["selected"] == sum(1 for i in range(n) if selected[i] and label[i] == g)
    assert sum(v["random"] for v in got["per_group"].values()) == selected.sum()  # a subset of the same size
    assert got["groups_covered_by_selection"] == len({label[i] for i in range(n) if selected[i]})


def test_plots_are_svg_with_marks_and_say_when_empty():
    svg = bars(np.array([3.0, 1.0, 0.0]), "t", "x", "y")
    assert svg.count("<rect") == 3 and 'class="plot"' in svg
    assert scatter(np.array([1.0, np.nan]), np.array([2.0, 3.0]), "t", "x", "y").count("<circle") == 1
    assert "(no data)" in scatter(np.zeros(0), np.zeros(0), "t", "x", "y")
