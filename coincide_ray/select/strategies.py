"""The paper's ablations as selection strategies over one set of clusters and rankings.

Every strategy reads the same embeddings' products: the clusters, their transferability S
and density D, and each cluster's greedy-MMD ranking. Only the cluster scores, the quotas
or the choice of members change, so an alternative subset costs seconds.

- coincide: score S / D, quotas by DESIGN.md step 4, the first `quota` members by greedy MMD;
- no-transfer: score 1 / D; no-density: score S (the paper's ablations of each factor);
- uniform: every non-empty cluster the same softmax share (equal scores), capped at its size;
- coincide-random-within: COINCIDE's quotas, members drawn at random inside each cluster;
- random: int(fraction * N) records drawn at random, clusters ignored.
Random draws are seeded and do not depend on how many strategies are asked for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from coincide_ray.select.budget import allocate_budget

STRATEGIES = ("coincide", "random", "no-transfer", "no-density", "uniform", "coincide-random-within")
GREEDY = ("coincide", "no-transfer", "no-density", "uniform")  # members taken in greedy-MMD order


class RankingTooShort(ValueError):
    """A strategy's quota reaches past where a giant cluster was ranked."""


@dataclass(frozen=True)
class Chosen:
    strategy: str
    selected: np.ndarray  # sorted row indices
    quota: np.ndarray  # per cluster (random: the members it happened to draw)
    budget: int


def strategy_scores(strategy: str, transfer: np.ndarray, density: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Cluster scores for the strategies that spread the budget by score (NaN for empty clusters)."""
    present = sizes > 0
    safe_density = np.where(present, density, 1.0)
    if strategy in ("coincide", "coincide-random-within"):
        score = transfer / safe_density
    elif strategy == "no-transfer":
        score = 1.0 / safe_density
    elif strategy == "no-density":
        score = np.asarray(transfer, dtype=np.float64)
    elif strategy == "uniform":
        score = np.zeros(len(sizes))
    else:
        raise ValueError(f"strategy {strategy!r} does not score clusters")
    return np.where(present, score, np.nan)


def choose(strategy: str, *, rank: np.ndarray, assignments: np.ndarray, transfer: np.ndarray,
           density: np.ndarray, fraction: float, temperature: float, seed: int = 0) -> Chosen:
    """The rows `strategy` selects. `rank` is each row's greedy-MMD position in its cluster
    (-1 where a giant cluster was not ranked that far)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    n, k = len(rank), len(transfer)
    sizes = np.bincount(assignments, minlength=k).astype(np.int64)
    budget = int(fraction * n)
    rng = np.random.default_rng([seed, STRATEGIES.index(strategy)])
    if strategy == "random":
        selected = np.sort(rng.choice(n, size=budget, replace=False)) if budget else np.zeros(0, np.int64)
        return Chosen(strategy, selected.astype(np.int64), np.bincount(assignments[selected], minlength=k), budget)
    score = strategy_scores(strategy, transfer, density, sizes)
    quota = allocate_budget(np.nan_to_num(score), sizes, budget, temperature=temperature)
    if strategy == "coincide-random-within":
        # a random permutation of each cluster's members: the first `quota` are taken
        order = np.lexsort((rng.random(n), assignments))
        position = np.empty(n, dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
        position[order] = np.arange(n) - np.repeat(starts, sizes)
        selected = np.flatnonzero(position < quota[assignments])
    else:
        short = np.flatnonzero(np.bincount(assignments[rank >= 0], minlength=k) < quota)
        if len(short):
            raise RankingTooShort(f"strategy {strategy} needs cluster {short[0]} ranked past where it was "
                                  f"(a cluster larger than select.kernel_memory_mb is ranked up to its "
                                  f"COINCIDE quota only); raise select.kernel_memory_mb")
        selected = np.flatnonzero((rank >= 0) & (rank < quota[assignments]))
    return Chosen(strategy, selected.astype(np.int64), quota, budget)
