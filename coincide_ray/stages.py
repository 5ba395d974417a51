"""Finished stages: a marker, written after a stage's files, that names each file's sha256.

A stage's outputs count as finished only when its marker exists, was written for the same
inputs and settings (its key), and every file it names still holds the bytes it recorded.
Two attempts writing into one output (a preempted driver and its restart) therefore can
never pass off a mix of their files as finished: the marker written last names one
attempt's bytes, and a file the other attempt overwrote no longer matches, so the next run
redoes that stage. Each file itself is published atomically (coincide_ray.io.write_bytes).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from coincide_ray import io

MARKERS_DIR = "_stages"


def stage_key(stage: str, *inputs) -> str:
    """sha256 over what determines a stage's outputs (JSON-able values, in order)."""
    text = json.dumps([stage, *inputs], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def marker_uri(output: str, stage: str) -> str:
    return io.join(output, MARKERS_DIR, f"{stage}.json")


@dataclass(frozen=True)
class Finished:
    """A finished stage: its key, its marker's extra facts and its files' verified bytes."""

    key: str
    info: dict
    files: dict[str, bytes]  # path under the output -> content
    digests: dict[str, str]  # path under the output -> sha256 of its content


def publish(output: str, stage: str, key: str, files: dict[str, bytes], info: dict | None = None) -> dict[str, str]:
    """Write the files, then the marker naming them; returns {path: sha256}."""
    for path, data in files.items():
        io.write_bytes(io.join(output, path), data)
    digests = {path: sha256(data) for path, data in files.items()}
    io.write_json({"stage": stage, "key": key, "files": digests, "info": info or {}}, marker_uri(output, stage))
    return digests


def finished(output: str, stage: str, key: str | None = None) -> Finished | None:
    """The stage's outputs if its marker matches `key` (any key when None) and every file
    it names is intact; None otherwise."""
    uri = marker_uri(output, stage)
    if not io.exists(uri):
        return None
    try:
        marker = io.read_json(uri)
    except ValueError:  # a marker from a foreign writer, or damaged: not finished
        return None
    if key is not None and marker.get("key") != key:
        return None
    files = {}
    digests = marker.get("files", {})
    for path, digest in digests.items():
        target = io.join(output, path)
        if not io.exists(target):
            return None
        data = io.read_bytes(target)
        if sha256(data) != digest:
            return None
        files[path] = data
    return Finished(marker.get("key", ""), marker.get("info", {}), files, digests)
