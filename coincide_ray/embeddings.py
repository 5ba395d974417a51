"""Reading embeddings files and judging their rows (pure; shared by every select path).

Reading and judging are separate so that workers can read files where they will keep the
vectors, while the driver, which sees every file, decides which rows are accepted: the
expected dimension and duplicate ids are decisions over the whole input.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coincide_ray import io, schema


@dataclass
class FileRows:
    """What one embeddings file holds, without its vectors."""

    path: str
    ids: list[str | None]
    lengths: np.ndarray  # vector length per row; -1 where the embedding is null
    finite: np.ndarray  # False where the vector holds NaN or inf
    earlier: list[tuple | None]  # (stage, reason, detail) an earlier stage recorded, else None


READ_BATCH_ROWS = 256  # rows decoded at a time (Arrow grows a batch's buffers while decoding: keep it small)


def read_file(uri: str) -> tuple[FileRows, list[tuple[int, np.ndarray]]]:
    """The file's rows, and its vectors per batch of READ_BATCH_ROWS rows: (rows in the
    batch, one flat array of their values; a null vector holds none, and a row's vector ends
    at the cumulative sum of its batch's lengths). float16 vectors stay float16 (the k-means
    arithmetic widens them chunk by chunk), any other type becomes float32. The flat arrays
    are Arrow's own decoded buffers when the file holds float16 or float32 without nulls:
    keeping them costs no copy."""
    file_schema, batches = io.read_parquet_batches(uri, READ_BATCH_ROWS)
    schema.require_columns(file_schema, [schema.SAMPLE_ID, schema.EMBEDDING], uri)
    ids, lengths, finite, values, earlier = [], [], [], [], []
    notes = [schema.STAGE, schema.REASON, schema.DETAIL] if schema.REASON in file_schema.names else []
    while batches:
        batch = batches.pop(0)  # dropped as soon as it is read: its vectors live on in `values`
        ids += batch.column(schema.SAMPLE_ID).cast(pa.string()).to_pylist()
        column = batch.column(schema.EMBEDDING)
        length = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = pc.list_flatten(column)
        flat = flat if flat.type in (pa.float16(), pa.float32()) else flat.cast(pa.float32())
        if flat.null_count:  # a null element inside a vector: NaN, which judge() rejects
            flat = pc.fill_null(flat, float("nan"))
        flat = flat.to_numpy(zero_copy_only=False)  # no copy when there are no nulls
        good, ends = np.isfinite(flat), np.cumsum(np.maximum(length, 0))
        finite += [n < 0 or bool(good[end - n : end].all()) for n, end in zip(length, ends)]
        lengths.append(length)
        values.append((batch.num_rows, flat))
        if notes:
            columns = [batch.column(c).to_pylist() if c in file_schema.names else [None] * batch.num_rows for c in notes]
            earlier += [(stage, reason, detail) if reason else None for stage, reason, detail in zip(*columns)]
        else:
            earlier += [None] * batch.num_rows
    lengths = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    return FileRows(uri, ids, lengths, np.array(finite, dtype=bool), earlier), values


@dataclass
class Verdict:
    """Which rows go on to clustering, in canonical order, and why the others do not."""

    dim: int
    accepted: list[np.ndarray] = field(default_factory=list)  # per file: bool mask of accepted rows
    ids: list[str] = field(default_factory=list)  # accepted ids, canonical order
    rejected: list[tuple[str, str, str, str]] = field(default_factory=list)  # (sample_id, stage, reason, detail)

    @property
    def records(self) -> int:
        return len(self.ids) + len(self.rejected)


class MixedDimensionsError(ValueError):
    """Vectors of several dimensions with none in the majority and none recorded."""


def expected_dimension(files: list[FileRows]) -> int:
    """The dimension held by more than half of the vectors; MixedDimensionsError otherwise.
    Counted over every file, so a small stray file of another dimension that sorts first
    does not decide it."""
    dims = Counter(int(n) for rows in files for n in rows.lengths if n > 0)
    if not dims:
        return 0
    (dim, count), total = dims.most_common(1)[0], sum(dims.values())
    if 2 * count <= total:
        found = ", ".join(f"{d}: {n} rows" for d, n in sorted(dims.items(), key=lambda item: (-item[1], -item[0])))
        raise MixedDimensionsError(f"the embeddings mix dimensions ({found}) and no _provenance.json says which "
                                   "is meant: select them from one run, or remove the files of the other")
    return dim


def judge(files: list[FileRows], stage: str = "select", dim: int | None = None) -> Verdict:
    """Accept or reject every row of `files` (given in canonical order).

    The expected dimension is `dim` (the one the embed stage recorded) or the majority's;
    of several copies of an id the first acceptable one is kept and later ones are
    duplicates (a rejected first copy does not hide a good second one); a verdict an
    earlier stage wrote into the file stands."""
    verdict = Verdict(dim if dim else expected_dimension(files))
    kept: dict[str, str] = {}  # accepted id -> where
    for rows in files:
        mask = np.zeros(len(rows.ids), dtype=bool)
        for row, sample_id in enumerate(rows.ids):
            where = f"{rows.path}#{row}"
            reason, detail = None, where
            if rows.earlier[row]:
                verdict.rejected.append((sample_id or where, *rows.earlier[row]))
                continue
            if not sample_id:
                sample_id, reason = where, "missing sample_id"
            elif sample_id in kept:
                reason, detail = "duplicate sample_id", f"{where}; first at {kept[sample_id]}"
            elif rows.lengths[row] <= 0:
                reason = "missing embedding"
            elif rows.lengths[row] != verdict.dim:
                reason, detail = "wrong embedding dimension", f"{where}: {rows.lengths[row]}, expected {verdict.dim}"
            elif not rows.finite[row]:
                reason = "embedding holds NaN or inf"
            if reason:
                verdict.rejected.append((sample_id, stage, reason, detail))
            else:
                kept[sample_id] = where
                verdict.ids.append(sample_id)
                mask[row] = True
        verdict.accepted.append(mask)
    return verdict


def accepted_rows(rows: FileRows, values: list[tuple[int, np.ndarray]], mask: np.ndarray,
                  dim: int) -> list[np.ndarray]:
    """The accepted rows of one file as (n, dim) blocks (float16 or float32, as read), one per batch of `values`.
    A batch whose vectors are all accepted (the usual case) is its flat array reshaped: no
    copy. The others are copied without their rejected rows."""
    blocks, start = [], 0
    for count, flat in values:
        lengths = rows.lengths[start : start + count]
        keep, present = mask[start : start + count], lengths > 0
        if np.array_equal(keep, present) and len(flat) == int(keep.sum()) * dim:
            blocks.append(flat.reshape(-1, dim))
        else:
            ends = np.cumsum(np.maximum(lengths, 0))
            blocks.append(np.stack([flat[end - dim : end] for end in ends[keep]]) if keep.any()
                          else np.zeros((0, dim), flat.dtype))
        start += count
    return blocks
