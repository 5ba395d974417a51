"""Cluster transferability from the centroids (DESIGN.md step 3)."""

from __future__ import annotations

import numpy as np

from coincide_ray.arrays import check_finite, unit_rows


def language_halves(vectors: np.ndarray, num_layers: int) -> np.ndarray:
    """The language part of layer-major vectors [v_0, t_0, v_1, t_1, ...]: (n, L * H)."""
    vectors = np.asarray(vectors)
    if num_layers < 1:
        raise ValueError(f"num_layers must be at least 1, got {num_layers}")
    n, dim = vectors.shape
    if dim % (2 * num_layers):
        raise ValueError(
            f"embedding dimension {dim} is not 2 * num_layers * hidden for num_layers={num_layers}"
        )
    hidden = dim // (2 * num_layers)
    return vectors.reshape(n, num_layers, 2, hidden)[:, :, 1, :].reshape(n, num_layers * hidden)


def transferability(
    centroids: np.ndarray,
    *,
    num_layers: int,
    similarity_mask: float = 0.9,
    block_rows: int = 1024,
) -> np.ndarray:
    """S_i: mean cosine between the language halves of centroid i and every other centroid,
    ignoring pairs with cosine > `similarity_mask`; 0 when every pair is ignored.

    Works in row blocks so that K = 10,000 needs a (block, K) matrix, not (K, K).
    """
    check_finite(np.asarray(centroids), "centroid")
    unit = unit_rows(language_halves(centroids, num_layers), dtype=np.float64)
    k = len(unit)
    result = np.zeros(k)
    for start in range(0, k, block_rows):
        stop = min(start + block_rows, k)
        cos = unit[start:stop] @ unit.T
        keep = cos <= similarity_mask
        keep[np.arange(stop - start), np.arange(start, stop)] = False  # i itself never counts
        counts = keep.sum(axis=1)
        sums = np.where(keep, cos, 0.0).sum(axis=1)
        result[start:stop] = np.divide(sums, counts, out=np.zeros(stop - start), where=counts > 0)
    return result
