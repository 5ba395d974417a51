"""Cluster scoring and greedy-MMD ranking fanned out over Ray tasks.

Clusters are packed into buckets by kernel work and by the bytes of their rows (many small
clusters per task; a cluster too large to rank in memory gets a bucket of its own). Shard
workers hand over their rows of a bucket when its task is about to start, and only a few
buckets are in the object store at a time; one task per bucket computes each cluster's
density and its whole greedy ranking. The driver computes transferability from the centroids and the
budget with the core functions, then ranks giant clusters up to their quota from the column
means their first pass returned. The result equals `select_from_clusters` on the same rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import ray

from coincide_ray.cluster.stage import ShardSet
from coincide_ray.select.mmd import ClusterKernel
from coincide_ray.select.scoring import transferability
from coincide_ray.select.selection import Selection, assemble, scores_and_quotas

BUCKET_PAIRS = 50_000_000  # kernel entries per scoring task: about a second of work
BUCKET_BYTES = 16 * 2**20  # float32 rows per scoring task: what one bucket puts in the object store


@dataclass
class ClusterScore:
    cluster: int
    density: float
    members: np.ndarray  # global row indices, canonical order
    order: np.ndarray | None  # full ranking (positions in `members`), None for giant clusters
    column_means: np.ndarray | None  # kept for giant clusters, to rank them later


def plan_buckets(sizes: np.ndarray, memory_bytes: int, dim: int = 0) -> np.ndarray:
    """Bucket id per cluster (-1 for empty ones): clusters in id order, a bucket closed when
    its kernel entries would pass BUCKET_PAIRS or its `dim`-float rows BUCKET_BYTES."""
    bucket = np.full(len(sizes), -1, dtype=np.int64)
    row_cap = max(1, BUCKET_BYTES // (4 * dim)) if dim else None
    current, load, rows = 0, 0, 0
    for cluster in np.flatnonzero(sizes):
        size = int(sizes[cluster])
        if size * size * 8 > memory_bytes:  # ranked blockwise: alone
            current += 1 if rows else 0
            bucket[cluster] = current
            current, load, rows = current + 1, 0, 0
            continue
        if rows and (load + size * size > BUCKET_PAIRS or (row_cap and rows + size > row_cap)):
            current, load, rows = current + 1, 0, 0
        bucket[cluster] = current
        load, rows = load + size * size, rows + size
    return bucket


def _rows(parts: list[ray.ObjectRef]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Concatenate shard groups and put them in canonical order."""
    pieces = ray.get(parts)
    index = np.concatenate([p[0] for p in pieces])
    cluster = np.concatenate([p[1] for p in pieces])
    x = np.concatenate([p[2] for p in pieces])
    order = np.argsort(index, kind="stable")
    return index[order], cluster[order], x[order]


@ray.remote(num_cpus=1)
def score_bucket(parts: list[ray.ObjectRef], sigma: float, memory_bytes: int) -> list[ClusterScore]:
    index, cluster, x = _rows(parts)
    scores = []
    for c in np.unique(cluster):
        rows = np.flatnonzero(cluster == c)
        kernel = ClusterKernel(x[rows], sigma=sigma, memory_bytes=memory_bytes)
        full = kernel.in_memory
        scores.append(ClusterScore(int(c), kernel.density, index[rows], kernel.greedy_order() if full else None,
                                   None if full else kernel.column_means))
    return scores


@ray.remote(num_cpus=1)
def rank_giant(parts: list[ray.ObjectRef], cluster: int, column_means: np.ndarray, quota: int,
               sigma: float, memory_bytes: int) -> np.ndarray:
    _, clusters, x = _rows(parts)
    kernel = ClusterKernel(x[clusters == cluster], sigma=sigma, memory_bytes=memory_bytes, column_means=column_means)
    return kernel.greedy_order(quota)


def bounded(tasks, in_flight: int):
    """Results of the tasks a generator submits, in submission order, with at most
    `in_flight` submitted and unfinished: a task's input rows are created only when it is
    submitted and freed when its result is read."""
    window: list[ray.ObjectRef] = []
    for task in tasks:
        window.append(task)
        if len(window) >= in_flight:
            yield ray.get(window.pop(0))
    while window:
        yield ray.get(window.pop(0))


def select_on_ray(shards: ShardSet, assignments: np.ndarray, centroids: np.ndarray, *, num_layers: int,
                  fraction: float, temperature: float = 0.1, sigma: float = 1.0, similarity_mask: float = 0.9,
                  kernel_memory_bytes: int) -> Selection:
    """`select_from_clusters` with the per-cluster work on Ray tasks over the shards' rows;
    run again from the start, on rebuilt shards, when a node is lost while it runs."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    return shards.survive("scoring", lambda: _select(shards, assignments, centroids, num_layers, fraction,
                                                     temperature, sigma, similarity_mask, kernel_memory_bytes))


def _select(shards: ShardSet, assignments: np.ndarray, centroids: np.ndarray, num_layers: int, fraction: float,
            temperature: float, sigma: float, similarity_mask: float, kernel_memory_bytes: int) -> Selection:
    k, n = len(centroids), len(assignments)
    transfer = transferability(centroids, num_layers=num_layers, similarity_mask=similarity_mask)
    sizes = np.bincount(assignments, minlength=k).astype(np.int64)
    bucket_of = plan_buckets(sizes, kernel_memory_bytes, shards.dim)
    shared = (ray.put(np.asarray(assignments, dtype=np.int64)), ray.put(bucket_of))  # sent once, read by every shard

    def rows_of(bucket: int) -> list[ray.ObjectRef]:
        return [w.bucket_rows.remote(*shared, int(bucket)) for w in shards.workers]

    tasks = (score_bucket.remote(rows_of(b), sigma, kernel_memory_bytes) for b in np.unique(bucket_of[bucket_of >= 0]))
    density = np.full(k, np.nan)
    rank = np.full(n, -1, dtype=np.int64)
    giants: list[ClusterScore] = []
    in_flight = max(2, int(ray.cluster_resources().get("CPU", 1)))
    for scores in bounded(tasks, in_flight):
        for score in scores:
            density[score.cluster] = score.density
            if score.order is None:
                giants.append(score)
            else:
                rank[score.members[score.order]] = np.arange(len(score.members))
    score, budget, quota = scores_and_quotas(transfer, density, sizes, n, fraction, temperature)
    ranked = (rank_giant.remote(rows_of(bucket_of[g.cluster]), g.cluster, g.column_means,
                                int(quota[g.cluster]), sigma, kernel_memory_bytes) for g in giants)
    for giant, order in zip(giants, bounded(ranked, in_flight)):
        rank[giant.members[order]] = np.arange(len(order))
    return assemble(rank, assignments, transfer, density, score, sizes, quota, budget)
