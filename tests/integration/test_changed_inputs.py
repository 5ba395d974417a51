"""Reruns into an existing output after the inputs changed: every reuse is decided by
content, so the result is what a fresh output gives, or the run refuses in one line."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from test_embed_stage import job_yaml

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.toy.corpus import write_corpus

CONTRACT = [schema.CENTROIDS_PATH, schema.ASSIGNMENTS_PATH, schema.SUMMARY_PATH, schema.SELECTION_PATH,
            schema.REJECTED_PATH, schema.SELECTED_RECORDS_PATH]


def contract(output):
    return {path: io.read_bytes(io.join(output, path)) for path in CONTRACT}


def run_args(base, tmp_path, model, output, records="records.json"):
    return ["run", "--input", io.join(base, "corpus", records), "--image-root", io.join(base, "corpus"),
            "--model", model, "--output", output, "--layers", "1,3", "--clusters", "3", "--iterations", "4",
            "--fraction", "0.4", "--config", job_yaml(tmp_path, "job", block_records=4, batch_size=2)]


@pytest.mark.slow
def test_a_changed_input_rerun_into_the_same_output_equals_a_fresh_output(tmp_path, tiny_model):
    base = str(tmp_path)
    records = write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 18, seed=4,
                           broken=False)
    out = io.join(base, "out")
    assert main(run_args(base, tmp_path, tiny_model, out)) == 0

    # one record removed (every later block shifts), one answer changed, the last block gone
    changed = records[:5] + records[6:]
    changed[9] = {**changed[9], "conversations": [changed[9]["conversations"][0],
                                                  {"from": "gpt", "value": "A different answer."}]}
    changed = changed[:16]
    io.write_bytes(io.join(base, "corpus", "records.json"), json.dumps(changed).encode())
    assert main(run_args(base, tmp_path, tiny_model, out)) == 0
    fresh = io.join(base, "fresh")
    assert main(run_args(base, tmp_path, tiny_model, fresh)) == 0
    assert contract(out) == contract(fresh)
    manifest = io.read_json(io.join(out, schema.MANIFEST_PATH))
    assert manifest["counts"]["records"] == len(changed)
    parts = sorted(p for p in os.listdir(os.path.join(out, "embeddings")) if p.endswith(".parquet"))
    assert parts == sorted(p for p in os.listdir(os.path.join(fresh, "embeddings")) if p.endswith(".parquet"))
    assert len(parts) == 4  # the stale fifth block is gone
    selection = io.read_parquet(io.join(out, schema.SELECTION_PATH)).column(schema.SAMPLE_ID).to_pylist()
    assert records[5]["id"] not in selection and records[17]["id"] not in selection

    # a part file cut short is not finished: it is redone, and only it
    part = os.path.join(out, "embeddings", "part-000002.parquet")
    whole = open(part, "rb").read()
    open(part, "wb").write(whole[: len(whole) // 2])
    others = {p: os.stat(os.path.join(out, "embeddings", p)).st_mtime_ns for p in parts if p != "part-000002.parquet"}
    assert main(run_args(base, tmp_path, tiny_model, out)) == 0
    assert open(part, "rb").read() == whole
    assert {p: os.stat(os.path.join(out, "embeddings", p)).st_mtime_ns for p in others} == others
    assert contract(out) == contract(fresh)

    # a byte-identical copy of the checkpoint (new file times) is the same model
    copy = str(tmp_path / "model-copy")
    shutil.copytree(tiny_model, copy, copy_function=shutil.copy)
    assert main(run_args(base, tmp_path, copy, out)) == 0
    assert contract(out) == contract(fresh)


def test_a_model_without_processor_files_is_refused_before_anything_is_written(tmp_path, tiny_model, capsys):
    base = str(tmp_path)
    write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 4, seed=1, broken=False)
    broken = tmp_path / "no-processor"
    broken.mkdir()
    for name in os.listdir(tiny_model):
        if name == "config.json" or name.endswith(".safetensors"):
            shutil.copy(os.path.join(tiny_model, name), broken / name)
    out = io.join(base, "out")
    assert main(run_args(base, tmp_path, str(broken), out)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("coincide-ray: error:") and "processor" in err[-1]
    assert len(err) <= 2 and not any("Traceback" in line for line in err)
    assert not os.path.exists(os.path.join(out, "embeddings"))  # nothing pins the output
    assert main(run_args(base, tmp_path, tiny_model, out)) == 0  # the repaired model is accepted


def flat_parquet(path, ids, vectors):
    """Uncompressed, no dictionary: the file's size depends only on the shapes."""
    table = schema.embeddings_table(ids, vectors)
    pq.write_table(table, path, compression="none", use_dictionary=False, write_statistics=False)


