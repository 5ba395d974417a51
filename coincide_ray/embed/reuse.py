"""Reusing an earlier run's vectors (nightly refresh): record fingerprints and their lookup.

A record's fingerprint is the sha256 of everything its outcome depends on: the model's
fingerprint, the pooled layers and the image pixel limit (the run's salt), the record's
conversations and its image's content digest (io.digest). A record of tonight's corpus whose fingerprint an earlier run
embedded gets that run's vector, copied; only new or changed records go through the model.
The lookup table is compact (16 bytes of each fingerprint, sorted), so it is sent once to
every CPU worker.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coincide_ray import io, schema
from coincide_ray.records import Record


def run_salt(model_fingerprint: str, layers: tuple[int, ...], max_image_pixels: int) -> str:
    """What every record's outcome depends on beside its own content: the model, the pooled
    layers, and the pixel limit that decides whether its image is accepted."""
    return f"{model_fingerprint}|{','.join(map(str, layers))}|{max_image_pixels}"


def record_fingerprint(salt: str, record: Record, image_digest: str | None) -> str:
    """`image_digest` as io.digest gives it: a local file's sha256 (its 32 bytes go in, as
    they always have), or an object store's ETag, so that an unchanged image is recognised
    without reading it again."""
    digest = hashlib.sha256()
    digest.update(salt.encode())
    digest.update(b"\0")
    digest.update(json.dumps(record.conversations, sort_keys=True, ensure_ascii=False).encode())
    digest.update(b"\0")
    if image_digest is None:
        digest.update(b"-")
    elif image_digest.startswith("sha256:"):
        digest.update(bytes.fromhex(image_digest[len("sha256:"):]))
    else:
        digest.update(image_digest.encode())
    return digest.hexdigest()


KEY_BYTES = 16  # of the 32-byte digest: collisions among 1e9 records have odds of ~1e-21


def _key(fingerprint: str) -> bytes:
    return bytes.fromhex(fingerprint)[:KEY_BYTES]


def _id_key(sample_id: str) -> bytes:
    return hashlib.sha256(sample_id.encode("utf-8", "backslashreplace")).digest()[:8]


@dataclass(frozen=True)
class PreviousVectors:
    """Where an earlier run keeps the vector of each fingerprint it embedded."""

    files: list[str]  # its embeddings part files
    keys: np.ndarray  # sorted fingerprint keys, dtype S16
    ids: np.ndarray  # 8 bytes of the sha256 of the record's id, per key (S8)
    file: np.ndarray  # int32 index into files, per key
    row: np.ndarray  # int32 row in that file, per key

    @staticmethod
    def of_run(run: str, vector_dtype: str = "float32") -> PreviousVectors:
        """The vectors of a finished run's output folder (its ids, fingerprints and reasons
        are read, not its vectors). Stored as float16 they are not reused into float32 output:
        a fresh run would store more precise vectors."""
        folder = io.join(run, schema.EMBEDDINGS_DIR)
        files = io.list_files(folder, (".parquet",))
        keys, ids, file, row = [], [], [], []
        for index, path in enumerate(files):
            file_schema = io.parquet_schema(path)
            names = file_schema.names
            if schema.FINGERPRINT not in names:
                continue  # written before fingerprints existed: nothing to reuse from it
            if vector_dtype == "float32" and (schema.EMBEDDING not in names or
                                              file_schema.field(schema.EMBEDDING).type.value_type != pa.float32()):
                continue
            wanted = [schema.SAMPLE_ID, schema.FINGERPRINT] + ([schema.REASON] if schema.REASON in names else [])
            table = io.read_parquet(path, wanted)
            embedded = pc.is_valid(table.column(schema.FINGERPRINT))
            if schema.REASON in names:  # a record rejected after fingerprinting has no vector
                embedded = pc.and_(embedded, pc.is_null(table.column(schema.REASON)))
            rows = np.flatnonzero(embedded.to_numpy(zero_copy_only=False))
            fingerprints = table.column(schema.FINGERPRINT).to_pylist()
            sample_ids = table.column(schema.SAMPLE_ID).to_pylist()
            keys += [_key(fingerprints[r]) for r in rows]
            ids += [_id_key(sample_ids[r]) for r in rows]
            file += [index] * len(rows)
            row += rows.tolist()
        keys_array = np.array(keys, dtype=f"S{KEY_BYTES}")
        order = np.argsort(keys_array, kind="stable")
        return PreviousVectors(files, keys_array[order], np.array(ids, dtype="S8")[order],
                               np.array(file, np.int32)[order], np.array(row, np.int32)[order])

    def __len__(self) -> int:
        return len(self.keys)

    def find(self, fingerprint: str, sample_id: str) -> tuple[str, int] | None:
        """(part file, row) of the fingerprint's vector, or None. Among records with the
        same content the one with the same id is preferred: its own earlier vector, not a
        twin's, which was computed in another batch and can differ by float rounding."""
        key = _key(fingerprint)
        low, high = (int(np.searchsorted(self.keys, key, side=side)) for side in ("left", "right"))
        if low == high:
            return None
        same = np.flatnonzero(self.ids[low:high] == _id_key(sample_id))
        at = low + (int(same[0]) if len(same) else 0)
        return self.files[int(self.file[at])], int(self.row[at])


def fetch_vectors(wanted: dict[int, tuple[str, int]]) -> dict[int, tuple[np.ndarray, int, int]]:
    """{position: (vector, image tokens, text tokens)} for {position: (part file, row)} of an
    earlier run; each file is read once, only the columns needed."""
    found = {}
    by_file: dict[str, list[tuple[int, int]]] = {}
    for position, (path, row) in wanted.items():
        by_file.setdefault(path, []).append((position, row))
    for path, entries in by_file.items():
        table = io.read_parquet(path, [schema.EMBEDDING, schema.IMAGE_TOKENS, schema.TEXT_TOKENS])
        vectors = table.column(schema.EMBEDDING)
        image, text = (table.column(c).to_numpy() for c in (schema.IMAGE_TOKENS, schema.TEXT_TOKENS))
        for position, row in entries:
            vector = np.asarray(vectors[row].values.to_numpy(zero_copy_only=False), dtype=np.float32)
            found[position] = (vector, int(image[row]), int(text[row]))
    return found
