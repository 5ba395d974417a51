"""The core spherical k-means against the naive transcription in tests/naive.py: the same
start, the same assignments and centroids after every Lloyd iteration, on varied seeds,
with and without empty clusters to reseed."""

import naive
import numpy as np
import pytest

from coincide_ray.cluster import spherical_kmeans
from coincide_ray.arrays import unit_rows
from coincide_ray.cluster.kmeans import initial_centroids
from coincide_ray.toy.synthetic import planted_embeddings


def positive_data(n, seed, d=12, groups=5):
    """Rows in the positive orthant: a centroid pointing the other way is nearest to none."""
    rng = np.random.default_rng(seed)
    centres = np.abs(rng.standard_normal((groups, d)))
    return np.abs(centres[rng.integers(0, groups, n)] + 0.4 * rng.standard_normal((n, d))).astype(np.float32)


def assert_matches(x, k, start, iterations):
    history = naive.kmeans_history(x, start, iterations)
    for t, (centroids, labels) in enumerate(history):
        got = spherical_kmeans(x, k, iterations=t, init=start)
        assert list(got.assignments) == labels, f"assignments differ after {t} iterations"
        assert np.allclose(got.centroids, centroids, atol=1e-6), f"centroids differ after {t} iterations"
    return history


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_the_seeded_start_and_every_iteration_match_the_naive_reference(seed):
    x, _ = planted_embeddings(150, num_layers=2, hidden=4, groups=6, noise=0.9, seed=seed)
    k = 4 + seed
    start = naive.seeded_start(x, k, seed=100 + seed)
    assert np.allclose(initial_centroids(unit_rows(x), k, seed=100 + seed), start, atol=1e-6)
    assert_matches(x, k, start, iterations=6)
    # without init the core draws the same start itself
    drawn = spherical_kmeans(x, k, iterations=3, seed=100 + seed)
    centroids, labels = naive.kmeans_history(x, start, 3)[3]
    assert list(drawn.assignments) == labels and np.allclose(drawn.centroids, centroids, atol=1e-6)


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_empty_clusters_are_reseeded_from_the_worst_fitting_rows(seed):
    x = positive_data(120, seed)
    start = naive.seeded_start(x, 6, seed)
    start[2] = -start[0]  # nearest to no row: empty after the first assignment
    start[4] = -start[1]
    history = assert_matches(x, 6, start, iterations=5)
    assert 2 not in history[0][1] and 4 not in history[0][1]  # the start really forces two empties
    assert 2 in history[1][1] and 4 in history[1][1]  # and both were reseeded


def test_more_clusters_than_rows_match_too():
    x = positive_data(7, 9, d=5)
    start = naive.seeded_start(x, 10, seed=9)  # 7 rows + 3 random unit vectors
    assert np.allclose(initial_centroids(unit_rows(x), 10, seed=9), start, atol=1e-6)
    assert_matches(x, 10, start, iterations=4)
