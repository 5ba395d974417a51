"""A deliberately naive transcription of DESIGN.md steps 3-5: direct means, no shortcuts.

Slow on purpose; the fast core must agree with it. Nothing here is shared with the core.
"""

from __future__ import annotations

import math

import numpy as np


def kernel(x: np.ndarray, sigma: float) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    n = len(x)
    k = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            diff = x[i] - x[j]
            k[i, j] = math.exp(-float(np.dot(diff, diff)) / (2 * sigma**2))
    return k


def density(x: np.ndarray, sigma: float) -> float:
    return float(kernel(x, sigma).mean())


def language_half(vector: np.ndarray, num_layers: int) -> np.ndarray:
    hidden = len(vector) // (2 * num_layers)
    parts = [vector[(2 * layer + 1) * hidden : (2 * layer + 2) * hidden] for layer in range(num_layers)]
    return np.concatenate(parts).astype(np.float64)


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0 or nb == 0:
        return 0.0
    return float(np.dot(a, b) / (na * nb))


def transferability(centroids: np.ndarray, num_layers: int, mask: float) -> np.ndarray:
    halves = [language_half(c, num_layers) for c in centroids]
    out = np.zeros(len(centroids))
    for i in range(len(centroids)):
        kept = [cosine(halves[i], halves[j]) for j in range(len(centroids)) if j != i]
        kept = [c for c in kept if not c > mask]
        out[i] = sum(kept) / len(kept) if kept else 0.0
    return out


def allocate(scores, sizes, budget: int, temperature: float) -> np.ndarray:
    quotas = np.zeros(len(sizes), dtype=np.int64)
    unvisited = [i for i in range(len(sizes)) if sizes[i] > 0]
    remaining = budget
    while unvisited:
        best = max(scores[i] for i in unvisited)
        current = min(i for i in unvisited if scores[i] == best)
        z = np.array([scores[i] / temperature for i in unvisited])
        e = np.exp(z - z.max())
        p = e[unvisited.index(current)] / e.sum()
        take = round(remaining * p)
        if take > sizes[current]:
            take = int(sizes[current])
        quotas[current] = take
        remaining -= take
        unvisited.remove(current)
    return quotas


def mmd2(k: np.ndarray, chosen: list[int]) -> float:
    idx = np.array(chosen)
    return float(k.mean() + k[np.ix_(idx, idx)].mean() - 2 * k[:, idx].mean())


def greedy(x: np.ndarray, sigma: float, count: int) -> list[int]:
    k = kernel(x, sigma)
    chosen: list[int] = []
    for _ in range(count):
        best, best_value = None, math.inf
        for c in range(len(x)):
            if c in chosen:
                continue
            value = mmd2(k, chosen + [c])
            if value < best_value:  # strict: ties keep the lowest position
                best, best_value = c, value
        chosen.append(best)
    return chosen


def select(embeddings, assignments, centroids, num_layers, fraction, temperature=0.1, sigma=1.0, mask=0.9):
    """Returns (selected row indices sorted, scores, densities, quotas, transferability)."""
    n, k = len(embeddings), len(centroids)
    members = [[r for r in range(n) if assignments[r] == c] for c in range(k)]
    sizes = np.array([len(m) for m in members])
    transfer = transferability(centroids, num_layers, mask)
    dens = np.array([density(embeddings[m], sigma) if m else np.nan for m in members])
    scores = np.array([transfer[c] / dens[c] if members[c] else np.nan for c in range(k)])
    quotas = allocate(scores, sizes, int(fraction * n), temperature)
    selected = []
    for c in range(k):
        if quotas[c]:
            picks = greedy(embeddings[members[c]], sigma, int(quotas[c]))
            selected += [members[c][p] for p in picks]
    return sorted(selected), scores, dens, quotas, transfer
