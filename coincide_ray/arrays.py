"""Small array helpers shared by every stage (pure numpy)."""

from __future__ import annotations

import numpy as np


def check_finite(x: np.ndarray, what: str = "embedding") -> None:
    """Raise a ValueError naming the first row that holds NaN or inf."""
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.flatnonzero(~finite.reshape(len(x), -1).all(axis=1))[0])
        raise ValueError(f"{what} row {row} holds NaN or inf values")


def unit_rows(x: np.ndarray, dtype=np.float32) -> np.ndarray:
    """Rows scaled to unit L2 norm in `dtype`; zero rows stay zero."""
    x = np.asarray(x, dtype=dtype)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norms, out=np.zeros_like(x), where=norms > 0)
