"""Spreading the budget over clusters (DESIGN.md step 4)."""

from __future__ import annotations

import numpy as np


def visiting_order(scores: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Non-empty clusters by descending score; equal scores: lower cluster id first."""
    ids = np.flatnonzero(np.asarray(sizes) > 0)
    return ids[np.lexsort((ids, -np.asarray(scores, dtype=np.float64)[ids]))]


def allocate_budget(scores: np.ndarray, sizes: np.ndarray, budget: int, *, temperature: float = 0.1) -> np.ndarray:
    """Quota per cluster.

    Visiting the non-empty clusters in `visiting_order`, the cluster at hand takes
    round(remaining * p) (half to even), p being its softmax share of score / temperature
    among the clusters not yet visited, capped at its size. What a capped cluster could
    not take stays in `remaining` for the clusters after it, so the total falls short of
    `budget` only when the last clusters visited are too small to take the rest.
    """
    scores = np.asarray(scores, dtype=np.float64)
    sizes = np.asarray(sizes, dtype=np.int64)
    if scores.shape != sizes.shape:
        raise ValueError(f"scores {scores.shape} and sizes {sizes.shape} differ in shape")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    if budget < 0:
        raise ValueError(f"budget must be non-negative, got {budget}")
    order = visiting_order(scores, sizes)
    if not np.isfinite(scores[order]).all():
        raise ValueError("cluster scores must be finite for non-empty clusters")
    quotas = np.zeros(len(sizes), dtype=np.int64)
    logits = scores[order] / temperature
    remaining = int(budget)
    for i, cluster in enumerate(order):
        if remaining == 0:
            break
        # The cluster at hand has the largest logit among those left, so every exponent
        # is <= 0: no overflow however large score / temperature is.
        share = 1.0 / np.exp(logits[i:] - logits[i]).sum()
        take = min(round(remaining * share), int(sizes[cluster]))
        quotas[cluster] = take
        remaining -= take
    return quotas
