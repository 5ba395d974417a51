"""Input records: reading the three formats and deciding, in one place, what a bad record is.

A record is LLaVA-style: `id` (unique string), optional `image` (a path under the image
root), `conversations` (a list of {"from": "human" | "gpt", "value": str}). Extra fields are
kept untouched. Records are read in canonical order: files sorted by name, then position.
"""

from __future__ import annotations

import json
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
    reason: str  # a short category
    detail: str


def read_raw_records(uri: str) -> Iterator[tuple[str, dict | Any]]:
    """(position, raw record) for every record under `uri`, in canonical order."""
    for path in io.list_files(uri, RECORD_SUFFIXES):
        if path.endswith(".parquet"):
            rows = io.read_parquet(path).to_pylist()
        elif path.endswith(".jsonl"):
            rows = []
            for number, line in enumerate(io.read_bytes(path).decode("utf-8").splitlines()):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as error:
                    rows.append(_Unparsable(f"line {number + 1}: {error.msg}"))
        else:
            try:
                rows = json.loads(io.read_bytes(path))
            except json.JSONDecodeError as error:
                raise io.InputFormatError(f"{path} is not valid JSON: {error}") from None
            if not isinstance(rows, list):
                raise io.InputFormatError(f"{path} must hold a JSON list of records")
        for row, raw in enumerate(rows):
            yield f"{path}#{row}", raw


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
        name = sample_id if isinstance(sample_id, str) and sample_id else position
        return Rejection(name, stage, reason, f"{position}: {detail}" if detail else position)

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
    image = raw.get("image")
    if image is not None:
        try:
            image = confine_image_path(image)
        except ValueError as error:
            return reject("image path outside the image root", str(error))
    return Record(sample_id, image, conversations, position)


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
