import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from coincide_ray.records import (
    Record,
    Rejection,
    chat_messages,
    confine_image_path,
    parse_record,
    read_raw_records,
)

TURNS = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]


@pytest.mark.parametrize("path, normal", [("a/b.png", "a/b.png"), ("./a//b.png", "a/b.png"), ("a/../b.png", "b.png")])
def test_paths_inside_the_root(path, normal):
    assert confine_image_path(path) == normal


@pytest.mark.parametrize("path", ["../x.png", "a/../../x.png", "/etc/passwd", "file:///etc/passwd",
                                  "s3://other-bucket/x.png", "C:/x.png", "a\\..\\..\\x.png", "", "..", "."])
def test_paths_leaving_the_root(path):
    with pytest.raises(ValueError):
        confine_image_path(path)


@pytest.mark.parametrize("raw, reason", [
    ([1, 2], "record is not an object"),
    ({"conversations": TURNS}, "missing id"),
    ({"id": "", "conversations": TURNS}, "missing id"),
    ({"id": "a"}, "missing or empty conversations"),
    ({"id": "a", "conversations": []}, "missing or empty conversations"),
    ({"id": "a", "conversations": "hi"}, "missing or empty conversations"),
    ({"id": "a", "conversations": [{"from": "robot", "value": "x"}]}, "malformed conversation turn"),
    ({"id": "a", "conversations": [{"from": "human", "value": 3}]}, "malformed conversation turn"),
    ({"id": "a", "image": "../../x.png", "conversations": TURNS}, "image path outside the image root"),
    ({"id": "a", "image": 5, "conversations": TURNS}, "image path outside the image root"),
])
def test_bad_records_are_rejected_with_a_reason(raw, reason):
    item = parse_record(raw, "f.json#3")
    assert isinstance(item, Rejection) and item.reason == reason and item.stage == "read"
    assert "f.json#3" in item.detail


def test_good_record_keeps_its_fields():
    item = parse_record({"id": "a", "image": "x/y.png", "conversations": TURNS, "source": "vqa"}, "p")
    assert isinstance(item, Record) and item.image == "x/y.png" and item.conversations == TURNS


def test_chat_messages_put_the_image_first_in_the_first_user_turn():
    record = Record("a", "x.png", [{"from": "human", "value": "Q1 <image>"}, {"from": "gpt", "value": "A1"},
                                   {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A2"}], "p")
    messages = chat_messages(record)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert messages[0]["content"] == [{"type": "image"}, {"type": "text", "text": "Q1"}]
    assert messages[2]["content"] == [{"type": "text", "text": "Q2"}]
    text_only = chat_messages(Record("b", None, [{"from": "human", "value": "<image> hi"}], "p"))
    assert text_only[0]["content"] == [{"type": "text", "text": "hi"}]


def test_three_formats_in_canonical_order(tmp_path):
    folder = tmp_path / "records"
    folder.mkdir()
    (folder / "b.json").write_text(json.dumps([{"id": "b0"}, {"id": "b1"}]))
    (folder / "a.jsonl").write_text('{"id": "a0"}\n\nnot json\n{"id": "a2"}\n')
    pq.write_table(pa.table({"id": ["c0"], "conversations": [[{"from": "human", "value": "x"}]]}),
                   folder / "c.parquet")
    (folder / "notes.txt").write_text("ignored")
    rows = list(read_raw_records(str(folder)))
    assert [p.rsplit("/", 1)[-1] for p, _ in rows] == ["a.jsonl#0", "a.jsonl#1", "a.jsonl#2", "b.json#0",
                                                       "b.json#1", "c.parquet#0"]
    assert parse_record(rows[1][1], rows[1][0]).reason == "unparsable record"
    assert rows[5][1]["conversations"] == [{"from": "human", "value": "x"}]


def _elements(path, chunk):
    from coincide_ray.records import json_list_items

    elements = list(json_list_items(str(path), chunk=chunk))
    assert all(json.dumps(json.loads(text)) == json.dumps(value) for text, value in elements)  # the text is the value's
    return [value for _, value in elements]


HARD_VALUES = [
    {"id": "big", "n": 123456789012345678901234567890, "f": 1e308, "neg": -0.0, "nan": float("nan")},
    {"id": "esc\\ud800", "s": "quote \" backslash \\ ] } , [ {", "u": "caf\u00e9 \u2028 \U0001F600"},
    {"id": "rep", "a": 1, "nested": [[], {}, [{"x": [1, [2, [3]]]}]]},
    12, "text", None, True, [1, 2],
    {"id": "long", "v": "x" * 5000},
]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 4096])
def test_a_json_list_streams_element_by_element_as_json_loads_reads_it(tmp_path, chunk):
    """Every chunk size, down to one byte (records, strings, escapes, numbers and multi-byte
    characters cut anywhere), gives the elements json.loads gives for the whole file."""
    path = tmp_path / "list.json"
    text = json.dumps(HARD_VALUES, indent=1, ensure_ascii=False)
    text = text.replace('"esc\\\\ud800"', '"esc\\ud800"').replace('"a": 1,', '"a": 1, "a": 2,')  # a lone surrogate, a repeated key
    path.write_text(" \n" + text + "\n\t ", encoding="utf-8")
    expected = json.loads(path.read_bytes())
    got = _elements(path, chunk)
    assert json.dumps(got, sort_keys=True) == json.dumps(expected, sort_keys=True)
    assert len(got) == len(HARD_VALUES) and got[2]["a"] == 2 and got[1]["id"] == "esc\ud800"


@pytest.mark.parametrize("text, message", [
    ('{"id": "a"}', "must hold a JSON list"), ("", "must hold a JSON list"), ('[{"id": 1},]', "not valid JSON"),
    ('[{"id": 1} {"id": 2}]', "not valid JSON"), ('[{"id": 1}', "not valid JSON"), ('[1] 2', "not valid JSON"),
    ('[{"id": tru}]', "not valid JSON"), ('[1,,2]', "not valid JSON"),
])
@pytest.mark.parametrize("chunk", [1, 5, 4096])
def test_a_malformed_json_list_is_refused_as_json_loads_refuses_it(tmp_path, text, message, chunk):
    from coincide_ray import io

    path = tmp_path / "list.json"
    path.write_text(text)
    if text.startswith("["):
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)
    with pytest.raises(io.InputFormatError, match=message):
        _elements(path, chunk)


def test_a_malformed_record_early_in_a_long_list_is_refused_without_reading_on(tmp_path):
    """The error is seen where it is: the reader does not keep the rest of the file in
    memory waiting for the broken record to end."""
    from coincide_ray import io
    from coincide_ray.records import json_list_items

    path = tmp_path / "list.json"
    path.write_text('[{"id": "a", "x": tru}, ' + ", ".join(['{"id": "b"}'] * 200_000) + "]")
    read = []
    with pytest.raises(io.InputFormatError, match="record 0"):
        for text in json_list_items(str(path), chunk=1024):
            read.append(text)
    assert read == []
