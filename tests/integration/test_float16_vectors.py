"""Vectors stored as float16 (the default, as the paper's authors store them): the same
selection as float32 storage on the test corpora, the float32 vectors rounded and nothing
else, and no silent mixing of the two."""

import numpy as np
import pyarrow as pa
from embeddings_corpus import write_corpus as write_embeddings

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.toy.corpus import write_corpus

SELECT = ["--clusters", "4", "--iterations", "10", "--fraction", "0.3"]


def stored(output):
    """{sample_id: stored vector} and the stored value type."""
    vectors, types = {}, set()
    for path in io.list_files(io.join(output, schema.EMBEDDINGS_DIR), (".parquet",)):
        table = io.read_parquet(path)
        types.add(table.schema.field(schema.EMBEDDING).type.value_type)
        for sample_id, vector in zip(table.column(schema.SAMPLE_ID).to_pylist(),
                                     table.column(schema.EMBEDDING).to_numpy(zero_copy_only=False)):
            if vector is not None:
                vectors[sample_id] = np.asarray(vector)
    return vectors, types


def selection(output):
    table = io.read_parquet(io.join(output, schema.SELECTION_PATH))
    return table.column(schema.SAMPLE_ID).to_pylist(), table.column(schema.SELECTED).to_pylist()


def test_float16_storage_keeps_the_selection_of_the_records_corpus(tmp_path, tiny_model, ray_session, capsys):
    write_corpus(str(tmp_path / "corpus" / "records.json"), str(tmp_path / "corpus"), 40, seed=4)
    base = ["run", "--input", str(tmp_path / "corpus" / "records.json"), "--image-root", str(tmp_path / "corpus"),
            "--model", tiny_model, "--layers", "1,3", *SELECT]
    wide, half = str(tmp_path / "float32"), str(tmp_path / "float16")
    config = tmp_path / "float32.yaml"
    config.write_text("embed:\n  vector_dtype: float32\n")
    assert main(base + ["--output", wide, "--config", str(config)]) == 0
    assert main(base + ["--output", half]) == 0  # the default

    wide_vectors, wide_types = stored(wide)
    half_vectors, half_types = stored(half)
    assert wide_types == {pa.float32()} and half_types == {pa.float16()}
    assert wide_vectors.keys() == half_vectors.keys() and len(half_vectors) > 30
    for sample_id, vector in wide_vectors.items():  # the same model outputs, rounded once
        assert np.array_equal(half_vectors[sample_id], vector.astype(np.float16))
    assert selection(half) == selection(wide)
    assert sum(selection(half)[1]) > 0
    assert io.read_json(io.join(half, schema.PROVENANCE_PATH))["dtype"] == "float16"

    # float16 vectors are never reused into float32 output: a fresh run would store more
    again = str(tmp_path / "float32-again")
    capsys.readouterr()
    assert main(base + ["--output", again, "--config", str(config), "--previous", half]) == 0
    assert "embed: 0 vectors of" in capsys.readouterr().err
    assert stored(again)[0].keys() == wide_vectors.keys()
    assert all(np.array_equal(stored(again)[0][k], v) for k, v in wide_vectors.items())

    # an output made with one storage type refuses the other, in one line
    assert main(base + ["--output", half, "--config", str(config)]) == 2
    assert "made with other dtype" in capsys.readouterr().err


def test_float16_storage_keeps_the_selection_of_the_planted_corpus(storage):
    emb_uri, vectors, ids, accepted_rows, bad = write_embeddings(storage)
    half_uri = io.join(storage, "embeddings-float16")
    for path in io.list_files(emb_uri, (".parquet",)):
        table = io.read_parquet(path)
        column = table.column(schema.EMBEDDING).cast(pa.list_(pa.float16()))
        table = table.set_column(table.schema.get_field_index(schema.EMBEDDING), schema.EMBEDDING, column)
        io.write_parquet(table, io.join(half_uri, path.rsplit("/", 1)[-1]))
    for source, out in ((emb_uri, "wide"), (half_uri, "half")):
        assert main(["select", "--embeddings", source, "--output", io.join(storage, out), "--layers", "3,7",
                     "--clusters", "6", *SELECT[2:]]) == 0
    assert selection(io.join(storage, "half")) == selection(io.join(storage, "wide"))
    rejected = [io.read_parquet(io.join(storage, out, schema.REJECTED_PATH)).to_pydict() for out in ("wide", "half")]
    assert sorted(rejected[0][schema.REASON]) == sorted(rejected[1][schema.REASON])
