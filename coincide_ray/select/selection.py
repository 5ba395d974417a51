"""COINCIDE selection over clustered embeddings (DESIGN.md steps 3-5), in memory."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coincide_ray.arrays import check_finite
from coincide_ray.select.budget import allocate_budget
from coincide_ray.select.mmd import DEFAULT_KERNEL_MEMORY_BYTES, ClusterKernel
from coincide_ray.select.scoring import transferability


@dataclass(frozen=True)
class ClusterTable:
    """One row per cluster id 0..K-1. Empty clusters have size 0, NaN density and score, quota 0."""

    cluster: np.ndarray
    size: np.ndarray
    transferability: np.ndarray
    density: np.ndarray
    score: np.ndarray
    quota: np.ndarray

    def as_columns(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass(frozen=True)
class Selection:
    selected: np.ndarray  # sorted int64 row indices
    rank: np.ndarray  # (N,) greedy position inside the row's cluster; -1 where not ranked
    clusters: ClusterTable
    budget: int  # int(fraction * N); the sum of quotas can fall short of it (see allocate_budget)


def members_by_cluster(assignments: np.ndarray, k: int) -> list[np.ndarray]:
    """Row indices of each cluster, in record order (the in-cluster position order)."""
    order = np.argsort(assignments, kind="stable")
    bounds = np.searchsorted(assignments[order], np.arange(k + 1))
    return [order[bounds[i] : bounds[i + 1]] for i in range(k)]


def select_from_clusters(
    embeddings: np.ndarray,
    assignments: np.ndarray,
    centroids: np.ndarray,
    *,
    num_layers: int,
    fraction: float,
    temperature: float = 0.1,
    sigma: float = 1.0,
    similarity_mask: float = 0.9,
    kernel_memory_bytes: int = DEFAULT_KERNEL_MEMORY_BYTES,
) -> Selection:
    """Score every cluster, allocate `int(fraction * N)` and fill each quota by greedy MMD.

    Clusters whose kernel fits in `kernel_memory_bytes` are ranked whole (one ranking serves
    every budget); larger ones are ranked blockwise up to their quota only.
    """
    embeddings = np.asarray(embeddings)
    centroids = np.asarray(centroids)
    assignments = np.asarray(assignments)
    if embeddings.ndim != 2 or centroids.ndim != 2:
        raise ValueError("embeddings and centroids must be 2-D arrays")
    n, dim = embeddings.shape
    k = len(centroids)
    if centroids.shape[1] != dim:
        raise ValueError(f"centroids have dimension {centroids.shape[1]}, embeddings {dim}")
    if assignments.shape != (n,):
        raise ValueError(f"assignments must have shape ({n},), got {assignments.shape}")
    if not np.issubdtype(assignments.dtype, np.integer):
        raise ValueError(f"assignments must be integers, got {assignments.dtype}")
    if n and (assignments.min() < 0 or assignments.max() >= k):
        raise ValueError(f"assignments must lie in [0, {k}); found {assignments.min()}..{assignments.max()}")
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    check_finite(embeddings)

    transfer = transferability(centroids, num_layers=num_layers, similarity_mask=similarity_mask)
    members = members_by_cluster(assignments, k)
    sizes = np.array([len(m) for m in members], dtype=np.int64)
    density = np.full(k, np.nan)
    rank = np.full(n, -1, dtype=np.int64)
    deferred: dict[int, ClusterKernel] = {}
    for cluster in np.flatnonzero(sizes):
        kernel = ClusterKernel(embeddings[members[cluster]], sigma=sigma, memory_bytes=kernel_memory_bytes)
        density[cluster] = kernel.density
        if kernel.in_memory:
            rank[members[cluster][kernel.greedy_order()]] = np.arange(sizes[cluster])
        else:
            deferred[int(cluster)] = kernel  # ranked once its quota is known
    score, budget, quota = scores_and_quotas(transfer, density, sizes, n, fraction, temperature)
    for cluster, kernel in deferred.items():
        rank[members[cluster][kernel.greedy_order(quota[cluster])]] = np.arange(quota[cluster])
    return assemble(rank, assignments, transfer, density, score, sizes, quota, budget)


def scores_and_quotas(transfer: np.ndarray, density: np.ndarray, sizes: np.ndarray, n: int, fraction: float,
                      temperature: float) -> tuple[np.ndarray, int, np.ndarray]:
    """score = S / D (NaN for empty clusters), the budget int(fraction * n), and the quotas."""
    score = np.where(sizes > 0, transfer / np.where(sizes > 0, density, 1.0), np.nan)
    budget = int(fraction * n)
    return score, budget, allocate_budget(np.nan_to_num(score), sizes, budget, temperature=temperature)


def assemble(rank: np.ndarray, assignments: np.ndarray, transfer: np.ndarray, density: np.ndarray,
             score: np.ndarray, sizes: np.ndarray, quota: np.ndarray, budget: int) -> Selection:
    """The Selection: each cluster's first `quota` rows in greedy order are selected."""
    selected = np.flatnonzero((rank >= 0) & (rank < quota[assignments])) if len(rank) else np.zeros(0, np.int64)
    table = ClusterTable(np.arange(len(sizes), dtype=np.int64), sizes, transfer, density, score, quota)
    return Selection(selected=selected.astype(np.int64), rank=rank, clusters=table, budget=budget)
