"""Spherical k-means (DESIGN.md step 2): pure steps plus an in-memory driver.

One Lloyd iteration is `assign` + `partial_sums` on each shard, a sum of the partial
statistics, then `update_centroids`. The distributed version runs the first two where the
shards live and reduces in float64 in shard order, so the result does not depend on how
rows are split.
"""

from __future__ import annotations

from dataclasses import dataclass

import faiss
import numpy as np

from coincide_ray.arrays import check_finite, unit_rows


def initial_centroids(x_unit: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k distinct rows drawn with `seed`; if there are fewer rows than k, seeded random
    unit vectors fill the rest (those clusters may stay empty)."""
    rng = np.random.default_rng(seed)
    n, d = x_unit.shape
    picks = np.sort(rng.choice(n, size=min(n, k), replace=False)) if n else np.zeros(0, np.int64)
    centroids = np.empty((k, d), dtype=np.float32)
    centroids[: len(picks)] = x_unit[picks]
    if k > len(picks):
        centroids[len(picks) :] = unit_rows(rng.standard_normal((k - len(picks), d)))
    return centroids


def assign(x_unit: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine for each unit row: (cluster int64, cosine float32)."""
    if len(x_unit) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    cosine, cluster = index.search(np.ascontiguousarray(x_unit, dtype=np.float32), 1)
    return cluster[:, 0].astype(np.int64), cosine[:, 0]


@dataclass(frozen=True)
class PartialSums:
    """What one shard contributes to an update: per-cluster sums and counts, and its
    `spare` worst-fitting rows (lowest cosine first), candidates to reseed empty clusters."""

    sums: np.ndarray  # (k, d) float64
    counts: np.ndarray  # (k,) int64
    spare_rows: np.ndarray  # (m, d) float32
    spare_cosine: np.ndarray  # (m,) float32
    spare_cluster: np.ndarray  # (m,) int64

    @staticmethod
    def combine(parts: list["PartialSums"], spare: int) -> "PartialSums":
        """Sum shard statistics in list order (fixed order: reproducible float64 sums)."""
        sums = parts[0].sums.copy()
        counts = parts[0].counts.copy()
        for part in parts[1:]:
            sums += part.sums
            counts += part.counts
        rows = np.concatenate([p.spare_rows for p in parts])
        cosine = np.concatenate([p.spare_cosine for p in parts])
        cluster = np.concatenate([p.spare_cluster for p in parts])
        worst = np.argsort(cosine, kind="stable")[:spare]
        return PartialSums(sums, counts, rows[worst], cosine[worst], cluster[worst])


def partial_sums(
    x_unit: np.ndarray, cluster: np.ndarray, cosine: np.ndarray, k: int, *, spare: int = 0
) -> PartialSums:
    """Per-cluster float64 sums and counts of one shard, summed in row order."""
    d = x_unit.shape[1]
    sums = np.zeros((k, d))
    counts = np.bincount(cluster, minlength=k).astype(np.int64)
    if len(cluster):
        order = np.argsort(cluster, kind="stable")
        present = np.flatnonzero(counts)
        starts = np.concatenate([[0], np.cumsum(counts[present])[:-1]])
        sums[present] = np.add.reduceat(x_unit[order].astype(np.float64), starts, axis=0)
    worst = np.argsort(cosine, kind="stable")[:spare]
    return PartialSums(sums, counts, x_unit[worst], cosine[worst], cluster[worst])


def update_centroids(stats: PartialSums, previous: np.ndarray) -> np.ndarray:
    """New unit centroids from summed statistics.

    An empty cluster is reseeded with the worst-fitting spare row not already used, taken
    out of its old cluster's sum; with no spare row left it keeps its previous centroid.
    """
    sums = stats.sums.copy()
    counts = stats.counts.copy()
    centroids = previous.astype(np.float32, copy=True)
    reseeded = np.zeros(len(counts), dtype=bool)
    spare = 0
    for empty in np.flatnonzero(counts == 0):
        while spare < len(stats.spare_rows) and counts[stats.spare_cluster[spare]] <= 1:
            spare += 1  # never empty another cluster to fill this one
        if spare == len(stats.spare_rows):
            break
        row, old = stats.spare_rows[spare], stats.spare_cluster[spare]
        sums[old] -= row
        counts[old] -= 1
        centroids[empty] = row
        reseeded[empty] = True
        spare += 1
    filled = (counts > 0) & ~reseeded
    centroids[filled] = unit_rows(sums[filled])
    return centroids


@dataclass(frozen=True)
class KMeansResult:
    centroids: np.ndarray  # (k, d) float32, unit rows
    assignments: np.ndarray  # (n,) int64
    cosine: np.ndarray  # (n,) float32 cosine of each row to its centroid
    objective: float  # sum of cosines to the assigned centroid


def check_kmeans_args(k: int, iterations: int) -> None:
    if k < 1:
        raise ValueError(f"the number of clusters must be at least 1, got {k}")
    if iterations < 0:
        raise ValueError(f"iterations must be non-negative, got {iterations}")


def spherical_kmeans(
    x: np.ndarray, k: int, *, iterations: int = 50, seed: int = 1234, init: np.ndarray | None = None
) -> KMeansResult:
    """Spherical (cosine) k-means of an in-memory (n, d) array.

    Rows are L2-normalised; each of `iterations` Lloyd rounds assigns every row to its
    nearest centroid (faiss inner-product search), then sets each centroid to the
    normalised mean of its rows. A final assignment gives `assignments` and `objective`.
    `init` (k, d) replaces the seeded draw of k rows, e.g. a previous run's centroids.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    check_kmeans_args(k, iterations)
    check_finite(x)
    x_unit = unit_rows(x)
    if init is None:
        centroids = initial_centroids(x_unit, k, seed)
    else:
        if np.shape(init) != (k, x.shape[1]):
            raise ValueError(f"initial centroids must have shape {(k, x.shape[1])}, got {np.shape(init)}")
        check_finite(np.asarray(init), "initial centroid")
        centroids = unit_rows(init)
    for _ in range(iterations):
        cluster, cosine = assign(x_unit, centroids)
        stats = partial_sums(x_unit, cluster, cosine, k, spare=k)
        centroids = update_centroids(stats, centroids)
    cluster, cosine = assign(x_unit, centroids)
    return KMeansResult(centroids, cluster, cosine, float(cosine.astype(np.float64).sum()))
