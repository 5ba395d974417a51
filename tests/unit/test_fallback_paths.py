"""Production paths that only run when something goes wrong or the shape is unusual: stage
markers that no longer hold, a model that fails on one row of a batch, provenance that
changed, scoring work split into several tasks, and object-store errors that must not be
retried. None of these tests starts Ray."""

import json

import numpy as np
import pyarrow as pa
import pytest

from coincide_ray import io, schema
from coincide_ray.config import EmbedConfig, JobConfig
from coincide_ray.stages import finished, marker_uri, publish


def test_a_stage_is_finished_only_while_its_marker_and_files_hold(tmp_path):
    out = str(tmp_path)
    publish(out, "cluster", "key-1", {"clusters/a.bin": b"alpha", "clusters/b.bin": b"beta"}, {"objective": 1.5})
    done = finished(out, "cluster", "key-1")
    assert done.files == {"clusters/a.bin": b"alpha", "clusters/b.bin": b"beta"} and done.info == {"objective": 1.5}
    assert finished(out, "cluster", "another key") is None
    assert finished(out, "cluster") is not None  # any key
    io.remove(io.join(out, "clusters/b.bin"))
    assert finished(out, "cluster", "key-1") is None  # a file it names is gone
    publish(out, "cluster", "key-1", {"clusters/a.bin": b"alpha"})
    io.write_bytes(marker_uri(out, "cluster"), b'{"stage": "cluster", "key": "key-1", "fi')  # cut short
    assert finished(out, "cluster", "key-1") is None
    assert finished(out, "never-ran") is None


def test_write_diff_without_an_earlier_selection(tmp_path):
    from coincide_ray.pipeline import write_diff

    messages = []
    selection = pa.table({schema.SAMPLE_ID: ["a"], schema.CLUSTER: [0], schema.RANK: [0], schema.SELECTED: [True]},
                         schema=schema.SELECTION)
    got = write_diff(str(tmp_path / "no-such-run"), selection, str(tmp_path / "out"), messages.append)
    assert got == {"previous": str(tmp_path / "no-such-run"), "compared": False}
    assert not (tmp_path / "out" / schema.DIFF_PATH).exists() and "no selection to compare" in messages[0]


def test_provenance_refuses_other_layers_or_blocking_once_blocks_exist(tmp_path, tiny_checkpoint):
    from coincide_ray.embed.model import ModelError
    from coincide_ray.embed.stage import check_provenance

    out = str(tmp_path / "out")
    config = JobConfig(output=out, model=tiny_checkpoint, layers=(0, 1), embed=EmbedConfig(block_records=8))
    made = check_provenance(config, 32, out)
    assert made["layers"] == [0, 1] and made["dimension"] == 128
    # no block written yet: a failed first attempt pins nothing
    assert check_provenance(JobConfig(output=out, model=tiny_checkpoint, layers=(1,)), 32, out)["layers"] == [1]
    io.write_bytes(io.join(out, schema.EMBEDDINGS_DIR, "part-000000.parquet"), b"a block")
    with pytest.raises(ModelError, match="other layers, dimension"):
        check_provenance(config, 32, out)
    with pytest.raises(ModelError, match="other block_records"):
        check_provenance(JobConfig(output=out, model=tiny_checkpoint, layers=(1,),
                                   embed=EmbedConfig(block_records=9)), 32, out)
    assert check_provenance(JobConfig(output=out, model=tiny_checkpoint, layers=(1,)), 32, out)["layers"] == [1]


def test_many_small_clusters_are_packed_into_several_scoring_buckets():
    from coincide_ray.select.stage import BUCKET_PAIRS, plan_buckets

    side = int(np.sqrt(BUCKET_PAIRS)) // 2  # four such clusters fill one bucket
    sizes = np.array([side] * 9 + [0, 3, side * 3], dtype=np.int64)
    bucket = plan_buckets(sizes, memory_bytes=side * side * 8 * 4)
    assert bucket[9] == -1  # empty: no bucket
    assert bucket[11] != bucket[10] and list(bucket).count(bucket[11]) == 1  # too large for memory: alone
    loads = {}
    for cluster in np.flatnonzero(sizes):
        loads[bucket[cluster]] = loads.get(bucket[cluster], 0) + int(sizes[cluster]) ** 2
    assert len(loads) >= 3 and all(load <= BUCKET_PAIRS or load == int(sizes[11]) ** 2 for load in loads.values())
    assert list(bucket[:9]) == sorted(bucket[:9])  # clusters packed in id order


