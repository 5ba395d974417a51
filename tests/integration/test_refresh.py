"""Nightly refresh: a run given --previous reuses the vectors of unchanged records,
recomputes new and changed ones, drops removed ones and reports the selection diff."""

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from test_embed_stage import embeddings_by_id, job_yaml

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.toy.corpus import BROKEN_REASONS, write_corpus


def flags(base, tmp_path, corpus, name):
    return ["--input", io.join(base, corpus, "records.json"), "--image-root", io.join(base, corpus),
            "--layers", "1,3,4", "--clusters", "3", "--iterations", "5", "--fraction", "0.3",
            "--config", job_yaml(tmp_path, name, block_records=8, batch_size=4)]


def nightly(base, tmp_path, model, corpus, date):
    """jobs/refresh.py, in this process (it joins the test session's Ray)."""
    spec = importlib.util.spec_from_file_location("refresh", Path(__file__).parents[2] / "jobs" / "refresh.py")
    refresh = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(refresh)
    return refresh.main(["--root", io.join(base, "nightly"), "--date", date, "--model", model,
                         *flags(base, tmp_path, corpus, date)])


@pytest.mark.slow
def test_refresh_reuses_unchanged_records(storage, tmp_path, tiny_model):
    base = storage
    records = write_corpus(io.join(base, "night1", "records.json"), io.join(base, "night1"), 30, seed=5,
                           broken=False)
    assert nightly(base, tmp_path, tiny_model, "night1", "2026-11-22") == 0

    # night 2: five records removed, one conversation and one image changed, six new records
    tonight = records[5:]
    tonight[0] = {**tonight[0], "conversations": tonight[0]["conversations"] + [
        {"from": "human", "value": "And again?"}, {"from": "gpt", "value": "Yes."}]}
    with_image = next(i for i, r in enumerate(tonight) if "image" in r and i > 0)
    fresh = []
    for r in write_corpus(io.join(base, "extra", "records.json"), io.join(base, "extra"), 6, seed=99, broken=False):
        new = {**r, "id": r["id"].replace("demo", "new")}
        if "image" in r:
            new["image"] = f"images/{new['id']}.png"
            io.write_bytes(io.join(base, "night2", new["image"]), io.read_bytes(io.join(base, "extra", r["image"])))
        fresh.append(new)
    for r in tonight:
        if "image" in r:
            io.write_bytes(io.join(base, "night2", r["image"]), io.read_bytes(io.join(base, "night1", r["image"])))
    changed_image = tonight[with_image]["image"]
    other = next(r["image"] for r in records[:5] if "image" in r)
    io.write_bytes(io.join(base, "night2", changed_image), io.read_bytes(io.join(base, "night1", other)))
    tonight += fresh
    io.write_bytes(io.join(base, "night2", "records.json"), json.dumps(tonight).encode())

    assert nightly(base, tmp_path, tiny_model, "night2", "2026-11-23") == 0
    run1, run2 = (io.join(base, "nightly", "runs", d) for d in ("2026-11-22", "2026-11-23"))
    assert io.read_json(io.join(base, "nightly", "latest.json"))["run"] == run2
    scratch = io.join(base, "scratch")  # the same night from scratch: nothing reused
    assert main(["run", "--model", tiny_model, "--output", scratch, *flags(base, tmp_path, "night2", "s")]) == 0

    manifest = io.read_json(io.join(run2, schema.MANIFEST_PATH))
    assert manifest["diff"]["previous"] == run1
    recomputed = {tonight[0]["id"], tonight[with_image]["id"]} | {r["id"] for r in fresh}
    assert manifest["counts"]["embedded"] == len(recomputed)
    assert manifest["counts"]["reused"] == len(tonight) - len(recomputed)

    before, after, scratch = (embeddings_by_id(r) for r in (run1, run2, scratch))
    assert set(after) == {r["id"] for r in tonight}  # removed records are gone, every record is there
    for sample_id, vector in after.items():
        if sample_id not in recomputed:
            assert np.array_equal(vector, before[sample_id])  # copied, bit for bit
        assert np.allclose(vector, scratch[sample_id], atol=1e-5)  # and what the model gives tonight
    for sample_id in recomputed - {r["id"] for r in fresh}:
        assert not np.allclose(after[sample_id], before[sample_id], atol=1e-3)

    diff = io.read_json(io.join(run2, schema.DIFF_PATH))
    chosen = {}
    for name in (run1, run2):
        table = io.read_parquet(io.join(name, schema.SELECTION_PATH)).to_pydict()
        chosen[name] = [i for i, s in zip(table["sample_id"], table["selected"]) if s]
    assert diff["added"] == [i for i in chosen[run2] if i not in set(chosen[run1])]
    assert diff["dropped"] == [i for i in chosen[run1] if i not in set(chosen[run2])]

    # the same night again: resumes (nothing to embed) and still diffs against the night before
    assert nightly(base, tmp_path, tiny_model, "night2", "2026-11-23") == 0
    again = io.read_json(io.join(run2, schema.MANIFEST_PATH))
    assert again["counts"]["embedded"] == 0 and again["diff"]["previous"] == run1
    assert manifest["diff"]["added"] == len(diff["added"]) and manifest["diff"]["compared"]


