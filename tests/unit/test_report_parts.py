import json

import numpy as np
import pyarrow as pa

from coincide_ray import schema
from coincide_ray.report import bars, in_process_labels, label_figures, label_warning, scatter, table



def labelled(tmp_path, fields):
    """label_figures' first two arguments for the records file the test wrote."""
    return in_process_labels(str(tmp_path / "records.json"), fields), fields

def test_label_figures_match_a_direct_count(tmp_path):
    rng = np.random.default_rng(0)
    n = 300
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    records = [{"id": f"r{i}", "conversations": turns, "concept": ["a", "b", "c"][i % 3],
                "skill": ["x", "y"][rng.integers(2)]} for i in range(n)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    cluster = rng.integers(0, 5, n)
    selected = rng.random(n) < 0.2
    selection = pa.table({schema.SAMPLE_ID: [r["id"] for r in records], schema.CLUSTER: cluster,
                          schema.RANK: np.zeros(n, np.int64), schema.SELECTED: selected})
    got = label_figures(*labelled(tmp_path, ["concept", "skill"]), selection)
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


def labelled_corpus(tmp_path, n, has_label):
    rng = np.random.default_rng(1)
    turns = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    records = [{"id": f"r{i}", "conversations": turns, **({"concept": ["a", "b", "c"][i % 3]} if has_label(i) else {})}
               for i in range(n)]
    (tmp_path / "records.json").write_text(json.dumps(records))
    cluster = rng.integers(0, 4, n)
    selected = rng.random(n) < 0.3
    selection = pa.table({schema.SAMPLE_ID: [r["id"] for r in records], schema.CLUSTER: cluster,
                          schema.RANK: np.zeros(n, np.int64), schema.SELECTED: selected})
    return records, cluster, selected, selection


def test_a_field_no_record_has_gives_no_figures_and_one_warning(tmp_path):
    # a mistyped --label-field: no made-up label, so no "perfect purity" over one group of "-"
    _, _, _, selection = labelled_corpus(tmp_path, 60, lambda i: True)
    got = label_figures(*labelled(tmp_path, ["nosuchfield"]), selection)
    assert got["labelled"] == 0 and got["records"] == 60
    assert "purity" not in got and "groups" not in got
    warning = label_warning(got)
    assert "nosuchfield" in warning and "no record has it" in warning and "\n" not in warning


def test_figures_count_only_the_records_that_have_the_label(tmp_path):
    n = 90
    records, cluster, selected, selection = labelled_corpus(tmp_path, n, lambda i: i % 3 != 0)
    got = label_figures(*labelled(tmp_path, ["concept"]), selection)
    kept = [i for i in range(n) if "concept" in records[i]]
    assert got["labelled"] == len(kept) == 60 and got["records"] == n
    label = {i: records[i]["concept"] for i in kept}
    purity = sum(max(sum(1 for i in kept if cluster[i] == c and label[i] == g) for g in set(label.values()))
                 for c in {int(cluster[i]) for i in kept}) / len(kept)
    assert abs(got["purity"] - purity) < 1e-12
    assert got["groups"] == len(set(label.values())) == 2  # "a" (i % 3 == 0) is never labelled
    assert sum(v["records"] for v in got["per_group"].values()) == len(kept)
    assert sum(v["random"] for v in got["per_group"].values()) == sum(selected[i] for i in kept)
    assert "only 60 of 90 records" in label_warning(got)
    _, _, _, everyone = labelled_corpus(tmp_path, 30, lambda i: True)
    assert label_warning(label_figures(*labelled(tmp_path, ["concept"]), everyone)) is None


def test_plots_are_svg_with_marks_and_say_when_empty():
    svg = bars(np.array([3.0, 1.0, 0.0]), "t", "x", "y")
    assert svg.count("<rect") == 3 and 'class="plot"' in svg
    assert scatter(np.array([1.0, np.nan]), np.array([2.0, 3.0]), "t", "x", "y").count("<circle") == 1
    assert "(no data)" in scatter(np.zeros(0), np.zeros(0), "t", "x", "y")


def test_nested_figures_are_tables_not_python_reprs():
    page = table({"rejected_by_reason": {"missing image file": 3, "not an image": 1}, "warnings": ["a", "b"],
                  "budget": 7, "empty": {}})
    assert "{" not in page and "[" not in page
    assert "<tr><th>missing image file</th><td>3</td></tr>" in page and "a<br>b" in page


def test_the_projection_reads_only_its_sample_of_vectors(tmp_path, monkeypatch):
    """Whole embeddings files are never read or turned into Python lists: at D = 20,480 that
    took 11 GB and most of a run's time. Every vector the report reads is counted."""
    import pyarrow.parquet as pq

    from coincide_ray import io, report
    from coincide_ray.toy.synthetic import planted_embeddings

    x, _ = planted_embeddings(900, num_layers=2, hidden=8, seed=1)
    ids = [f"r{i}" for i in range(900)]
    for part in range(3):  # small row groups: rows that are not sampled are not even decoded
        pq.write_table(schema.embeddings_table(ids[part * 300:(part + 1) * 300], x[part * 300:(part + 1) * 300]),
                       tmp_path / f"part-{part}.parquet", row_group_size=50)
    selection = pa.table({schema.SAMPLE_ID: ids, schema.CLUSTER: np.zeros(900, np.int64),
                          schema.RANK: np.zeros(900, np.int64), schema.SELECTED: np.arange(900) % 5 == 0})
    read = []
    for name in ("read_parquet", "read_parquet_rows"):
        original = getattr(io, name)

        def counting(*args, _original=original, **kwargs):
            table = _original(*args, **kwargs)
            if schema.EMBEDDING in table.schema.names:
                read.append(table.num_rows)
            return table

        monkeypatch.setattr(io, name, counting)
    monkeypatch.setattr(report, "SAMPLE_ROWS", 120)
    got_ids, vectors = report.embedding_sample(str(tmp_path), selection, rows=120)
    assert sum(read) == 120 and vectors.shape == (120, 32) and vectors.dtype == np.float32
    position = {sample_id: i for i, sample_id in enumerate(ids)}
    assert np.array_equal(vectors, x[[position[i] for i in got_ids]])  # the right rows, in order
    assert got_ids == sorted(got_ids, key=position.get)
    svg = report.projection(str(tmp_path), selection)
    assert svg.count("<circle") == 120 and sum(read) == 240
