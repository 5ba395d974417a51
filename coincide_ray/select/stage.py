"""Cluster scoring and greedy-MMD ranking fanned out over Ray tasks.

Clusters are packed into buckets by kernel work (many small clusters per task; a cluster
too large to rank in memory gets a bucket of its own). Shard workers put their rows of each
bucket in the object store; one task per bucket computes each cluster's density and its
whole greedy ranking. The driver computes transferability from the centroids and the
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


@dataclass
class ClusterScore:
    cluster: int
    density: float
    members: np.ndarray  # global row indices, canonical order
    order: np.ndarray | None  # full ranking (positions in `members`), None for giant clusters
    column_means: np.ndarray | None  # kept for giant clusters, to rank them later


def plan_buckets(sizes: np.ndarray, memory_bytes: int) -> np.ndarray:
    """Bucket id per cluster (-1 for empty ones)."""
    bucket = np.full(len(sizes), -1, dtype=np.int64)
    current, load = 0, 0
    for cluster in np.flatnonzero(sizes):
        pairs = int(sizes[cluster]) ** 2
        if pairs * 8 > memory_bytes:  # ranked blockwise: alone
            current += 1 if load else 0
            bucket[cluster] = current
            current, load = current + 1, 0
            continue
        if load and load + pairs > BUCKET_PAIRS:
            current, load = current + 1, 0
        bucket[cluster] = current
        load += pairs
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


def select_on_ray(shards: ShardSet, assignments: np.ndarray, centroids: np.ndarray, *, num_layers: int,
                  fraction: float, temperature: float = 0.1, sigma: float = 1.0, similarity_mask: float = 0.9,
                  kernel_memory_bytes: int) -> Selection:
    """`select_from_clusters` with the per-cluster work on Ray tasks over the shards' rows."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    k, n = len(centroids), len(assignments)
    transfer = transferability(centroids, num_layers=num_layers, similarity_mask=similarity_mask)
    sizes = np.bincount(assignments, minlength=k).astype(np.int64)
    bucket_of = plan_buckets(sizes, kernel_memory_bytes)
    shared = ray.put(np.asarray(assignments, dtype=np.int64))  # sent once, read by every shard
    exports = ray.get([w.export.remote(shared, bucket_of) for w in shards.workers])
    parts_of = {b: [refs[b] for refs in exports if b in refs] for b in np.unique(bucket_of[bucket_of >= 0])}
    tasks = [score_bucket.remote(parts, sigma, kernel_memory_bytes) for parts in parts_of.values()]
    density = np.full(k, np.nan)
    rank = np.full(n, -1, dtype=np.int64)
    giants: list[ClusterScore] = []
    for scores in ray.get(tasks):
        for score in scores:
            density[score.cluster] = score.density
            if score.order is None:
                giants.append(score)
            else:
                rank[score.members[score.order]] = np.arange(len(score.members))
    score, budget, quota = scores_and_quotas(transfer, density, sizes, n, fraction, temperature)
    ranked = [rank_giant.remote(parts_of[bucket_of[g.cluster]], g.cluster, g.column_means,
                                int(quota[g.cluster]), sigma, kernel_memory_bytes) for g in giants]
    for giant, order in zip(giants, ray.get(ranked)):
        rank[giant.members[order]] = np.arange(len(order))
    return assemble(rank, assignments, transfer, density, score, sizes, quota, budget)
