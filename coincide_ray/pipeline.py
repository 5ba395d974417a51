"""The selection job: embeddings -> clusters -> selection -> manifest, on Ray.

The embeddings stay on shard workers (coincide_ray.cluster.stage); the driver holds ids,
assignments and ranks only. Every bad row becomes a rejected row with a reason; the
contract files of DESIGN.md are written under the output, manifest.json last.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa

from coincide_ray import io, schema
from coincide_ray.config import JobConfig
from coincide_ray.manifest import command_line, fingerprint, health, library_versions

Progress = Callable[[str], None]


class InputError(ValueError):
    """The input cannot give a run at all (as opposed to a bad record, which is rejected)."""


def stderr_progress(message: str) -> None:
    print(f"[coincide-ray] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class EmbedStats:
    """What the embed stage of this run did, for the manifest."""

    embedded: int  # vectors computed by this run; the other accepted ones were reused
    seconds: float


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


def recorded_layers(embeddings: str) -> tuple[int, ...]:
    """The layers the embed stage recorded in _provenance.json beside the embeddings."""
    path = io.join(embeddings, os.path.basename(schema.PROVENANCE_PATH))
    if not io.exists(path):
        raise InputError(f"no {path} to take the layers from: give --layers")
    return tuple(io.read_json(path)["layers"])


def run_select(config: JobConfig, progress: Progress = stderr_progress, embed: EmbedStats | None = None) -> dict:
    """k-means + COINCIDE selection over embeddings Parquet files; returns the manifest."""
    from coincide_ray.cluster.stage import ShardSet
    from coincide_ray.select.stage import select_on_ray

    config.validate()
    if not config.embeddings:
        raise InputError("the select stage needs embeddings (--embeddings URI)")
    if not io.exists(config.embeddings):
        raise FileNotFoundError(f"no such file or folder: {config.embeddings}")
    if config.layers is None:
        config = dataclasses.replace(config, layers=recorded_layers(config.embeddings))
    timings: dict[str, float] = {"embed": embed.seconds} if embed else {}
    out, cfg = config.output, config.select

    start = time.perf_counter()
    files = io.list_files(config.embeddings, (".parquet",))
    shards = ShardSet.load(files, config.cluster.workers)
    try:
        data = shards.verdict
        timings["read"] = time.perf_counter() - start
        progress(f"read {data.records} records from {len(files)} file(s) onto {len(shards.workers)} worker(s): "
                 f"{len(data.ids)} accepted, {len(data.rejected)} rejected")
        if not data.ids:
            reasons = Counter(reason for _, _, reason, _ in data.rejected)
            raise InputError(f"no usable embeddings in {config.embeddings}: {len(data.rejected)} rows rejected "
                             f"({'; '.join(f'{n} x {r}' for r, n in reasons.most_common(3))})")
        if data.dim % (2 * config.num_layers):
            raise InputError(f"embedding dimension {data.dim} is not a multiple of "
                             f"2 * {config.num_layers} layers: do --layers match the embeddings?")

        start = time.perf_counter()
        c = config.cluster
        kmeans = shards.kmeans(c.clusters, iterations=c.iterations, seed=c.seed, sample_fraction=c.sample_fraction)
        timings["cluster"] = time.perf_counter() - start
        progress(f"k-means: K={c.clusters}, {c.iterations} iterations, objective {kmeans.objective:.2f} "
                 f"({timings['cluster']:.1f}s)")
        io.write_npy(kmeans.centroids, io.join(out, schema.CENTROIDS_PATH))
        io.write_parquet(pa.table({schema.SAMPLE_ID: data.ids, schema.CLUSTER: kmeans.assignments,
                                   schema.COSINE: kmeans.cosine}, schema=schema.ASSIGNMENTS),
                         io.join(out, schema.ASSIGNMENTS_PATH))

        start = time.perf_counter()
        selection = select_on_ray(
            shards, kmeans.assignments, kmeans.centroids, num_layers=config.num_layers, fraction=cfg.fraction,
            temperature=cfg.temperature, sigma=cfg.sigma, similarity_mask=cfg.similarity_mask,
            kernel_memory_bytes=cfg.kernel_memory_mb * 2**20,
        )
        timings["select"] = time.perf_counter() - start
    finally:
        shards.close()
    selected = np.zeros(len(data.ids), dtype=bool)
    selected[selection.selected] = True
    progress(f"selected {int(selected.sum())} of {len(data.ids)} (budget {selection.budget}) "
             f"({timings['select']:.1f}s)")
    io.write_parquet(pa.table(selection.clusters.as_columns(), schema=schema.SUMMARY), io.join(out, schema.SUMMARY_PATH))
    rank = pa.array(selection.rank, mask=selection.rank < 0, type=pa.int64())
    io.write_parquet(pa.table({schema.SAMPLE_ID: data.ids, schema.CLUSTER: kmeans.assignments, schema.RANK: rank,
                               schema.SELECTED: selected}, schema=schema.SELECTION), io.join(out, schema.SELECTION_PATH))
    rejected = list(zip(*data.rejected)) if data.rejected else [[]] * len(schema.REJECTED)
    io.write_parquet(pa.table(dict(zip(schema.REJECTED.names, rejected)), schema=schema.REJECTED),
                     io.join(out, schema.REJECTED_PATH))

    paths = [("centroids", schema.CENTROIDS_PATH), ("assignments", schema.ASSIGNMENTS_PATH),
             ("summary", schema.SUMMARY_PATH), ("selection", schema.SELECTION_PATH),
             ("rejected", schema.REJECTED_PATH)]
    if config.input:
        chosen = {data.ids[i] for i in selection.selected}
        written = write_selected_records(config.input, chosen, io.join(out, schema.SELECTED_RECORDS_PATH))
        progress(f"wrote {written} selected records to {io.join(out, schema.SELECTED_RECORDS_PATH)}")
        paths.append(("selected_records", schema.SELECTED_RECORDS_PATH))
    embedded = embed.embedded if embed else 0
    manifest = {
        "command": command_line(),
        "config": config.to_dict(),
        "versions": library_versions(),
        "input": {"embeddings": config.embeddings, "files": files,
                  "fingerprint": fingerprint([(f, io.size(f)) for f in files])},
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
