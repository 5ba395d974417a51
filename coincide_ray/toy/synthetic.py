"""Synthetic sample vectors with planted groups, shaped like DESIGN.md step 1 output.

Used by the tests, the benchmarks and the demo until the embedding stage exists: each
group has its own vision and language prototype per layer; a sample is its group's
prototypes plus noise, passed through tanh, L2-normalised per part and scaled by
1/sqrt(2L). Text-only samples have a zero vision part.
"""

from __future__ import annotations

import numpy as np


def pool_parts(parts: np.ndarray) -> np.ndarray:
    """(n, L, 2, H) raw vision/language means -> (n, 2*L*H) sample vectors, layer-major."""
    n, num_layers, _, _ = parts.shape
    squashed = np.tanh(parts.astype(np.float64))
    norms = np.linalg.norm(squashed, axis=3, keepdims=True)
    unit = np.divide(squashed, norms, out=np.zeros_like(squashed), where=norms > 0)
    return (unit / np.sqrt(2 * num_layers)).reshape(n, -1).astype(np.float32)


def planted_embeddings(
    n: int,
    *,
    num_layers: int = 2,
    hidden: int = 16,
    groups: int = 8,
    noise: float = 0.5,
    text_only_share: float = 0.1,
    seed: int = 0,
) -> tuple[np.ndarray, np.ndarray]:
    """(n, 2*L*H) float32 vectors and their planted group labels."""
    rng = np.random.default_rng(seed)
    prototypes = rng.standard_normal((groups, num_layers, 2, hidden))
    labels = rng.integers(0, groups, size=n)
    parts = prototypes[labels] + noise * rng.standard_normal((n, num_layers, 2, hidden))
    text_only = rng.random(n) < text_only_share
    parts[text_only, :, 0, :] = 0.0
    return pool_parts(parts), labels
