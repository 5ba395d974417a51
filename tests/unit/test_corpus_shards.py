"""Record shards against the one-process reader: the same records, the same rejections, the
same first copy of every id, whatever the files and the block size."""

import json
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coincide_ray.corpus import shards as record_shards
from coincide_ray.records import Record, accepted_records

TURNS = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "That."}]


def corpus_files(folder, seed=0):
    """Three files of the three formats, with duplicate ids across and within files, a
    malformed first copy, broken lines and non-records."""
    rng = random.Random(seed)
    ids = [f"r{i}" for i in range(40)]
    folder.mkdir()

    def record():
        choice = rng.random()
        if choice < 0.08:
            return {"id": rng.choice(ids)}  # malformed: no conversations
        if choice < 0.1:
            return ["not", "an", "object"]
        return {"id": rng.choice(ids), "conversations": TURNS, "n": rng.random()}

    (folder / "a.json").write_text(json.dumps([record() for _ in range(37)]))
    lines = [json.dumps(record()) for _ in range(29)]
    lines[5], lines[11] = "{not json", ""
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n")
    rows = [record() for _ in range(23)]
    rows = [r if isinstance(r, dict) else {"id": None} for r in rows]
    table = pa.table({"id": [r.get("id") for r in rows],
                      "conversations": [json.dumps(r["conversations"]) if "conversations" in r else None for r in rows]})
    pq.write_table(table, folder / "c.parquet")
    return folder


def described(item):
    """What a reader decided about a record: its id, accepted or why not, and where it is."""
    if isinstance(item, Record):
        return item.id, "accepted", item.position
    return item.id, item.reason, item.detail


def naive(folder):
    return [described(item) for _, _, item in accepted_records(str(folder))]


@pytest.mark.parametrize("block_records", [1, 4, 10, 64])
def test_blocks_from_shards_hold_what_the_one_process_reader_holds(tmp_path, block_records):
    folder = corpus_files(tmp_path / "in")
    corpus = record_shards.prepare(str(folder), str(tmp_path / "out"), block_records, progress=lambda line: None)
    rows = corpus.block_rows(block_records)
    assert len(rows) == corpus.blocks(block_records) == -(-corpus.records // block_records)
    got = [described(item) for row in rows for item in record_shards.read_block(row)]
    assert got == naive(folder)
    assert {"duplicate id", "accepted", "unparsable record", "record is not an object"} <= {why for _, why, _ in got}
    for row in rows:  # every row is plain columns Ray Data carries in Arrow
        pa.Table.from_pylist([row])


def test_an_unchanged_input_is_not_read_again_and_a_changed_file_is(tmp_path):
    folder = corpus_files(tmp_path / "in")
    out = str(tmp_path / "out")
    first = record_shards.prepare(str(folder), out, 8, progress=lambda line: None)
    assert first.read_again == 3
    kept = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "records").iterdir()}
    again = record_shards.prepare(str(folder), out, 8, progress=lambda line: None)
    assert again.read_again == 0 and again.duplicate_of == first.duplicate_of
    # nothing written again: not the shards, the keys, the duplicates or the index
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "out" / "records").iterdir()} == kept
    (folder / "b.jsonl").write_text(json.dumps({"id": "new", "conversations": TURNS}) + "\n")
    changed = record_shards.prepare(str(folder), out, 8, progress=lambda line: None)
    assert changed.read_again == 1
    got = [item.id for row in changed.block_rows(8) for item in record_shards.read_block(row)]
    assert got == [item.id for _, _, item in accepted_records(str(folder))]
    names = {p.name for p in (tmp_path / "out" / "records").iterdir()}
    stems = {n.split("-")[0].split(".")[0] for n in names if not n.startswith("_")}  # _index, _duplicates
    assert stems == {f.key for f in changed.files}  # the old version's shards are gone


def test_the_same_input_under_another_spelling_reuses_the_shards(tmp_path):
    folder = corpus_files(tmp_path / "in")
    out = str(tmp_path / "out")
    record_shards.prepare(str(folder), out, 8, progress=lambda line: None)
    again = record_shards.prepare(str(tmp_path / "in" / ".." / "in") + "/", out, 8, progress=lambda line: None)
    assert again.read_again == 0


def test_key_sets_answer_membership_exactly():
    keys = record_shards.KeySet([f"id{i}" for i in range(0, 1000, 3)])
    asked = [f"id{i}" for i in range(1000)] + ["", "id\ud800"]
    assert keys.holds(asked).tolist() == [i % 3 == 0 for i in range(1000)] + [False, False]
    assert record_shards.KeySet([]).holds(["a"]).tolist() == [False]


def test_duplicates_name_the_first_copy_of_every_repeated_key():
    import numpy as np

    rng = np.random.default_rng(3)
    distinct = rng.integers(1, 2**63, (30, 2), dtype=np.uint64)
    keys = distinct[rng.integers(0, 30, 400)]
    keys[rng.integers(0, 400, 40)] = 0  # rows that are not records are never duplicates
    first, expected = {}, {}
    for index, key in enumerate(map(tuple, keys.tolist())):
        if key == (0, 0):
            continue
        if key in first:
            expected[index] = first[key]
        else:
            first[key] = index
    assert record_shards.duplicates(keys) == expected
    assert record_shards.duplicates(np.zeros((0, 2), dtype=np.uint64)) == {}


def test_selected_records_are_the_accepted_copies_once_each(tmp_path):
    """selected.json's pieces, block by block: every selected id once, as its accepted copy;
    no malformed first copy and no later duplicate beside it."""
    from coincide_ray.pipeline import selected_texts

    folder = corpus_files(tmp_path / "in")
    corpus = record_shards.prepare(str(folder), str(tmp_path / "out"), 7, progress=lambda line: None)
    accepted = {item.id: raw for _, raw, item in accepted_records(str(folder)) if isinstance(item, Record)}
    wanted = sorted(accepted)[::2]
    pieces = [selected_texts(row, [record_shards.KeySet(wanted)])[0] for row in corpus.block_rows(7)]
    written = [json.loads(text) for piece in pieces for text in piece]
    assert len(written) == len(wanted) == len({r["id"] for r in written})
    assert sorted(r["id"] for r in written) == wanted
    for record in written:
        assert record == accepted[record["id"]]
