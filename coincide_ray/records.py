"""Input records: reading the three formats and deciding, in one place, what a bad record is.

A record is LLaVA-style: `id` (unique string), optional `image` (a path under the image
root), `conversations` (a list of {"from": "human" | "gpt", "value": str}). Extra fields are
kept untouched. Records are read in canonical order: files sorted by name, then position.
"""

from __future__ import annotations

import base64
import codecs
import datetime
import decimal
import json
import math
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from coincide_ray import io

RECORD_SUFFIXES = (".json", ".jsonl", ".parquet")
ROLES = {"human": "user", "gpt": "assistant"}
IMAGE_TAG = "<image>"


@dataclass(frozen=True)
class Record:
    id: str
    image: str | None  # path relative to the image root, already confined to it
    conversations: list[dict[str, str]]
    position: str  # "file#row", for messages


@dataclass(frozen=True)
class Rejection:
    id: str
    stage: str
    reason: str  # one of REASONS
    detail: str  # where (file#position), and any raw error text


# Every reason a rejected row can carry: the documented categories (README, "Rejected
# records"). Raw error text never becomes a reason; it goes in `detail`.
REASONS = (
    # reading records
    "unparsable record", "record is not an object", "missing id", "duplicate id", "missing or empty conversations",
    "malformed conversation turn", "text is not valid Unicode", "image path outside the image root",
    # fetching and decoding images
    "record names an image but no --image-root was given", "missing image file", "image not readable",
    "empty image file", "not an image", "truncated or corrupt image", "image over the pixel limit",
    "image metadata too large",
    # preparing and embedding
    "processor failed", "longer than the model's context", "model failed", "vector outside float16 range",
    # reading embeddings (select)
    "missing sample_id", "duplicate sample_id", "missing embedding", "wrong embedding dimension",
    "embedding holds NaN or inf",
)


