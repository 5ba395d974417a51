import naive
import numpy as np
import pytest

from coincide_ray.select import select_from_clusters
from coincide_ray.toy.synthetic import planted_embeddings

LAYERS = 2


def case(seed, n=60, k=5, hidden=3):
    x, labels = planted_embeddings(n, num_layers=LAYERS, hidden=hidden, groups=k, noise=0.8, seed=seed)
    rng = np.random.default_rng(seed)
    centroids = np.stack([x[labels == c].mean(0) if (labels == c).any() else rng.standard_normal(x.shape[1])
                          for c in range(k)]).astype(np.float32)
    return x, labels.astype(np.int64), centroids


def assert_matches_naive(x, assignments, centroids, fraction, **kw):
    got = select_from_clusters(x, assignments, centroids, num_layers=LAYERS, fraction=fraction, **kw)
    selected, scores, density, quotas, transfer = naive.select(
        x, assignments, centroids, LAYERS, fraction,
        kw.get("temperature", 0.1), kw.get("sigma", 1.0), kw.get("similarity_mask", 0.9))
    assert list(got.selected) == selected
    assert list(got.clusters.quota) == list(quotas)
    assert np.allclose(got.clusters.transferability, transfer, rtol=1e-10, atol=1e-13)
    assert np.allclose(got.clusters.density, density, rtol=1e-10, equal_nan=True)
    assert np.allclose(got.clusters.score, scores, rtol=1e-9, equal_nan=True)
    assert got.budget == int(fraction * len(x))
    # ranks: a cluster's selected rows hold exactly ranks 0..quota-1
    for c in range(len(centroids)):
        in_c = np.flatnonzero(assignments == c)
        picked = np.intersect1d(in_c, got.selected)
        assert sorted(got.rank[picked]) == list(range(quotas[c]))
    return got


@pytest.mark.parametrize("seed", range(8))
def test_random_cases_match_naive(seed):
    rng = np.random.default_rng(seed)
    x, labels, centroids = case(seed, n=int(rng.integers(20, 70)), k=int(rng.integers(2, 7)))
    assert_matches_naive(x, labels, centroids, float(rng.uniform(0.05, 0.8)),
                         temperature=float(rng.choice([0.1, 1.0])))


def test_empty_and_single_member_clusters():
    x, labels, centroids = case(1, n=40, k=4)
    labels[labels == 2] = 0  # cluster 2 empty
    labels[np.flatnonzero(labels == 3)[1:]] = 1  # cluster 3 has one member
    got = assert_matches_naive(x, labels, centroids, 0.5)
    assert got.clusters.size[2] == 0 and got.clusters.quota[2] == 0 and np.isnan(got.clusters.density[2])
    assert got.clusters.size[3] == 1 and got.clusters.density[3] == 1.0


def test_single_cluster():
    x, _, _ = case(2, n=30, k=3)
    centroid = x.mean(0, keepdims=True)
    got = assert_matches_naive(x, np.zeros(30, np.int64), centroid, 0.3)
    assert got.clusters.transferability[0] == 0.0 and len(got.selected) == 9


@pytest.mark.parametrize("fraction", [0.0, 1.0])
def test_fraction_bounds(fraction):
    x, labels, centroids = case(3, n=40, k=4)
    got = assert_matches_naive(x, labels, centroids, fraction)
    if fraction == 0.0:
        assert len(got.selected) == 0
    assert (got.rank[labels == labels[0]] >= 0).all()  # in-memory clusters are ranked whole


def test_all_centroids_similar_gives_equal_scores_and_id_order():
    x, labels, _ = case(4, n=45, k=3)
    centroids = np.ones((3, x.shape[1]), np.float32) + 1e-3 * np.arange(3)[:, None]
    got = assert_matches_naive(x, labels, centroids, 0.4)
    assert (got.clusters.score == 0).all()


def test_text_only_rows_and_duplicates():
    x, labels, centroids = case(5, n=40, k=3)
    hidden = x.shape[1] // (2 * LAYERS)
    for layer in range(LAYERS):  # rows 0..9 text-only: vision half zero
        x[:10, 2 * layer * hidden:(2 * layer + 1) * hidden] = 0
    x[20:24] = x[30]  # exact duplicates
    labels[20:24] = labels[30]
    assert_matches_naive(x, labels, centroids, 0.6)


def test_giant_cluster_path_gives_same_selection():
    x, labels, centroids = case(6, n=300, k=3, hidden=4)
    whole = select_from_clusters(x, labels, centroids, num_layers=LAYERS, fraction=0.3)
    blocked = select_from_clusters(x, labels, centroids, num_layers=LAYERS, fraction=0.3,
                                   kernel_memory_bytes=20_000)
    assert np.array_equal(whole.selected, blocked.selected)
    assert np.array_equal(whole.clusters.quota, blocked.clusters.quota)
    # blockwise clusters are ranked only up to their quota
    assert (blocked.rank == -1).sum() == 300 - blocked.clusters.quota.sum()


def test_clear_errors():
    x, labels, centroids = case(7, n=20, k=2)
    x[13, 0] = np.nan
    with pytest.raises(ValueError, match="row 13"):
        select_from_clusters(x, labels, centroids, num_layers=LAYERS, fraction=0.5)
    x[13, 0] = 0
    with pytest.raises(ValueError, match="fraction"):
        select_from_clusters(x, labels, centroids, num_layers=LAYERS, fraction=1.5)
    with pytest.raises(ValueError, match="assignments"):
        select_from_clusters(x, labels + 5, centroids, num_layers=LAYERS, fraction=0.5)
    with pytest.raises(ValueError, match="num_layers"):
        select_from_clusters(x, labels, centroids, num_layers=5, fraction=0.5)
