"""embeddings.judge: which rows of the embeddings files go on to clustering, and why not."""

import numpy as np
import pyarrow as pa
import pytest

from coincide_ray import io, schema
from coincide_ray.embed.reuse import PreviousVectors
from coincide_ray.embeddings import FileRows, MixedDimensionsError, judge


def rows(path, ids, lengths, finite=None, earlier=None):
    n = len(ids)
    return FileRows(path, list(ids), np.array(lengths, np.int64),
                    np.ones(n, bool) if finite is None else np.array(finite, bool), earlier or [None] * n)


def reasons(verdict):
    return [(sample_id, reason) for sample_id, _, reason, _ in verdict.rejected]


def test_every_row_accepted_or_rejected_with_its_reason():
    files = [rows("a", ["x", None, "y", "z"], [4, 4, -1, 4], finite=[True, True, True, False]),
             rows("b", ["w", "v"], [4, 4], earlier=[None, ("embed", "missing image file", "r.json#3")])]
    verdict = judge(files)
    assert verdict.dim == 4 and verdict.ids == ["x", "w"]
    assert reasons(verdict) == [("a#1", "missing sample_id"), ("y", "missing embedding"),
                                ("z", "embedding holds NaN or inf"), ("v", "missing image file")]
    assert [m.tolist() for m in verdict.accepted] == [[True, False, False, False], [True, False]]
    assert verdict.records == 6


def test_a_rejected_first_copy_does_not_reject_the_good_second_copy():
    files = [rows("a", ["x", "y", "q"], [4, 3, 4], finite=[False, True, True]),
             rows("b", ["x", "y", "x", "q"], [4, 4, 4, 4])]
    verdict = judge(files)
    assert verdict.ids == ["q", "x", "y"]  # the first good copy of each id is the one kept
    assert reasons(verdict) == [("x", "embedding holds NaN or inf"), ("y", "wrong embedding dimension"),
                                ("x", "duplicate sample_id"), ("q", "duplicate sample_id")]
    duplicate_x = verdict.rejected[2]
    assert "first at b#0" in duplicate_x[3]


def test_the_dimension_is_the_majority_or_the_one_recorded():
    stray = rows("a-stray", ["s1", "s2"], [8, 8])
    good = rows("b", [f"g{i}" for i in range(40)], [16] * 40)
    verdict = judge([stray, good])
    assert verdict.dim == 16 and len(verdict.ids) == 40
    assert reasons(verdict) == [("s1", "wrong embedding dimension"), ("s2", "wrong embedding dimension")]
    recorded = judge([stray, good], dim=8)  # the provenance says what the embed stage made
    assert recorded.dim == 8 and recorded.ids == ["s1", "s2"]


def test_a_mix_without_a_majority_is_refused_in_one_line():
    with pytest.raises(MixedDimensionsError, match="16: 3 rows, 8: 3 rows"):
        judge([rows("a", ["a", "b", "c"], [8, 8, 8]), rows("b", ["d", "e", "f"], [16, 16, 16])])


def test_reuse_prefers_the_same_ids_vector_over_a_content_twin(tmp_path):
    run = str(tmp_path / "run")
    twin = "ab" * 32  # one fingerprint for two records with the same content
    vectors = np.array([[1.0, 0.0], [0.999, 0.001], [0.0, 1.0]], np.float32)
    table = schema.embeddings_table(["first", "second", "other"], vectors)
    table = table.append_column(schema.FINGERPRINT, pa.array([twin, twin, "cd" * 32]))
    io.write_parquet(table, io.join(run, "embeddings", "part-000000.parquet"))
    previous = PreviousVectors.of_run(run)
    assert previous.find(twin, "second")[1] == 1 and previous.find(twin, "first")[1] == 0
    assert previous.find(twin, "renamed")[1] in (0, 1)  # no vector of its own: a twin's serves
    assert previous.find("ef" * 32, "first") is None
