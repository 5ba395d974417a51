"""A deliberately naive transcription of DESIGN.md steps 1-5: direct means, no shortcuts.

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


# ---- spherical k-means (DESIGN.md step 2), one row at a time ----------------------------


def unit(v: np.ndarray) -> np.ndarray:
    v = np.asarray(v, dtype=np.float64)
    norm = math.sqrt(float(np.dot(v, v)))
    return v / norm if norm > 0 else v * 0.0


def seeded_start(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """K distinct rows drawn with the seed (in row order), then seeded random unit vectors
    when there are fewer rows than K."""
    rng = np.random.default_rng(seed)
    n, d = x.shape
    picks = sorted(rng.choice(n, size=min(n, k), replace=False).tolist()) if n else []
    rows = [unit(x[i]) for i in picks]
    extra = rng.standard_normal((k - len(picks), d)) if k > len(picks) else np.zeros((0, d))
    return np.array(rows + [unit(v) for v in extra]).reshape(k, d)


def kmeans_history(x: np.ndarray, start: np.ndarray, iterations: int) -> list[tuple[np.ndarray, list[int]]]:
    """[(centroids, assignment of every row to them)] after 0, 1, ..., `iterations` Lloyd
    updates. A row goes to the centroid of highest cosine (the lowest id on a tie). An empty
    cluster, in id order, takes the worst-fitting row (lowest cosine to its own centroid,
    then lowest row index) whose cluster keeps at least one member; the row leaves its old
    cluster. Every other non-empty cluster's centroid is the unit mean of its rows; an empty
    one that finds no row keeps its centroid."""
    rows = [unit(r) for r in x]
    centroids = np.array([unit(c) for c in start])
    k = len(centroids)

    def assign(cents):
        labels, cosines = [], []
        for r in rows:
            best, best_cos = 0, -math.inf
            for c in range(k):
                cos = float(np.dot(r, cents[c]))
                if cos > best_cos:
                    best, best_cos = c, cos
            labels.append(best)
            cosines.append(best_cos)
        return labels, cosines

    history = [(centroids.copy(), assign(centroids)[0])]
    for _ in range(iterations):
        labels, cosines = assign(centroids)
        members = {c: [i for i in range(len(rows)) if labels[i] == c] for c in range(k)}
        worst_first = sorted(range(len(rows)), key=lambda i: (cosines[i], i))
        used, new = set(), centroids.copy()
        reseeded = set()
        for empty in [c for c in range(k) if not members[c]]:
            for i in worst_first:
                if i not in used and len(members[labels[i]]) > 1:
                    used.add(i)
                    members[labels[i]].remove(i)
                    new[empty] = rows[i]
                    reseeded.add(empty)
                    break
        for c in range(k):
            if members[c] and c not in reseeded:
                new[c] = unit(sum(rows[i] for i in members[c]))
        centroids = new
        history.append((centroids.copy(), assign(centroids)[0]))
    return history


# ---- step 1: one record's vector, the full forward, pooled with loops ----------------------


def oracle_decoder(model):
    """The decoder's layers, image token and width where each family's transformers code puts
    them, written out here: the fast code finds them by searching (decoder_info), and the
    oracle must not borrow that search."""
    inner = model.model
    text = inner.language_model if hasattr(inner, "language_model") else inner.text_model
    token = model.config.image_token_id if getattr(model.config, "image_token_id", None) is not None \
        else model.config.image_token_index
    return text.layers, int(token), int(model.config.get_text_config().hidden_size)


def msa_vector(model, inputs, layers):
    """One unpadded row, the full forward, every o_proj captured, pooled with loops."""
    import torch

    decoder_layers, image_token, hidden = oracle_decoder(model)
    captured = {}
    handles = [decoder_layers[l].self_attn.o_proj.register_forward_hook(
        lambda m, a, out, l=l: captured.__setitem__(l, out[0].double())) for l in layers]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    ids = inputs["input_ids"][0].tolist()
    image_pos = [i for i, t in enumerate(ids) if t == image_token]
    text_pos = [i for i in range(len(ids)) if i > max(image_pos)] if image_pos else list(range(len(ids)))
    parts = []
    for l in sorted(layers):
        for pos in (image_pos, text_pos):
            if not pos:
                parts.append(torch.zeros(hidden, dtype=torch.float64))
                continue
            p = torch.tanh(captured[l][pos].mean(0))
            parts.append(p / p.norm())
    return (torch.cat(parts) / math.sqrt(2 * len(layers))).numpy()
