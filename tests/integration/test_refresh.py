"""Nightly refresh: a run given --previous reuses the vectors of unchanged records,
recomputes new and changed ones, drops removed ones and reports the selection diff."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from test_embed_stage import embeddings_by_id, job_yaml

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.toy.corpus import write_corpus


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