def test_errors_that_cannot_pass_are_not_retried(monkeypatch):
    monkeypatch.setattr(io, "BACKOFF_S", 0.0)
    calls = []

    def missing():
        calls.append(1)
        raise FileNotFoundError("s3://bucket/key")

    with pytest.raises(FileNotFoundError):
        io.retried("s3://bucket/key", "reading", missing)
    assert len(calls) == 1
    calls.clear()

    def flaky():
        calls.append(1)
        raise ConnectionResetError("reset by peer")

    with pytest.raises(io.StorageError, match="reading s3://bucket/key failed 4 times"):
        io.retried("s3://bucket/key", "reading", flaky)
    assert len(calls) == io.ATTEMPTS
    calls.clear()
    with pytest.raises(ConnectionResetError):  # local paths are never retried
        io.retried("/tmp/key", "reading", flaky)
    assert len(calls) == 1


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("m"), "llava", layers=2))


def test_a_row_the_model_fails_on_is_rejected_and_its_batch_kept(tmp_path, tiny_checkpoint):
    from coincide_ray.embed.msa import extract_msa_embeddings
    from coincide_ray.embed.preprocess import Preprocessor
    from coincide_ray.embed.stage import ModelWorker
    from coincide_ray.records import parse_record

    records = [{"id": f"t{i}", "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"},
                                                 {"from": "gpt", "value": f"{2 * i}."}]} for i in range(4)]
    (tmp_path / "r.json").write_text(json.dumps(records))
    worker = ModelWorker(tiny_checkpoint, EmbedConfig(), (0, 1), threads=1)
    pre = Preprocessor(worker.loaded.processor, image_root=None, batch_size=4, max_image_pixels=10**6)
    prepared = pre.prepare(0, [parse_record(r, f"r.json#{i}") for i, r in enumerate(records)])
    [batch] = prepared.batches
    good = {k: v.copy() for k, v in batch.inputs.items()}
    batch.inputs["input_ids"][2, -1] = 10**6  # a token id past the vocabulary: the model fails on row 2
    result = worker.embed_block(prepared)
    victim = batch.positions[2]  # the batch is in length order: its row 2 is this record
    assert result.rejected[victim].reason == "model failed" and "IndexError" in result.rejected[victim].detail
    direct = extract_msa_embeddings(worker.loaded.model, good, [0, 1])
    for row in (0, 1, 3):  # the other rows were embedded one by one: the same vectors
        assert np.allclose(result.vectors[batch.positions[row]], direct[row], atol=1e-5)
    assert result.vectors[victim] is None


def test_a_block_with_a_model_failure_is_redone_on_the_next_run(tmp_path):
    """A model failure can pass (a GPU out of memory): a part file that records one is not
    reused as finished, while other rejections, decided by the record's content, are."""
    from coincide_ray.embed.stage import EmbeddedBlock, part_signature
    from coincide_ray.records import Rejection

    def part(reason):
        block = EmbeddedBlock(0, ["a", "b"], [np.ones(4, np.float32), None], np.zeros(2, np.int32),
                              np.zeros(2, np.int32), {1: Rejection("b", "embed", reason, "r.json#1")},
                              {0: "f" * 64, 1: "e" * 64}, {}, [])
        uri = str(tmp_path / f"{reason}.parquet")
        io.write_parquet(block.table(), uri)
        return uri

    assert part_signature(part("not an image"), 4) == ([("a", "f" * 64), ("b", "e" * 64)], 1)
    assert part_signature(part("model failed"), 4) is None


def test_scoring_buckets_are_bounded_by_the_bytes_of_their_rows():
    from coincide_ray.select.stage import BUCKET_BYTES, plan_buckets

    dim = 20_480
    cap = BUCKET_BYTES // (4 * dim)  # rows per bucket at this dimension
    sizes = np.full(80, 66, dtype=np.int64)  # small clusters: kernel work alone would pack them all in one
    bucket = plan_buckets(sizes, memory_bytes=2**30, dim=dim)
    rows = np.bincount(bucket, weights=sizes)
    assert len(rows) > 1 and rows.max() <= cap
    assert np.array_equal(plan_buckets(sizes, memory_bytes=2**30), np.zeros(80, np.int64))  # no dimension: one


