"""Spherical k-means (DESIGN.md step 2): pure steps plus an in-memory driver.

One Lloyd iteration is `assign` + `partial_sums` on each shard, a sum of the partial
statistics, then `update_centroids`. The distributed version runs the first two where the
shards live and sums what they return. Per-cluster sums are kept in int64 fixed point
(2^-36 resolution), so adding them is exact and the result is the same bits however the
rows are split into shards and in whatever order the parts arrive.

The arithmetic is torch on a device: the rows stay in the dtype they were stored in
(float16 or float32; bfloat16 on a GPU) and are widened to float32 a chunk at a time. A GPU
shard runs exactly this code with device "cuda"; the CPU tests exercise it with "cpu".
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

from coincide_ray.arrays import check_finite


def initial_draw(n: int, d: int, k: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The seeded start: indices of min(n, k) distinct rows (sorted), and seeded random unit
    vectors for the rest when there are fewer rows than k (those clusters may stay empty)."""
    rng = np.random.default_rng(seed)
    picks = np.sort(rng.choice(n, size=min(n, k), replace=False)) if n else np.zeros(0, np.int64)
    filler = normalised(rng.standard_normal((k - len(picks), d))) if k > len(picks) else np.zeros((0, d), np.float32)
    return picks.astype(np.int64), filler


def initial_centroids(x_unit: np.ndarray, k: int, seed: int) -> np.ndarray:
    picks, filler = initial_draw(len(x_unit), x_unit.shape[1], k, seed)
    return np.concatenate([x_unit[picks], filler]).astype(np.float32, copy=False)


def sample_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """Rows the centroids are fitted on when fitting on a sample (all rows at fraction 1)."""
    if fraction >= 1.0:
        return np.ones(n, dtype=bool)
    return np.random.default_rng([seed, 1]).random(n) < fraction


FIXED_POINT = 2.0**36  # sums of up to 2^27 unit rows per cluster fit in int64
SCORE_ELEMENTS = 2**22  # row-centroid products held at a time (16 MB of float32)


def as_tensor(rows, device: str = "cpu") -> torch.Tensor:
    """Rows as a tensor on `device` in their own dtype (float16 stays float16). On the CPU
    a numpy array's buffer is shared, not copied; Arrow's read-only buffers included."""
    if isinstance(rows, torch.Tensor):
        return rows.to(device)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not writable: nothing here writes to it
        return torch.from_numpy(np.asarray(rows)).to(device)


WIDE_ELEMENTS = 2**19  # float32 values widened to float64 at a time (4 MB): small temporaries at any dimension