def test_a_backfill_never_moves_latest_back_and_a_broken_previous_run_is_passed_over(tmp_path, tiny_model,
                                                                                      capsys):
    base = str(tmp_path)
    write_corpus(io.join(base, "c", "records.json"), io.join(base, "c"), 6, seed=2, broken=False)
    root = io.join(base, "nightly")
    latest = io.join(root, "latest.json")
    run = {d: io.join(root, "runs", d) for d in ("2026-11-30", "2026-12-02", "2026-12-03")}
    assert nightly(base, tmp_path, tiny_model, "c", "2026-12-02") == 0
    capsys.readouterr()

    # a backfill of an older night is written, builds on no newer night, and leaves latest.json
    assert nightly(base, tmp_path, tiny_model, "c", "2026-11-30") == 0
    err = capsys.readouterr().err
    assert io.exists(io.join(run["2026-11-30"], schema.MANIFEST_PATH))
    assert io.read_json(latest)["run"] == run["2026-12-02"]
    assert "backfill" in err and "stays at" in err
    assert "diff" not in io.read_json(io.join(run["2026-11-30"], schema.MANIFEST_PATH))  # nothing older to diff

    # the newest run loses its embeddings: the next night says so in one line, falls back, completes
    for name in os.listdir(os.path.join(run["2026-12-02"], "embeddings")):
        if name.endswith(".parquet"):
            os.remove(os.path.join(run["2026-12-02"], "embeddings", name))
    assert nightly(base, tmp_path, tiny_model, "c", "2026-12-03") == 0
    err = capsys.readouterr().err
    passed_over = [line for line in err.splitlines() if "cannot be used" in line]
    assert len(passed_over) == 1 and run["2026-12-02"] in passed_over[0] and "part files are gone" in passed_over[0]
    assert f"previous run: {run['2026-11-30']}" in err
    assert io.read_json(io.join(run["2026-12-03"], schema.MANIFEST_PATH))["diff"]["previous"] == run["2026-11-30"]
    assert io.read_json(latest)["run"] == run["2026-12-03"]
    assert not io.exists(io.join(run["2026-12-03"], schema.IN_PROGRESS_PATH))  # cleared once finished