def test_a_shard_keeps_a_fully_accepted_file_as_its_decoded_buffer(tmp_path):
    from coincide_ray.embeddings import accepted_rows, judge, read_file

    x = np.arange(5 * 4, dtype=np.float32).reshape(5, 4)
    path = str(tmp_path / "part.parquet")
    io.write_parquet(schema.embeddings_table([f"s{i}" for i in range(5)], x), path)
    rows, values = read_file(path)
    verdict = judge([rows])
    kept = accepted_rows(rows, values, verdict.accepted[0], verdict.dim)
    assert len(kept) == len(values) == 1 and np.array_equal(kept[0], x)
    assert np.shares_memory(kept[0], values[0][1])  # no second copy of the share

    mask = np.array([True, False, True, True, False])
    dropped = accepted_rows(rows, values, mask, 4)
    assert np.array_equal(dropped[0], x[mask]) and not np.shares_memory(dropped[0], values[0][1])


def test_a_file_read_in_batches_keeps_its_rows_in_order(tmp_path, monkeypatch):
    from coincide_ray import embeddings

    monkeypatch.setattr(embeddings, "READ_BATCH_ROWS", 3)
    x = np.arange(8 * 2, dtype=np.float32).reshape(8, 2)
    vectors = [list(row) for row in x]
    vectors[4] = None  # a null vector in the second batch
    table = pa.table({schema.SAMPLE_ID: [f"s{i}" for i in range(8)],
                      schema.EMBEDDING: pa.array(vectors, pa.list_(pa.float32()))})
    path = str(tmp_path / "part.parquet")
    io.write_parquet(table, path)
    rows, values = embeddings.read_file(path)
    assert [count for count, _ in values] == [3, 3, 2] and rows.lengths.tolist() == [2, 2, 2, 2, -1, 2, 2, 2]
    verdict = embeddings.judge([rows])
    blocks = embeddings.accepted_rows(rows, values, verdict.accepted[0], verdict.dim)
    assert np.array_equal(np.concatenate(blocks), np.delete(x, 4, axis=0))


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_shard_blocks_address_rows_across_files_and_view_consecutive_runs(dtype):
    from coincide_ray.cluster.kmeans import as_tensor, normalised
    from coincide_ray.cluster.stage import Blocks

    rng = np.random.default_rng(0)
    parts = [rng.standard_normal((n, 3)).astype(dtype) for n in (4, 0, 5, 3)]
    whole = np.concatenate(parts)
    blocks = Blocks([as_tensor(part) for part in parts], 3)  # as a CPU worker keeps them: Arrow's buffers, shared
    assert len(blocks) == 12
    for rows in (np.arange(12), np.array([0, 2, 3, 4, 8, 9, 11]), np.array([5]), np.zeros(0, np.int64)):
        taken = blocks.take(rows)
        assert taken.dtype == np.float32 and np.array_equal(taken, whole[rows].astype(np.float32))
        assert np.array_equal(blocks.unit_rows(rows), normalised(whole[rows]))
        seen = np.zeros(len(rows), bool)
        for where, vectors in blocks.pieces(rows, max_rows=2):
            vectors = vectors.numpy()
            assert len(vectors) <= 2 and vectors.dtype == dtype and np.array_equal(vectors, whole[rows[where]])
            seen[where] = True
            if rows[where][-1] - rows[where][0] + 1 == len(vectors):
                assert any(np.shares_memory(vectors, part) for part in parts)  # a run is a view, not a copy
        assert seen.all()


def test_a_vector_beyond_float16_is_rejected_not_stored_as_inf():
    from coincide_ray.embed.stage import EmbeddedBlock
    from coincide_ray.records import Rejection

    vectors = [np.array([0.5, -2.0], np.float32), np.array([1e6, 0.0], np.float32), None]
    block = EmbeddedBlock(0, ["a", "b", "c"], vectors, np.zeros(3, np.int32), np.zeros(3, np.int32),
                          {2: Rejection("c", "embed", "missing image file", "x")}, {}, {}, [])
    block.reject_outside_float16()
    assert block.rejected[1].reason == "vector outside float16 range" and "float32" in block.rejected[1].detail
    assert block.rejected[2].reason == "missing image file" and 0 not in block.rejected
    table = block.table("float16")
    assert str(table.schema.field("embedding").type.value_type) == "halffloat"
    stored = table.column("embedding").to_pylist()
    assert stored[0] == [0.5, -2.0] and stored[1] is None and stored[2] is None
    assert table.column("reason").to_pylist() == [None, "vector outside float16 range", "missing image file"]