def test_embeddings_replaced_by_others_of_the_same_size_are_not_reused(tmp_path):
    from coincide_ray.toy.synthetic import planted_embeddings

    emb = tmp_path / "emb"
    emb.mkdir()
    ids = [f"r{i}" for i in range(200)]
    first, _ = planted_embeddings(200, num_layers=2, hidden=8, groups=4, seed=1)
    second, _ = planted_embeddings(200, num_layers=2, hidden=8, groups=4, seed=2)
    flat_parquet(emb / "part-0.parquet", ids, first)
    args = ["select", "--embeddings", str(emb), "--layers", "3,7", "--clusters", "4", "--iterations", "5",
            "--fraction", "0.2"]
    out, fresh = str(tmp_path / "out"), str(tmp_path / "fresh")
    assert main([*args, "--output", out]) == 0
    size = os.path.getsize(emb / "part-0.parquet")
    flat_parquet(emb / "part-0.parquet", ids, second)
    assert os.path.getsize(emb / "part-0.parquet") == size
    assert main([*args, "--output", out]) == 0
    assert main([*args, "--output", fresh]) == 0
    for path in CONTRACT[:5]:
        assert io.read_bytes(io.join(out, path)) == io.read_bytes(io.join(fresh, path)), path


def test_select_refusals_and_warnings_are_one_line(tmp_path, tiny_model, capsys):
    from coincide_ray.toy.synthetic import planted_embeddings

    emb = tmp_path / "emb"
    x, _ = planted_embeddings(60, num_layers=2, hidden=8, groups=3, seed=1)
    io.write_parquet(schema.embeddings_table([f"g{i}" for i in range(60)], x), str(emb / "b-good.parquet"))
    stray = np.ones((2, 12), np.float32)  # another dimension, in a file that sorts first
    io.write_parquet(schema.embeddings_table(["s0", "s1"], stray), str(emb / "a-stray.parquet"))
    base = ["select", "--embeddings", str(emb), "--layers", "3,7", "--iterations", "3"]
    assert main([*base, "--output", str(tmp_path / "o1"), "--clusters", "4"]) == 0
    manifest = io.read_json(str(tmp_path / "o1" / schema.MANIFEST_PATH))
    assert manifest["counts"]["rejected"] == 2 and manifest["health"]["rejected_by_reason"] == {
        "wrong embedding dimension": 2}

    capsys.readouterr()
    assert main([*base, "--output", str(tmp_path / "o2"), "--clusters", "100"]) == 0
    assert "100 clusters for 60 accepted records" in capsys.readouterr().err
    health = io.read_json(str(tmp_path / "o2" / schema.MANIFEST_PATH))["health"]
    assert health["empty_clusters"] >= 40 and any("100 clusters" in w for w in health["warnings"])

    (tmp_path / "a-file").write_text("not a folder")
    assert main([*base, "--output", str(tmp_path / "a-file"), "--clusters", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"coincide-ray: error: --output {tmp_path / 'a-file'} is a file; it must name a folder or prefix"

    # --layers that contradict the layers the embeddings were made with
    made = str(tmp_path / "made")
    write_corpus(io.join(made, "corpus", "records.json"), io.join(made, "corpus"), 4, seed=1, broken=False)
    assert main(["embed", "--input", io.join(made, "corpus", "records.json"), "--image-root",
                 io.join(made, "corpus"), "--model", tiny_model, "--output", made, "--layers", "1,3"]) == 0
    capsys.readouterr()
    assert main(["select", "--output", made, "--layers", "1,4", "--clusters", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--layers 1,4 differ from the layers 1,3" in err[0]


def test_hostile_records_end_in_the_accounting_and_selected_json(tmp_path, tiny_model):
    """A lone surrogate in an id, raw U+2028 in JSONL, an invalid UTF-8 line, a duplicate id
    whose first copy is malformed, Parquet with a timestamp, bytes and JSON-text
    conversations: the run finishes and every record is accounted for."""
    base = tmp_path / "corpus"
    good = write_corpus(str(base / "records.json"), str(base), 4, seed=2, broken=False)
    turns = [{"from": "human", "value": "What is 2 plus 2?"}, {"from": "gpt", "value": "4."}]
    lines = [
        '{"id": "bad\\ud800id", "conversations": [{"from": "human", "value": "hi"}]}'.encode(),
        json.dumps({"id": "sep", "conversations": [{"from": "human", "value": "a\u2028b\u2029c"},
                                                    {"from": "gpt", "value": "ok"}]}, ensure_ascii=False).encode(),
        b'{"id": "utf8\xff"}',
        json.dumps({"id": good[1]["id"], "conversations": "malformed first copy"}).encode(),
    ]
    (base / "a-hostile.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    import datetime

    pq.write_table(pa.table({"id": ["pq1"], "conversations": [json.dumps(turns)],
                             "when": pa.array([datetime.datetime(2026, 1, 2, 3, 4)], pa.timestamp("ms")),
                             "blob": pa.array([b"\x01\x02"], pa.binary())}), base / "z.parquet")
    out = str(tmp_path / "out")
    assert main(["run", "--input", str(base), "--image-root", str(base), "--model", tiny_model, "--output", out,
                 "--layers", "1,3", "--clusters", "1", "--iterations", "2", "--fraction", "1"]) == 0
    selection = io.read_parquet(io.join(out, schema.SELECTION_PATH)).to_pydict()
    rejected = io.read_parquet(io.join(out, schema.REJECTED_PATH)).to_pydict()
    reasons = dict(zip(rejected["sample_id"], rejected["reason"]))
    assert reasons["bad\\ud800id"] == "text is not valid Unicode"
    assert reasons[good[1]["id"]] == "missing or empty conversations"
    assert any(r == "unparsable record" for r in reasons.values())
    assert set(selection["sample_id"]) == {"sep", "pq1"} | {r["id"] for r in good}
    assert all(selection["selected"])
    written = io.read_json(io.join(out, schema.SELECTED_RECORDS_PATH))
    # one entry per selected id, no rejected copy beside it (a dict keyed by id would hide one)
    assert len(written) == len(selection["sample_id"]) and len({r["id"] for r in written}) == len(written)
    chosen = {r["id"]: r for r in written}
    assert chosen[good[1]["id"]] == good[1]  # the good copy, not the malformed first one
    assert chosen["sep"]["conversations"][0]["value"] == "a\u2028b\u2029c"
    assert chosen["pq1"]["conversations"] == turns and chosen["pq1"]["when"] == "2026-01-02T03:04:00"
    assert chosen["pq1"]["blob"] == "AQI="


def test_the_same_corpus_by_another_path_spelling_reuses_every_block(tmp_path, tiny_model, capsys, monkeypatch):
    # reuse is keyed by ids, fingerprints and reasons: never by how the input path was typed,
    # which the rejected records' details name (the broken records sit in the last block)
    base = str(tmp_path)
    write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 12, seed=6)
    out = io.join(base, "out")
    assert main(run_args(base, tmp_path, tiny_model, out)) == 0
    parts = {p: os.stat(os.path.join(out, "embeddings", p)).st_mtime_ns
             for p in os.listdir(os.path.join(out, "embeddings")) if p.endswith(".parquet")}
    os.symlink(tmp_path / "corpus", tmp_path / "dated-copy")  # the same files under another name
    monkeypatch.chdir(tmp_path)  # and relative paths: the driver makes them absolute for the workers
    relative = ["run", "--input", "dated-copy/records.json", "--image-root", "./dated-copy/", "--model", tiny_model,
                "--output", "out", "--layers", "1,3", "--clusters", "3", "--iterations", "4", "--fraction", "0.4",
                "--config", job_yaml(tmp_path, "job", block_records=4, batch_size=2)]
    capsys.readouterr()
    assert main(relative) == 0
    err = capsys.readouterr().err
    assert f"{len(parts)} finished and unchanged, 0 to embed" in err
    assert {p: os.stat(os.path.join(out, "embeddings", p)).st_mtime_ns for p in parts} == parts