class RecordProblem(ValueError):
    """A record that cannot be used: `reason` is one of REASONS, `detail` the raw text."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def read_raw_records(uri: str) -> Iterator[tuple[str, dict | Any]]:
    """(position, raw record) for every record under `uri`, in canonical order, streamed:
    one record at a time is in memory, whatever the format."""
    for path in io.list_files(uri, RECORD_SUFFIXES):
        for row, _, raw in file_rows(path):
            yield f"{path}#{row}", raw


def file_rows(path: str) -> Iterator[tuple[int, bytes | None, Any]]:
    """(row, the record's JSON text in UTF-8, the raw record) for every record of one input
    file, in order, streamed. A row that is not JSON at all has no text and an _Unparsable
    raw record saying why; a file that cannot be read as its format raises
    io.InputFormatError."""
    if path.endswith(".parquet"):
        rows = (parquet_row(row) for batch in io.iter_parquet(path) for row in batch.to_pylist())
        yield from ((row, io.json_text(raw), raw) for row, raw in enumerate(rows))
    elif path.endswith(".jsonl"):
        yield from jsonl_rows(path)
    else:
        yield from ((row, text, raw) for row, (text, raw) in enumerate(json_list_items(path)))


def load_row(text: bytes | None, problem: str | None) -> Any:
    """The raw record again from what a record shard keeps of it: its JSON text, or why it
    is not JSON (unparsable_reason)."""
    return _Unparsable(problem) if problem is not None else json.loads(text)


def unparsable_reason(raw: Any) -> str | None:
    """Why a row of file_rows is not JSON at all; None when it is."""
    return raw.message if isinstance(raw, _Unparsable) else None


def jsonl_rows(path: str) -> Iterator[tuple[int, bytes | None, Any]]:
    """One record per line. Lines end at \\n only: U+2028, U+2029 and NEL are allowed raw
    inside JSON strings, so str.splitlines() would cut records apart."""
    row = 0
    with io.open_read(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip(b"\n")
            if not line.strip():
                continue
            try:
                yield row, line, json.loads(line.decode("utf-8"))
            except UnicodeDecodeError as error:
                yield row, None, _Unparsable(f"line {number}: not valid UTF-8 (byte {error.start})")
            except json.JSONDecodeError as error:
                yield row, None, _Unparsable(f"line {number}: {error.msg}")
            row += 1


READ_CHUNK = 4 * 2**20  # bytes read at a time from a JSON list
TOKEN_SLACK = 16  # longer than any cut literal ("-Infinity"), \\uXXXX pair or number tail json reports
_DECODER = json.JSONDecoder()
_SPACE = re.compile(r"[ \t\n\r]*")


def json_list_items(path: str, chunk: int = READ_CHUNK) -> Iterator[tuple[bytes, Any]]:
    """(JSON text, value) of each element of a file holding one JSON list, streamed: the file is
    read `chunk` bytes at a time and each element is cut out by the standard library's own
    decoder (json.JSONDecoder.raw_decode), so every element means exactly what json.loads
    of the whole file would make of it (big integers, NaN, lone surrogates, repeated keys),
    and only one element and one chunk are in memory.

    Streaming parsers were tried and do not keep that meaning: ijson's C backend turns a
    lone surrogate into "?" (the id changes silently) and refuses integers beyond 64 bits;
    its Python backend is some 30 times slower."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, at, consumed, row = "", 0, 0, 0
    expect = "list"  # then "first" (a value or "]"), "value", "comma" ("," or "]"), "done"

    def fail(message: str) -> io.InputFormatError:
        return io.InputFormatError(f"{path} is not valid JSON: {message}")

    with io.open_read(path) as f:
        while True:
            data = f.read(chunk)
            final = not data
            try:
                text = text[at:] + decoder.decode(data, final=final)
            except UnicodeDecodeError as error:
                raise io.InputFormatError(f"{path} is not valid UTF-8 (byte {consumed + error.start})") from None
            consumed += len(data)
            at = _SPACE.match(text, 0).end()
            while at < len(text):
                char = text[at]
                if expect == "list":
                    if char != "[":
                        raise io.InputFormatError(f"{path} must hold a JSON list of records")
                    expect, at = "first", at + 1
                elif expect == "done":
                    raise fail("more text after the end of the list")
                elif expect == "comma" or (expect == "first" and char == "]"):
                    if char not in ",]":
                        raise fail("expected ',' or ']' after a record")
                    expect, at = ("value" if char == "," else "done"), at + 1
                else:
                    try:
                        value, end = _DECODER.raw_decode(text, at)
                    except json.JSONDecodeError as error:
                        # the chunk may end inside a string or within a token's length of the error
                        cut_short = error.pos >= len(text) - TOKEN_SLACK or error.msg.startswith("Unterminated")
                        if final or not cut_short:
                            raise fail(f"{error.msg} in record {row}") from None
                        break  # the record goes on in the next chunk
                    if end == len(text) and not final:
                        break  # a number at the very end may go on in the next chunk
                    yield text[at:end].encode("utf-8", "surrogatepass"), value
                    row += 1
                    expect, at = "comma", end
                at = _SPACE.match(text, at).end()
            if final:
                if expect != "done":
                    raise (io.InputFormatError(f"{path} must hold a JSON list of records") if expect == "list"
                           else fail("the list is not closed"))
                return


def parquet_row(row: dict) -> dict:
    """A Parquet row in the JSON shape of a record: values JSON cannot hold are passed on in
    a JSON-safe form (times as ISO 8601, bytes as base64, non-finite floats as null), and a
    `conversations` column of JSON text is parsed into its list."""
    safe = json_safe(row)
    conversations = safe.get("conversations")
    if isinstance(conversations, str):
        try:
            safe["conversations"] = json.loads(conversations)
        except json.JSONDecodeError:
            pass  # left as text: parse_record rejects it with a reason
    return safe


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, (bytes, bytearray, memoryview)):
        return base64.b64encode(bytes(value)).decode("ascii")
    if isinstance(value, decimal.Decimal):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


