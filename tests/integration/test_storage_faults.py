"""Transient S3 errors are retried and change nothing; a permanent one is one line naming
the object. The faults come from the proxy in front of the S3 endpoint (faulty_s3.py)."""

import pytest
from embeddings_corpus import write_corpus

from coincide_ray import io, schema
from coincide_ray.cli import main

CONTRACT = [schema.CENTROIDS_PATH, schema.ASSIGNMENTS_PATH, schema.SUMMARY_PATH, schema.SELECTION_PATH,
            schema.REJECTED_PATH]


def select(emb_uri, out):
    return main(["select", "--embeddings", emb_uri, "--output", out, "--layers", "3,7", "--clusters", "6",
                 "--iterations", "8", "--fraction", "0.25"])


def test_a_run_through_faults_equals_a_run_without(s3_endpoint, faults):
    base = "s3://coincide-test/faults"
    emb_uri, *_ = write_corpus(base, n=600)
    assert select(emb_uri, io.join(base, "clean")) == 0
    faults.fault_every = 3  # a third of all requests fail once
    before = dict(faults.injected)
    assert select(emb_uri, io.join(base, "faulty")) == 0
    faults.fault_every = 0
    injected = {kind: faults.injected[kind] - before[kind] for kind in before}
    assert all(count > 0 for count in injected.values()), injected  # 503s, 500s and cut bodies all happened
    for path in CONTRACT:
        assert io.read_bytes(io.join(base, "faulty", path)) == io.read_bytes(io.join(base, "clean", path)), path


def test_a_permanent_error_names_the_object(s3_endpoint, faults, capsys):
    base = "s3://coincide-test/permanent"
    emb_uri, *_ = write_corpus(base, n=60)
    faults.always_fail = "permanent/emb/part-a"
    assert select(emb_uri, io.join(base, "out")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("coincide-ray: error:") and f"{emb_uri}/part-a.parquet failed" in err[-1]
    assert not io.exists(io.join(base, "out", schema.MANIFEST_PATH))


def test_credentials_never_reach_outputs_or_logs(s3_endpoint, capsys):
    import os

    base = "s3://coincide-test/secrets"
    emb_uri, *_ = write_corpus(base, n=120)
    assert select(emb_uri, io.join(base, "out")) == 0
    secrets = [os.environ["AWS_SECRET_ACCESS_KEY"].encode(), os.environ["AWS_ACCESS_KEY_ID"].encode()]
    logs = capsys.readouterr()
    written = io.list_files(io.join(base, "out"), ("",))
    assert len(written) >= 7  # the contract files, the stage markers and the manifest
    for blob in [logs.out.encode(), logs.err.encode()] + [io.read_bytes(path) for path in written]:
        assert not any(secret in blob for secret in secrets)


@pytest.mark.slow
def test_embedding_through_faults_equals_embedding_without(s3_endpoint, faults, tmp_path, tiny_model):
    from test_embed_stage import job_yaml

    from coincide_ray.toy.corpus import write_corpus as write_records

    base = "s3://coincide-test/embed-faults"
    write_records(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 24, seed=4)

    def run(out):
        return main(["run", "--input", io.join(base, "corpus", "records.json"), "--image-root",
                     io.join(base, "corpus"), "--model", tiny_model, "--output", io.join(base, out),
                     "--layers", "1,3,4", "--clusters", "3", "--iterations", "5",
                     "--config", job_yaml(tmp_path, out, block_records=8, batch_size=4)])

    assert run("clean") == 0
    faults.fault_every = 3
    before = dict(faults.injected)
    assert run("faulty") == 0
    faults.fault_every = 0
    assert all(faults.injected[kind] > before[kind] for kind in before), faults.injected
    for path in CONTRACT + [schema.SELECTED_RECORDS_PATH]:
        assert io.read_bytes(io.join(base, "faulty", path)) == io.read_bytes(io.join(base, "clean", path)), path
    parts = [p.rsplit("/", 1)[1] for p in io.list_files(io.join(base, "clean", "embeddings"), (".parquet",))]
    for name in parts:
        assert io.read_bytes(io.join(base, "faulty", "embeddings", name)) == \
            io.read_bytes(io.join(base, "clean", "embeddings", name)), name
    rejected = io.read_parquet(io.join(base, "faulty", schema.REJECTED_PATH)).column(schema.REASON).to_pylist()
    assert "image not readable" not in " ".join(rejected)  # no record lost to a transient fault


def test_missing_credentials_are_one_line_at_once(s3_endpoint, tmp_path, capsys, monkeypatch):
    # no credentials anywhere: an error that no retry can mend, said at once (was 4 tries, 43 s)
    import time

    import s3fs

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setattr(io, "BACKOFF_S", 5.0)  # a retry would now cost 35 s: the test sees whether one is made
    s3fs.S3FileSystem.clear_instance_cache()
    began = time.monotonic()
    try:
        code = main(["select", "--embeddings", "s3://coincide-test/secrets/nothing", "--output", str(tmp_path / "o")])
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "credentials" in err[0].lower(), err[-3:]
    assert time.monotonic() - began < 15


def test_an_unchanged_rerun_and_an_unchanged_refresh_read_no_image(s3_endpoint, faults, tmp_path, tiny_model):
    """Through the counting proxy: the first run GETs every image; an embed rerun into the
    same output and a --previous refresh into a new one over the same corpus GET none, and
    the rerun does not read the records file again: an image's content key is its ETag,
    asked for by HEAD, and the records come from their shards."""
    from test_embed_stage import job_yaml

    from coincide_ray.toy.corpus import write_corpus as write_records

    base = "s3://coincide-test/unchanged-gets"
    write_records(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 24, seed=6)

    def embed(out, *extra):
        return main(["embed", "--input", io.join(base, "corpus", "records.json"), "--image-root",
                     io.join(base, "corpus"), "--model", tiny_model, "--output", io.join(base, out),
                     "--layers", "1,3,4", *extra, "--config", job_yaml(tmp_path, out, block_records=8, batch_size=4)])

    def gets(part):
        return sum(n for (method, path), n in faults.calls.items() if method == "GET" and part in path)

    faults.calls.clear()
    assert embed("first") == 0
    images = len(io.list_files(io.join(base, "corpus", "images"), (".png",)))
    assert gets("/unchanged-gets/corpus/images/") >= images - 3 and gets("/corpus/records.json") >= 1
    faults.calls.clear()
    assert embed("first") == 0
    assert gets("/unchanged-gets/corpus/") == 0, faults.calls
    assert embed("night", "--previous", io.join(base, "first")) == 0
    assert gets("/unchanged-gets/corpus/images/") == 0, faults.calls
    for name in [p.rsplit("/", 1)[1] for p in io.list_files(io.join(base, "first", "embeddings"), (".parquet",))]:
        night, first = (io.read_parquet(io.join(base, out, "embeddings", name)) for out in ("night", "first"))
        assert night.column(schema.EMBEDDING).equals(first.column(schema.EMBEDDING)), name