def wide_parts(rows: torch.Tensor):
    """Slices of whole rows of `rows`, WIDE_ELEMENTS values or fewer each (at least one row)."""
    step = max(1, WIDE_ELEMENTS // max(rows.shape[1], 1))
    for start in range(0, len(rows), step):
        yield slice(start, start + step)


def unit(rows: torch.Tensor) -> torch.Tensor:
    """Rows widened to float32 and scaled to unit L2 norm; zero rows stay zero.

    Every k-means path normalises through this function. The norm is summed in float64 and
    then rounded to float32, so a row gets the same unit vector whether it is normalised
    alone or among thousands (a float32 sum's order, and so its last bit, depends on how the
    library splits the reduction; the float64 sum would have to land within 1e-16 of a
    float32 rounding boundary to show it)."""
    x = rows.float()
    norms = torch.empty((len(x), 1), dtype=torch.float32, device=x.device)
    for part in wide_parts(x):
        norms[part] = torch.linalg.vector_norm(x[part].double(), dim=1, keepdim=True).float()
    out = x / norms.clamp(min=torch.finfo(torch.float32).tiny)
    out[norms[:, 0] == 0] = 0.0  # +0.0 whatever the signs of a zero row's entries
    return out


def row_cosines(x_unit: torch.Tensor, centroids: torch.Tensor, nearest: torch.Tensor) -> torch.Tensor:
    """Each unit row's product with its centroid `centroids[nearest]`, summed in float64
    (a row at a time, so its bits never depend on its batch), rounded to float32."""
    cosine = torch.empty(len(x_unit), dtype=torch.float32, device=x_unit.device)
    for part in wide_parts(x_unit):
        cosine[part] = (x_unit[part].double() * centroids[nearest[part]].double()).sum(dim=1).float()
    return cosine


def normalised(rows) -> np.ndarray:
    """`unit` for numpy rows on the CPU: float32 unit rows."""
    return unit(as_tensor(rows)).numpy()


class CentroidIndex:
    """The centroids as float32 on the rows' device: products with rows of any dtype are
    accumulated in float32, a chunk of rows at a time. On a GPU node the rows stay there in
    float16 or bfloat16; on the CPU the same code runs in float32."""

    def __init__(self, centroids: np.ndarray, device: str = "cpu"):
        self.centroids = as_tensor(np.ascontiguousarray(centroids, dtype=np.float32), device)
        self.rows_at_a_time = max(1, SCORE_ELEMENTS // max(len(centroids), 1))

    def assign(self, x_unit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest centroid by cosine for each float32 unit row: (cluster int64, cosine float32).

        The cosine is recomputed row by row in float64: a product's last bit can depend on
        the batch a row is in, and these cosines pick the rows that reseed empty clusters."""
        cluster = torch.empty(len(x_unit), dtype=torch.int64, device=x_unit.device)
        cosine = torch.empty(len(x_unit), dtype=torch.float32, device=x_unit.device)
        for start in range(0, len(x_unit), self.rows_at_a_time):
            part = slice(start, start + self.rows_at_a_time)
            nearest = torch.argmax(x_unit[part] @ self.centroids.T, dim=1)  # the first of equals
            cluster[part] = nearest
            cosine[part] = row_cosines(x_unit[part], self.centroids, nearest)
        return cluster, cosine


def assign(x_unit: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid by cosine for each unit row (see CentroidIndex.assign), on the CPU."""
    cluster, cosine = CentroidIndex(centroids).assign(as_tensor(x_unit).float())
    return cluster.numpy(), cosine.numpy()


@dataclass(frozen=True)
class PartialSums:
    """What one shard contributes to an update: per-cluster sums in int64 fixed point and
    counts. Adding parts is exact: the same bits for any split and any order."""

    sums: np.ndarray  # (k, d) int64, in units of 1 / FIXED_POINT
    counts: np.ndarray  # (k,) int64

    @staticmethod
    def combine(parts) -> "PartialSums":
        """The sum of an iterable of parts, added as they come (one part in memory at a time)."""
        total = None
        for part in parts:
            if total is None:
                total = PartialSums(part.sums.copy(), part.counts.copy())
            else:
                np.add(total.sums, part.sums, out=total.sums)  # in place: the fields are frozen
                np.add(total.counts, part.counts, out=total.counts)
        return total


def to_fixed(rows: np.ndarray) -> np.ndarray:
    """Unit float32 rows in int64 units of 1 / FIXED_POINT. Scaling a float32 by a power of
    two is exact and so is rounding the result, so float32 arithmetic gives the same
    integers as float64 at half the memory traffic."""
    return np.rint(np.asarray(rows, dtype=np.float32) * np.float32(FIXED_POINT)).astype(np.int64)


SUM_ELEMENTS = 2**19  # values converted and added at a time (6 MB of temporaries) at any dimension


class Sums:
    """Per-cluster sums and counts of unit rows, kept on the rows' device while a shard adds
    its chunks. Integer sums are exact in any order, so torch's scatter-add (on the CPU, or
    with CUDA's atomics) gives the same bits as any other summation: it is `to_fixed` (torch
    rounds half to even, as numpy does) fused with the add, SUM_ELEMENTS values at a time."""

    def __init__(self, k: int, d: int, device: str = "cpu", into: PartialSums | None = None):
        if into is not None:  # add into existing numpy sums in place: the tensors share their memory
            self.sums, self.counts = as_tensor(into.sums), as_tensor(into.counts)
        else:
            self.sums = torch.zeros((k, d), dtype=torch.int64, device=device)
            self.counts = torch.zeros(k, dtype=torch.int64, device=device)

    def add(self, x_unit: torch.Tensor, cluster: torch.Tensor) -> None:
        step = max(1, SUM_ELEMENTS // max(x_unit.shape[1], 1))
        for start in range(0, len(x_unit), step):
            part = slice(start, start + step)
            self.sums.index_add_(0, cluster[part], (x_unit[part] * FIXED_POINT).round_().long())
        self.counts += torch.bincount(cluster, minlength=len(self.counts))

    def result(self) -> PartialSums:
        return PartialSums(self.sums.cpu().numpy(), self.counts.cpu().numpy())  # no copy on the CPU


def partial_sums(x_unit: np.ndarray, cluster: np.ndarray, k: int, into: PartialSums | None = None) -> PartialSums:
    """Per-cluster sums and counts of unit rows on the CPU, added to `into` in place when given."""
    total = into or PartialSums(np.zeros((k, x_unit.shape[1]), np.int64), np.zeros(k, np.int64))
    sums = Sums(k, x_unit.shape[1], into=total)
    sums.add(as_tensor(np.ascontiguousarray(x_unit, dtype=np.float32)), as_tensor(np.asarray(cluster, np.int64)))
    return total


@dataclass(frozen=True)
class Spare:
    """The worst-fitting rows (lowest cosine, then lowest global index): the candidates to
    reseed empty clusters. Asked for only when some cluster is empty."""

    rows: np.ndarray  # (m, d) float32
    cosine: np.ndarray  # (m,)
    cluster: np.ndarray  # (m,) int64
    index: np.ndarray  # (m,) int64 global row index

    @staticmethod
    def of(x_unit: np.ndarray, cluster: np.ndarray, cosine: np.ndarray, index: np.ndarray, m: int) -> "Spare":
        worst = np.lexsort((index, cosine))[:m]
        return Spare(x_unit[worst], cosine[worst], cluster[worst], index[worst])

    @staticmethod
    def combine(parts: list["Spare"], m: int) -> "Spare":
        rows, cosine, cluster, index = (np.concatenate([getattr(p, f) for p in parts])
                                        for f in ("rows", "cosine", "cluster", "index"))
        return Spare.of(rows, cluster, cosine, index, m)


def spare_needed(counts: np.ndarray) -> int:
    """How many spare rows to ask for: some candidates are skipped (they would empty their
    own cluster), so ask for a margin over the number of empty clusters."""
    empty = int((counts == 0).sum())
    return 2 * empty + 8 if empty else 0


def update_centroids(stats: PartialSums, spare: Spare | None, previous: np.ndarray) -> np.ndarray:
    """New unit centroids from summed statistics.

    An empty cluster is reseeded with the worst-fitting spare row not already used, taken
    out of its old cluster's sum; with no spare row left it keeps its previous centroid.
    The sums are read SUM_ELEMENTS values at a time, never copied whole: at K = 10,000 and
    D = 20,480 they are 1.6 GB, and the driver holds them while it updates.
    """
    counts = stats.counts.copy()
    taken: dict[int, np.ndarray] = {}  # cluster -> fixed-point rows moved out of its sum
    centroids = previous.astype(np.float32, copy=True)
    reseeded = np.zeros(len(counts), dtype=bool)
    candidates = 0 if spare is None else len(spare.rows)
    used = 0
    for empty in np.flatnonzero(counts == 0):
        while used < candidates and counts[spare.cluster[used]] <= 1:
            used += 1  # never empty another cluster to fill this one
        if used == candidates:
            break
        row, old = spare.rows[used], int(spare.cluster[used])
        taken[old] = taken.get(old, 0) + to_fixed(row[None, :])[0]
        counts[old] -= 1
        centroids[empty] = row
        reseeded[empty] = True
        used += 1
    filled = np.flatnonzero((counts > 0) & ~reseeded)
    step = max(1, SUM_ELEMENTS // max(stats.sums.shape[1], 1))
    for start in range(0, len(filled), step):
        rows = filled[start : start + step]
        block = stats.sums[rows]  # a copy of these rows only
        for i, cluster in enumerate(rows):
            if cluster in taken:
                block[i] -= taken[cluster]
        centroids[rows] = normalised(block.astype(np.float64))
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
    x, k: int, *, iterations: int = 50, seed: int = 1234, init: np.ndarray | None = None,
    sample_fraction: float = 1.0,
) -> KMeansResult:
    """Spherical (cosine) k-means.

    Rows are L2-normalised; each of `iterations` Lloyd rounds assigns every row to its
    nearest centroid (a float32 product with the centroids), then sets each centroid to the
    normalised mean of its rows. A final assignment gives `assignments` and `objective`.
    `init` (k, d) replaces the seeded draw of k rows, e.g. a previous run's centroids.
    `sample_fraction` < 1 fits the centroids on a seeded sample of rows, then assigns all.

    `x` is an (n, d) array in memory. Embeddings files too large for one process go to
    `cluster.stage.spherical_kmeans_on_ray`: the same algorithm with the rows kept on Ray
    workers (same result, same bits).
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D array, got shape {x.shape}")
    check_kmeans_args(k, iterations)
    check_finite(x)
    x_unit = normalised(x)
    index = np.arange(len(x_unit), dtype=np.int64)
    fit = sample_mask(len(x_unit), sample_fraction, seed)
    centroids = start_centroids(init, k, x.shape[1]) if init is not None else initial_centroids(x_unit[fit], k, seed)
    for _ in range(iterations):
        cluster, cosine = assign(x_unit[fit], centroids)
        stats = partial_sums(x_unit[fit], cluster, k)
        m = spare_needed(stats.counts)
        spare = Spare.of(x_unit[fit], cluster, cosine, index[fit], m) if m else None
        centroids = update_centroids(stats, spare, centroids)
    cluster, cosine = assign(x_unit, centroids)
    return KMeansResult(centroids, cluster, cosine, objective(cosine))


def objective(cosine: np.ndarray) -> float:
    return float(np.asarray(cosine, dtype=np.float64).sum())


def start_centroids(init: np.ndarray, k: int, d: int) -> np.ndarray:
    if np.shape(init) != (k, d):
        raise ValueError(f"initial centroids must have shape {(k, d)}, got {np.shape(init)}")
    check_finite(np.asarray(init), "initial centroid")
    return normalised(init)