@dataclass(frozen=True)
class _Unparsable:
    message: str


def confine_image_path(image: str) -> str:
    """The image path normalised under the root; ValueError if it could leave it."""
    if not isinstance(image, str) or not image.strip():
        raise ValueError("image is not a non-empty string")
    if "://" in image or image.startswith(("/", "\\")) or "\\" in image or ":" in image.split("/")[0]:
        raise ValueError(f"image path {image!r} is absolute or names another location")
    normal = posixpath.normpath(image)
    if normal == ".." or normal.startswith("../") or normal == ".":
        raise ValueError(f"image path {image!r} leaves the image root")
    return normal


def parse_record(raw: Any, position: str, stage: str = "read") -> Record | Rejection:
    """A checked Record, or a Rejection that says what is wrong with it."""

    def reject(reason: str, detail: str = "") -> Rejection:
        sample_id = raw.get("id") if isinstance(raw, dict) else None
        name = printable(sample_id) if isinstance(sample_id, str) and sample_id else position
        return Rejection(name, stage, reason, printable(f"{position}: {detail}" if detail else position))

    if isinstance(raw, _Unparsable):
        return reject("unparsable record", raw.message)
    if not isinstance(raw, dict):
        return reject("record is not an object", type(raw).__name__)
    sample_id = raw.get("id")
    if not isinstance(sample_id, str) or not sample_id:
        return reject("missing id")
    conversations = raw.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return reject("missing or empty conversations")
    for turn in conversations:
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            return reject("malformed conversation turn", repr(turn)[:200])
    if not all(map(is_unicode, [sample_id, raw.get("image") or "", *(t["value"] for t in conversations)])):
        return reject("text is not valid Unicode", "a lone UTF-16 surrogate in the id, image or conversations")
    image = raw.get("image")
    if image is not None:
        try:
            image = confine_image_path(image)
        except ValueError as error:
            return reject("image path outside the image root", str(error))
    return Record(sample_id, image, conversations, position)


def is_unicode(text: Any) -> bool:
    """False for a str holding a lone UTF-16 surrogate (JSON's "\\ud800" parses into one):
    such text cannot be written as UTF-8 anywhere downstream."""
    if not isinstance(text, str):
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(text: str) -> str:
    """`text` with lone surrogates escaped (\\ud800), so that it can be written and shown."""
    return text if is_unicode(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


def accepted_records(uri: str) -> Iterator[tuple[str, Any, Record | Rejection]]:
    """(position, raw record, Record or Rejection) for every input record, in canonical
    order. Of several copies of an id the first that parses is accepted and the later ones
    are rejected as duplicates; a malformed copy never hides a good one. Every reader of the
    input (blocks, selected.json, labels) goes through here, so all agree on which copy
    is the record."""
    first: dict[str, str] = {}
    for position, raw in read_raw_records(uri):
        item = parse_record(raw, position)
        if isinstance(item, Record):
            if item.id in first:
                item = Rejection(item.id, "read", "duplicate id", f"{position}; first at {first[item.id]}")
            else:
                first[item.id] = position
        yield position, raw, item


def chat_messages(record: Record) -> list[dict[str, Any]]:
    """The conversation in the chat-template message format; the image goes first in the
    first user turn (where LLaVA data puts `<image>`), and `<image>` tags are removed."""
    messages = []
    image_placed = record.image is None
    for turn in record.conversations:
        role = ROLES[turn["from"]]
        text = turn["value"].replace(IMAGE_TAG, "").strip()
        content: list[dict[str, str]] = []
        if role == "user" and not image_placed:
            content.append({"type": "image"})
            image_placed = True
        content.append({"type": "text", "text": text})
        messages.append({"role": role, "content": content})
    return messages
