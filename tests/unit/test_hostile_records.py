"""Hostile and unusual records and images: each is read as JSON allows, or rejected with a
reason; none takes a run down."""

import datetime
import io as _io
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from coincide_ray import io
from coincide_ray.embed.preprocess import decode_image
from coincide_ray.records import Record, Rejection, accepted_records, parse_record, read_raw_records

TURNS = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "Red."}]


def test_jsonl_splits_only_on_newline(tmp_path):
    """U+2028, U+2029 and NEL are allowed raw inside JSON strings: they must not split a record."""
    text = "line\u2028separator \u2029 and \x85 next-line"
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"id": "a", "conversations": [{"from": "human", "value": text}]},
                               ensure_ascii=False) + "\r\n" + json.dumps({"id": "b", "conversations": TURNS}) + "\n",
                    encoding="utf-8")
    rows = list(read_raw_records(str(path)))
    assert len(rows) == 2
    assert rows[0][1]["conversations"][0]["value"] == text and rows[1][1]["id"] == "b"


def test_invalid_utf8_rejects_the_jsonl_line_and_refuses_a_json_list(tmp_path):
    good = json.dumps({"id": "a", "conversations": TURNS}).encode()
    (tmp_path / "r.jsonl").write_bytes(good + b"\n" + b'{"id": "b\xff\xfe"}\n' + good.replace(b'"a"', b'"c"') + b"\n")
    rows = list(read_raw_records(str(tmp_path / "r.jsonl")))
    assert [parse_record(raw, p).reason if isinstance(parse_record(raw, p), Rejection) else "ok" for p, raw in rows] \
        == ["ok", "unparsable record", "ok"]
    assert "line 2" in parse_record(rows[1][1], rows[1][0]).detail
    (tmp_path / "list.json").write_bytes(b'[{"id": "\xff"}]')
    with pytest.raises(io.InputFormatError, match="not valid UTF-8"):
        list(read_raw_records(str(tmp_path / "list.json")))


def test_a_lone_surrogate_is_rejected_with_a_printable_id(tmp_path):
    (tmp_path / "r.json").write_text('[{"id": "x\\ud800y", "conversations": [{"from": "human", "value": "hi"}]},'
                                     ' {"id": "ok", "conversations": [{"from": "human", "value": "bad \\udc00"}]}]')
    items = [parse_record(raw, p) for p, raw in read_raw_records(str(tmp_path / "r.json"))]
    assert all(isinstance(item, Rejection) and item.reason == "text is not valid Unicode" for item in items)
    assert items[0].id == "x\\ud800y" and items[1].id == "ok"
    for item in items:
        item.id.encode("utf-8")  # printable, writable to Parquet
        item.detail.encode("utf-8")


def test_parquet_values_pass_through_in_json_safe_form(tmp_path):
    when = datetime.datetime(2026, 11, 24, 12, 30, tzinfo=datetime.timezone.utc)
    table = pa.table({"id": ["a"], "conversations": [json.dumps(TURNS)],  # conversations as a JSON string
                      "when": pa.array([when], pa.timestamp("us", tz="UTC")), "day": pa.array([when.date()]),
                      "blob": pa.array([b"\x00\xff"], pa.binary()), "score": [float("nan")]})
    pq.write_table(table, tmp_path / "r.parquet")
    [(position, raw)] = list(read_raw_records(str(tmp_path / "r.parquet")))
    record = parse_record(raw, position)
    assert isinstance(record, Record) and record.conversations == TURNS
    text = json.dumps(raw, allow_nan=False)  # JSON-safe as it stands: what selected.json writes
    back = json.loads(text)
    assert back["when"] == "2026-11-24T12:30:00+00:00" and back["day"] == "2026-11-24"
    assert back["blob"] == "AP8=" and back["score"] is None and back["conversations"] == TURNS


def test_a_duplicate_whose_first_copy_is_malformed_keeps_the_good_copy(tmp_path):
    (tmp_path / "r.json").write_text(json.dumps([{"id": "a", "conversations": "nope", "tag": 1},
                                                 {"id": "a", "conversations": TURNS, "tag": 2},
                                                 {"id": "a", "conversations": TURNS, "tag": 3}]))
    items = list(accepted_records(str(tmp_path / "r.json")))
    assert [type(item).__name__ for _, _, item in items] == ["Rejection", "Record", "Rejection"]
    assert [raw["tag"] for _, raw, item in items if isinstance(item, Record)] == [2]
    assert items[2][2].reason == "duplicate id" and "r.json#1" in items[2][2].detail


def gray16_png(value: int) -> bytes:
    buffer = _io.BytesIO()
    Image.fromarray(np.full((8, 8), value, dtype=np.uint16)).save(buffer, format="PNG")
    return buffer.getvalue()


def test_sixteen_bit_and_float_images_are_scaled_to_eight_bits():
    assert np.asarray(decode_image(gray16_png(32768), 10**6)).mean() == pytest.approx(128, abs=1)
    assert np.asarray(decode_image(gray16_png(65535), 10**6)).min() == 255
    buffer = _io.BytesIO()
    Image.fromarray(np.full((8, 8), 0.25, dtype=np.float32), mode="F").save(buffer, format="TIFF")
    assert np.asarray(decode_image(buffer.getvalue(), 10**6)).mean() == pytest.approx(64, abs=1)


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (40, 10), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated by 90 degrees
    buffer = _io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode_image(buffer.getvalue(), 10**6).size == (10, 40)


def test_a_symlink_out_of_a_local_root_is_never_read(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "secret.png"
    (root / "images").mkdir(parents=True)
    outside.write_bytes(gray16_png(1))
    os.symlink(outside, root / "images" / "link.png")
    os.symlink(root / "images", root / "alias")  # a link that stays inside is fine
    (root / "images" / "real.png").write_bytes(gray16_png(2))
    with pytest.raises(io.OutsideRootError):
        io.read_under(str(root), "images/link.png")
    assert io.read_under(str(root), "alias/real.png") == gray16_png(2)
    with pytest.raises(FileNotFoundError):
        io.read_under(str(root), "images/none.png")


def test_content_digest_follows_content_not_name_size_or_time(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"x" * 100)
    b.write_bytes(b"x" * 100)
    assert io.digest(str(a)) == io.digest(str(b))  # a byte-identical copy: the same digest
    stat = os.stat(a)
    a.write_bytes(b"y" * 100)  # same size, same modification time
    os.utime(a, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert io.digest(str(a)) != io.digest(str(b))
