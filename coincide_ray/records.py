"""Input records: reading the three formats and deciding, in one place, what a bad record is.

A record is LLaVA-style: `id` (unique string), optional `image` (a path under the image
root), `conversations` (a list of {"from": "human" | "gpt", "value": str}). Extra fields are
kept untouched. Records are read in canonical order: files sorted by name, then position.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import math
import posixpath
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
    """(position, raw record) for every record under `uri`, in canonical order."""
    for path in io.list_files(uri, RECORD_SUFFIXES):
        if path.endswith(".parquet"):
            rows = [parquet_row(row) for row in io.read_parquet(path).to_pylist()]
        elif path.endswith(".jsonl"):
            rows = jsonl_rows(io.read_bytes(path))
        else:
            try:
                rows = json.loads(io.read_bytes(path).decode("utf-8"))
            except UnicodeDecodeError as error:
                raise io.InputFormatError(f"{path} is not valid UTF-8 (byte {error.start})") from None
            except json.JSONDecodeError as error:
                raise io.InputFormatError(f"{path} is not valid JSON: {error}") from None
            if not isinstance(rows, list):
                raise io.InputFormatError(f"{path} must hold a JSON list of records")
        for row, raw in enumerate(rows):
            yield f"{path}#{row}", raw


def jsonl_rows(data: bytes) -> list:
    """One record per line. Lines end at \\n only: U+2028, U+2029 and NEL are allowed raw
    inside JSON strings, so str.splitlines() would cut records apart."""
    rows: list = []
    for number, line in enumerate(data.split(b"\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line.decode("utf-8")))
        except UnicodeDecodeError as error:
            rows.append(_Unparsable(f"line {number}: not valid UTF-8 (byte {error.start})"))
        except json.JSONDecodeError as error:
            rows.append(_Unparsable(f"line {number}: {error.msg}"))
    return rows


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
