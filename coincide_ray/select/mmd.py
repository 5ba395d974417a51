"""Greedy MMD ranking and Gaussian-kernel density of one cluster (DESIGN.md steps 3 and 5).

The kernel is k(x, y) = exp(-||x - y||^2 / (2 sigma^2)) in float64. Greedy MMD adds, at
step s, the candidate c minimising MMD^2(X, S + {c}). With m_c the mean of kernel column c
over the cluster and r_c = sum_{j in S} k(c, j), that is (dropping terms equal for every
candidate, and k(c, c) = 1):

    g(c) = 2 r_c - 2 (s + 1) m_c

so each step costs O(n) once the column means are known, instead of recomputing every mean.

Exact duplicate rows share one kernel row and column, so they tie exactly and the lowest
in-cluster position wins. A cluster whose kernel fits in `memory_bytes` keeps it in memory;
a larger one is processed in row blocks and recomputes one kernel column per greedy step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coincide_ray.arrays import check_finite

DEFAULT_KERNEL_MEMORY_BYTES = 512 * 2**20


def _gaussian_(gram: np.ndarray, sq_rows: np.ndarray, sq_cols: np.ndarray, sigma: float) -> np.ndarray:
    """Turn a Gram block into Gaussian kernel values, in place."""
    gram *= -2.0
    gram += sq_rows[:, None]
    gram += sq_cols[None, :]
    np.maximum(gram, 0.0, out=gram)  # rounding can make ||x - y||^2 slightly negative
    gram *= -1.0 / (2.0 * sigma * sigma)
    np.exp(gram, out=gram)
    return gram


class ClusterKernel:
    """The Gaussian kernel of one cluster, ready for density and greedy ranking.

    Rows are deduplicated first (unique rows ordered by first occurrence, so a cluster
    without duplicates keeps its own order). `column_means[i]` is the mean of kernel
    column i over all n members; the density is the mean of those. A blockwise cluster's
    column means may be passed in from an earlier pass, to rank it without recomputing them.
    """

    def __init__(self, x: np.ndarray, *, sigma: float = 1.0, memory_bytes: int = DEFAULT_KERNEL_MEMORY_BYTES,
                 column_means: np.ndarray | None = None):
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D array of cluster members, got shape {x.shape}")
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        check_finite(x)
        self.n = len(x)
        self.sigma = float(sigma)
        x64 = np.ascontiguousarray(x, dtype=np.float64) + 0.0  # + 0.0 turns -0.0 into 0.0
        self.unique, self.inverse, self.weights = _unique_rows(x64)
        self.sq = np.einsum("ij,ij->i", self.unique, self.unique)
        u = len(self.unique)
        self.in_memory = u * u * 8 <= memory_bytes
        self.kernel: np.ndarray | None = None
        if self.n == 0:
            self.column_means = np.zeros(0)
        elif self.in_memory:
            self.kernel = self._block(0, u)
            self.column_means = (self.weights @ self.kernel)[self.inverse] / self.n
        elif column_means is not None:  # known from an earlier pass over this cluster
            self.column_means = np.asarray(column_means, dtype=np.float64)
        else:
            block_rows = max(1, memory_bytes // (2 * 8 * u))
            sums = np.zeros(u)
            for start in range(0, u, block_rows):
                stop = min(start + block_rows, u)
                sums += self.weights[start:stop] @ self._block(start, stop)
            self.column_means = sums[self.inverse] / self.n

    @property
    def density(self) -> float:
        """Mean kernel value over all n^2 ordered pairs (self pairs included)."""
        return float(self.column_means.mean()) if self.n else float("nan")

    def _block(self, start: int, stop: int) -> np.ndarray:
        gram = _gaussian_(self.unique[start:stop] @ self.unique.T, self.sq[start:stop], self.sq, self.sigma)
        rows = np.arange(stop - start)
        gram[rows, rows + start] = 1.0  # a row's distance to itself is exactly zero
        return gram

    def _column(self, position: int) -> np.ndarray:
        """k(member, x_position) for every member, in member order."""
        row = self.inverse[position]
        if self.kernel is not None:
            col = self.kernel[row]
        else:
            col = self._block(row, row + 1)[0]
        return col if self.inverse_is_identity else col[self.inverse]

    @property
    def inverse_is_identity(self) -> bool:
        return len(self.unique) == self.n

    def greedy_order(self, limit: int | None = None) -> np.ndarray:
        """In-cluster positions in greedy-MMD order: the first `limit`, or all."""
        steps = self.n if limit is None else max(0, min(int(limit), self.n))
        order = np.empty(steps, dtype=np.int64)
        twice_r = np.zeros(self.n)  # 2 * r_c, +inf once c is taken
        g = np.empty(self.n)
        for s in range(steps):
            np.multiply(self.column_means, -2.0 * (s + 1), out=g)
            g += twice_r
            c = int(np.argmin(g))  # first minimum: ties go to the lowest position
            order[s] = c
            twice_r += 2.0 * self._column(c)
            twice_r[c] = np.inf
        return order


def _unique_rows(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Unique rows in order of first occurrence, the map row -> unique row, and multiplicities."""
    n = len(x)
    if n == 0:
        return x, np.zeros(0, dtype=np.int64), np.zeros(0)
    keys = x.view(np.dtype((np.void, x.dtype.itemsize * x.shape[1]))).reshape(n)
    _, first, inverse = np.unique(keys, return_index=True, return_inverse=True)
    inverse = inverse.reshape(n)
    by_first = np.argsort(first, kind="stable")
    rank = np.empty_like(by_first)
    rank[by_first] = np.arange(len(first))
    inverse = rank[inverse]
    weights = np.bincount(inverse, minlength=len(first)).astype(np.float64)
    return x[first[by_first]], inverse.astype(np.int64), weights


@dataclass(frozen=True)
class ClusterRanking:
    order: np.ndarray  # in-cluster positions in greedy order
    density: float


def rank_cluster(
    x: np.ndarray,
    *,
    sigma: float = 1.0,
    limit: int | None = None,
    memory_bytes: int = DEFAULT_KERNEL_MEMORY_BYTES,
) -> ClusterRanking:
    """Density and greedy-MMD order of one cluster from a single kernel computation."""
    kernel = ClusterKernel(x, sigma=sigma, memory_bytes=memory_bytes)
    return ClusterRanking(order=kernel.greedy_order(limit), density=kernel.density)


def greedy_mmd_order(
    x: np.ndarray,
    *,
    sigma: float = 1.0,
    limit: int | None = None,
    memory_bytes: int = DEFAULT_KERNEL_MEMORY_BYTES,
) -> np.ndarray:
    """Row indices of `x` in greedy-MMD order (DESIGN.md step 5): the first `limit`, or all.

    The order does not depend on `limit`: a shorter ranking is a prefix of a longer one.
    """
    return rank_cluster(x, sigma=sigma, limit=limit, memory_bytes=memory_bytes).order