def test_usable_runs_are_judged_by_their_files_on_s3(s3_endpoint):
    import uuid

    from coincide_ray import nightly as night

    root = f"s3://coincide-test/{uuid.uuid4().hex}"
    done = io.join(root, "runs", "2026-12-01")
    for path in (schema.MANIFEST_PATH, schema.SELECTION_PATH, "embeddings/part-000000.parquet"):
        io.write_bytes(io.join(done, path), b"x")
    io.write_json({"parts": ["part-000000.parquet"]}, io.join(done, schema.EMBEDDINGS_DONE_PATH))
    io.write_bytes(io.join(root, "runs", "2026-12-02", "embeddings", "part-000000.parquet"), b"x")  # never finished
    io.write_bytes(io.join(root, "runs", "notes", "x.txt"), b"x")  # not a night
    assert night.dated_runs(root) == ["2026-12-01", "2026-12-02"]
    assert night.why_unusable(done) is None
    assert "never finished" in night.why_unusable(io.join(root, "runs", "2026-12-02"))
    said = []
    assert night.choose_previous(root, "2026-12-03", said.append) == done
    assert len(said) == 2 and "cannot be used" in said[0]
    # a finished run marked in progress (a later attempt stopped mid-update) is passed over too
    io.write_json({"started": "now"}, io.join(done, schema.IN_PROGRESS_PATH))
    said.clear()
    assert night.choose_previous(root, "2026-12-03", said.append) is None
    assert "marked in progress" in said[1] and "no usable earlier run" in said[-1]
    with pytest.raises(ValueError, match="YYYY-MM-DD"):
        night.check_date("12/03/2026")


def test_reuse_is_counted_by_where_it_came_from(tmp_path, tiny_model, capsys):
    # after a model change nothing of --previous can match; a rerun of the same night (as after
    # a kill in k-means) reuses its own earlier attempt's vectors, and the counts say which
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    base = str(tmp_path)
    records = write_corpus(io.join(base, "c", "records.json"), io.join(base, "c"), 6, seed=3, broken=False)
    first, second = io.join(base, "first"), io.join(base, "second")
    assert main(["run", "--model", tiny_model, "--output", first, *flags(base, tmp_path, "c", "a")]) == 0
    other = str(build_tiny_checkpoint(tmp_path / "other-model", "llava", layers=6, seed=11))
    night = ["run", "--model", other, "--output", second, "--previous", first, *flags(base, tmp_path, "c", "b")]
    capsys.readouterr()
    assert main(night) == 0
    err = capsys.readouterr().err
    assert "none of the vectors of" in err and "model_fingerprint" in err and "can be reused by fingerprint" not in err
    counts = io.read_json(io.join(second, schema.MANIFEST_PATH))["counts"]
    assert counts["embedded"] == len(records) and counts["reused_from_previous"] == 0
    assert main(night) == 0
    counts = io.read_json(io.join(second, schema.MANIFEST_PATH))["counts"]
    assert counts["embedded"] == 0 and counts["reused_from_previous"] == 0
    assert counts["reused_from_this_output"] == counts["reused"] == len(records)


def test_an_unchanged_night_starts_no_model_actor(tmp_path, tiny_model, capsys):
    base = str(tmp_path)
    records = write_corpus(io.join(base, "c", "records.json"), io.join(base, "c"), 10, seed=8)  # broken ones too
    first, second = io.join(base, "first"), io.join(base, "second")
    assert main(["run", "--model", tiny_model, "--output", first, *flags(base, tmp_path, "c", "a")]) == 0
    capsys.readouterr()
    assert main(["run", "--model", tiny_model, "--output", second, "--previous", first,
                 *flags(base, tmp_path, "c", "a")]) == 0
    err = capsys.readouterr().err
    assert "copied whole from" in err and "model on" not in err  # no model pool was planned or started
    manifest = io.read_json(io.join(second, schema.MANIFEST_PATH))
    accepted = manifest["counts"]["records"] - manifest["counts"]["rejected"]
    assert manifest["counts"]["embedded"] == 0 and manifest["counts"]["reused_from_previous"] == accepted
    assert manifest["resources"]["embed"] is None
    before, after = embeddings_by_id(first), embeddings_by_id(second)
    assert after.keys() == before.keys() and all(np.array_equal(after[k], before[k]) for k in before)
    assert manifest["counts"]["records"] == len(records)
    rejected = io.read_parquet(io.join(second, schema.REJECTED_PATH)).to_pydict()
    assert dict(zip(rejected["sample_id"], rejected["reason"])) == BROKEN_REASONS  # rejected without the model too
