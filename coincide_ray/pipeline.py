"""The selection job, stage by stage, in one process: embeddings -> clusters -> selection.

Reads the embeddings in canonical record order (files sorted by name, then row order),
turns every bad row into a rejected row with a reason, and writes the contract files of
DESIGN.md under the output, manifest.json last.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coincide_ray import io, schema
from coincide_ray.cluster import spherical_kmeans
from coincide_ray.config import JobConfig
from coincide_ray.manifest import command_line, fingerprint, health, library_versions
from coincide_ray.select import select_from_clusters

Progress = Callable[[str], None]


class InputError(ValueError):
    """The input cannot give a run at all (as opposed to a bad record, which is rejected)."""


def stderr_progress(message: str) -> None:
    print(f"[coincide-ray] {message}", file=sys.stderr, flush=True)


@dataclass
class Embeddings:
    """Accepted rows in canonical order, and the rejected ones with their reasons."""

    ids: list[str] = field(default_factory=list)
    vectors: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), np.float32))
    rejected: list[tuple[str, str, str, str]] = field(default_factory=list)  # (sample_id, stage, reason, detail)
    files: list[tuple[str, int]] = field(default_factory=list)  # (uri, rows)

    @property
    def records(self) -> int:
        return len(self.ids) + len(self.rejected)


def read_embedding_file(uri: str) -> tuple[list[str | None], list[np.ndarray | None], list[tuple | None]]:
    """Ids, per-row float32 vectors (None where null), and the (stage, reason, detail) an
    earlier stage recorded for rows it rejected (None for the others)."""
    table = io.read_parquet(uri)
    schema.require_columns(table.schema, [schema.SAMPLE_ID, schema.EMBEDDING], uri)
    ids = table.column(schema.SAMPLE_ID).cast(pa.string()).to_pylist()
    column = table.column(schema.EMBEDDING).combine_chunks()
    lengths = pc.fill_null(pc.list_value_length(column), -1).to_numpy(zero_copy_only=False)
    values = pc.fill_null(pc.list_flatten(column).cast(pa.float32()), float("nan"))
    values = values.to_numpy(zero_copy_only=False)
    vectors: list[np.ndarray | None] = []
    offset = 0
    for length in lengths:
        if length < 0:
            vectors.append(None)
            continue
        vectors.append(values[offset : offset + length])
        offset += length
    earlier: list[tuple | None] = [None] * len(ids)
    if schema.REASON in table.schema.names:
        columns = [table.column(c).to_pylist() if c in table.schema.names else [None] * len(ids)
                   for c in (schema.STAGE, schema.REASON, schema.DETAIL)]
        earlier = [(stage, reason, detail) if reason else None for stage, reason, detail in zip(*columns)]
    return ids, vectors, earlier


def load_embeddings(uri: str, stage: str = "select") -> Embeddings:
    """Every row of every embeddings file under `uri`, checked; never raises on a bad row.

    The expected dimension is the most common one in the first file that has any vector.
    """
    out = Embeddings()
    rows: list[np.ndarray] = []
    first_seen: dict[str, str] = {}
    dim: int | None = None
    for path in io.list_files(uri, (".parquet",)):
        ids, vectors, earlier = read_embedding_file(path)
        out.files.append((path, len(ids)))
        if dim is None:
            dims = Counter(len(v) for v in vectors if v is not None and len(v))
            dim = dims.most_common(1)[0][0] if dims else None
        for row, (sample_id, vector) in enumerate(zip(ids, vectors)):
            where = f"{path}#{row}"
            reason, detail = None, where
            if earlier[row]:  # rejected by the stage that wrote the file: keep its verdict
                out.rejected.append((sample_id or where, *earlier[row]))
                continue
            if not sample_id:
                sample_id, reason = where, "missing sample_id"
            elif sample_id in first_seen:
                reason, detail = "duplicate sample_id", f"{where}; first at {first_seen[sample_id]}"
            elif vector is None or len(vector) == 0:
                reason = "missing embedding"
            elif len(vector) != dim:
                reason, detail = "wrong embedding dimension", f"{where}: {len(vector)}, expected {dim}"
            elif not np.isfinite(vector).all():
                reason = "embedding holds NaN or inf"
            first_seen.setdefault(sample_id, where)
            if reason:
                out.rejected.append((sample_id, stage, reason, detail))
            else:
                out.ids.append(sample_id)
                rows.append(vector)
    out.vectors = np.stack(rows).astype(np.float32, copy=False) if rows else np.zeros((0, dim or 0), np.float32)
    return out


def write_selected_records(input_uri: str, selected_ids: set[str], uri: str) -> int:
    """The selected original records, unchanged, in canonical order, as one JSON list."""
    from coincide_ray.records import read_raw_records

    chosen, seen = [], set()
    for _, raw in read_raw_records(input_uri):
        sample_id = raw.get("id") if isinstance(raw, dict) else None
        if sample_id in selected_ids and sample_id not in seen:  # a later duplicate of an id was rejected
            chosen.append(raw)
            seen.add(sample_id)
    io.write_json(chosen, uri)
    return len(chosen)


@dataclass(frozen=True)
class EmbedStats:
    """What the embed stage of this run did, for the manifest."""

    embedded: int  # vectors computed by this run; the other accepted ones were reused
    seconds: float


def recorded_layers(embeddings: str) -> tuple[int, ...]:
    """The layers the embed stage recorded in _provenance.json beside the embeddings."""
    path = io.join(embeddings, os.path.basename(schema.PROVENANCE_PATH))
    if not io.exists(path):
        raise InputError(f"no {path} to take the layers from: give --layers")
    return tuple(io.read_json(path)["layers"])


def run_select(config: JobConfig, progress: Progress = stderr_progress, embed: EmbedStats | None = None) -> dict:
    """k-means + COINCIDE selection over an embeddings Parquet; returns the manifest."""
    config.validate()
    if not config.embeddings:
        raise InputError("the select stage needs embeddings (--embeddings URI)")
    if not io.exists(config.embeddings):
        raise FileNotFoundError(f"no such file or folder: {config.embeddings}")
    if config.layers is None:
        config = dataclasses.replace(config, layers=recorded_layers(config.embeddings))
    timings: dict[str, float] = {"embed": embed.seconds} if embed else {}
    embedded = embed.embedded if embed else 0
    out = config.output

    start = time.perf_counter()
    data = load_embeddings(config.embeddings)
    timings["read"] = time.perf_counter() - start
    progress(f"read {data.records} records from {len(data.files)} file(s): "
             f"{len(data.ids)} accepted, {len(data.rejected)} rejected")
    if not data.ids:
        reasons = Counter(reason for _, _, reason, _ in data.rejected)
        raise InputError(f"no usable embeddings in {config.embeddings}: {len(data.rejected)} rows rejected "
                         f"({'; '.join(f'{n} x {r}' for r, n in reasons.most_common(3))})")
    if data.vectors.shape[1] % (2 * config.num_layers):
        raise InputError(f"embedding dimension {data.vectors.shape[1]} is not a multiple of "
                         f"2 * {config.num_layers} layers: do --layers match the embeddings?")

    start = time.perf_counter()
    kmeans = spherical_kmeans(data.vectors, config.cluster.clusters, iterations=config.cluster.iterations, seed=config.cluster.seed)
    timings["cluster"] = time.perf_counter() - start
    progress(f"k-means: K={config.cluster.clusters}, {config.cluster.iterations} iterations, "
             f"objective {kmeans.objective:.2f} ({timings['cluster']:.1f}s)")
    io.write_npy(kmeans.centroids, io.join(out, schema.CENTROIDS_PATH))
    io.write_parquet(pa.table({schema.SAMPLE_ID: data.ids, schema.CLUSTER: kmeans.assignments,
                               schema.COSINE: kmeans.cosine}, schema=schema.ASSIGNMENTS),
                     io.join(out, schema.ASSIGNMENTS_PATH))

    start = time.perf_counter()
    cfg = config.select
    selection = select_from_clusters(
        data.vectors, kmeans.assignments, kmeans.centroids, num_layers=config.num_layers, fraction=cfg.fraction,
        temperature=cfg.temperature, sigma=cfg.sigma, similarity_mask=cfg.similarity_mask,
        kernel_memory_bytes=cfg.kernel_memory_mb * 2**20,
    )
    timings["select"] = time.perf_counter() - start
    selected = np.zeros(len(data.ids), dtype=bool)
    selected[selection.selected] = True
    progress(f"selected {int(selected.sum())} of {len(data.ids)} (budget {selection.budget}) "
             f"({timings['select']:.1f}s)")
    io.write_parquet(pa.table(selection.clusters.as_columns(), schema=schema.SUMMARY), io.join(out, schema.SUMMARY_PATH))
    rank = pa.array(selection.rank, mask=selection.rank < 0, type=pa.int64())
    io.write_parquet(pa.table({schema.SAMPLE_ID: data.ids, schema.CLUSTER: kmeans.assignments, schema.RANK: rank,
                               schema.SELECTED: selected}, schema=schema.SELECTION), io.join(out, schema.SELECTION_PATH))
    rejected = list(zip(*data.rejected)) if data.rejected else [[]] * len(schema.REJECTED)
    io.write_parquet(pa.table(dict(zip(schema.REJECTED.names, rejected)),
                              schema=schema.REJECTED), io.join(out, schema.REJECTED_PATH))

    paths = [("centroids", schema.CENTROIDS_PATH), ("assignments", schema.ASSIGNMENTS_PATH),
             ("summary", schema.SUMMARY_PATH), ("selection", schema.SELECTION_PATH),
             ("rejected", schema.REJECTED_PATH)]
    if config.input:
        chosen = {data.ids[i] for i in selection.selected}
        written = write_selected_records(config.input, chosen, io.join(out, schema.SELECTED_RECORDS_PATH))
        progress(f"wrote {written} selected records to {io.join(out, schema.SELECTED_RECORDS_PATH)}")
        paths.append(("selected_records", schema.SELECTED_RECORDS_PATH))
    manifest = {
        "command": command_line(),
        "config": config.to_dict(),
        "versions": library_versions(),
        "input": {"embeddings": config.embeddings, "files": [p for p, _ in data.files],
                  "fingerprint": fingerprint(data.files)},
        "counts": {"records": data.records, "rejected": len(data.rejected), "selected": int(selected.sum()),
                   "embedded": embedded, "reused": len(data.ids) - embedded if embed else 0},
        "health": health(kmeans.centroids, selection.clusters.size, [r for _, _, r, _ in data.rejected],
                         selection.budget, int(selected.sum())),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "paths": {name: io.join(out, path) for name, path in paths},
    }
    io.write_json(manifest, io.join(out, schema.MANIFEST_PATH))  # last: marks the run complete
    progress(f"outputs under {out} (manifest: {io.join(out, schema.MANIFEST_PATH)})")
    return manifest
