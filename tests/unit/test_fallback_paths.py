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
    from coincide_ray.embed.tiny import build_tiny_checkpoint

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
    result = worker({"prepared": prepared})["result"]
    assert result.rejected[2].reason == "model failed" and "IndexError" in result.rejected[2].detail
    direct = extract_msa_embeddings(worker.loaded.model, good, [0, 1])
    for row in (0, 1, 3):  # the other rows were embedded one by one: the same vectors
        assert np.allclose(result.vectors[row], direct[row], atol=1e-5)
    assert result.vectors[2] is None


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
