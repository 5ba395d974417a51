import faiss
import numpy as np
import pytest

from coincide_ray.cluster import spherical_kmeans
from coincide_ray.cluster.kmeans import (
    FIXED_POINT,
    PartialSums,
    Spare,
    assign,
    initial_centroids,
    partial_sums,
    normalised,
)
from coincide_ray.toy.synthetic import planted_embeddings


def faiss_objective(x, k, iterations, seed, init=None):
    xu = normalised(x)
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, seed=seed, spherical=True, max_points_per_centroid=10**9)
    km.train(xu, init_centroids=init)
    _, cosine = assign(xu, normalised(km.centroids))
    return float(cosine.astype(np.float64).sum())


@pytest.mark.parametrize("k", [8, 40])
def test_same_start_same_objective_as_faiss(k):
    x, _ = planted_embeddings(4000, num_layers=2, hidden=16, groups=12, noise=0.8, seed=k)
    start = initial_centroids(normalised(x), k, seed=5)
    ours = spherical_kmeans(x, k, iterations=25, init=start)
    reference = faiss_objective(x, k, 25, 0, init=start)
    assert ours.objective == pytest.approx(reference, rel=0.01)
    assert np.allclose(np.linalg.norm(ours.centroids, axis=1), 1.0, atol=1e-5)
    assert ours.assignments.shape == (4000,) and ours.assignments.max() < k


def test_objective_over_seeds_within_one_percent_of_faiss():
    # Each starts from its own random draw, so compare averages over several seeds.
    x, _ = planted_embeddings(4000, num_layers=2, hidden=16, groups=30, noise=0.8, seed=9)
    ours = np.mean([spherical_kmeans(x, 30, iterations=20, seed=s).objective for s in range(5)])
    reference = np.mean([faiss_objective(x, 30, 20, s) for s in range(5)])
    assert ours >= 0.99 * reference


def test_deterministic_and_seeded():
    x, _ = planted_embeddings(1000, seed=1)
    a = spherical_kmeans(x, 10, iterations=10, seed=1)
    b = spherical_kmeans(x, 10, iterations=10, seed=1)
    c = spherical_kmeans(x, 10, iterations=10, seed=2)
    assert np.array_equal(a.centroids, b.centroids) and np.array_equal(a.assignments, b.assignments)
    assert not np.array_equal(a.centroids, c.centroids)


def test_objective_is_sum_of_cosines():
    x, _ = planted_embeddings(500, seed=2)
    r = spherical_kmeans(x, 6, iterations=5)
    cos = (normalised(x) * r.centroids[r.assignments]).sum(1)
    assert r.objective == pytest.approx(cos.sum(), rel=1e-5)
    assert np.allclose(r.cosine, cos, atol=1e-5)


def test_more_clusters_than_rows_and_duplicates_do_not_crash():
    x = np.repeat(np.eye(3, dtype=np.float32), 2, axis=0)  # 6 rows, 3 distinct
    r = spherical_kmeans(x, 8, iterations=5)
    assert r.centroids.shape == (8, 3) and set(r.assignments) <= set(range(8))
    assert r.objective == pytest.approx(6.0)
    one = spherical_kmeans(x, 1, iterations=3)
    assert (one.assignments == 0).all()


def test_empty_cluster_reseeded_from_worst_row():
    x, _ = planted_embeddings(600, groups=3, seed=3)
    x = np.abs(x)  # every row in the positive orthant: a centroid pointing away is nearest to none
    xu = normalised(x)
    start = initial_centroids(xu, 5, seed=0)
    start[4] = -start[0]
    assert 4 not in assign(xu, start)[0]  # it is: the test exercises reseeding
    r = spherical_kmeans(x, 5, iterations=10, init=start)
    assert np.bincount(r.assignments, minlength=5).min() > 0


def test_partial_sums_are_the_rounded_fixed_point_sums():
    x, _ = planted_embeddings(5000, seed=5)  # more rows than one summation chunk
    xu = normalised(x)
    cluster = np.random.default_rng(5).integers(0, 11, len(xu))
    cluster[cluster == 3] = 4  # an empty cluster
    got = partial_sums(xu, cluster, 11)
    expected = np.zeros((11, xu.shape[1]), dtype=np.int64)
    for row, c in zip(xu, cluster):  # naive: float64 scaling, round half to even, add
        expected[c] += np.rint(row.astype(np.float64) * FIXED_POINT).astype(np.int64)
    assert np.array_equal(got.sums, expected)
    assert np.array_equal(got.counts, np.bincount(cluster, minlength=11))
    running = partial_sums(xu[:1234], cluster[:1234], 11)  # added in place, chunk by chunk
    assert partial_sums(xu[1234:], cluster[1234:], 11, into=running) is running
    assert np.array_equal(running.sums, expected) and np.array_equal(running.counts, got.counts)


def test_shard_statistics_combine_to_the_whole():
    x, _ = planted_embeddings(900, seed=4)
    xu = normalised(x)
    cluster, cosine = assign(xu, initial_centroids(xu, 7, seed=0))
    index = np.arange(900)
    whole = partial_sums(xu, cluster, 7)
    whole_spare = Spare.of(xu, cluster, cosine, index, 5)
    for pieces in (4, 9):
        split = np.array_split(index, pieces)
        shards = [partial_sums(xu[s], cluster[s], 7) for s in split]
        spares = [Spare.of(xu[s], cluster[s], cosine[s], s, 5) for s in split]
        for order in (slice(None), slice(None, None, -1)):  # exact: any split, any order, the same bits
            combined = PartialSums.combine(shards[order])
            assert np.array_equal(combined.counts, whole.counts) and np.array_equal(combined.sums, whole.sums)
            spare = Spare.combine(spares[order], 5)
            assert np.array_equal(spare.index, whole_spare.index) and np.array_equal(spare.rows, whole_spare.rows)


def test_fit_on_a_sample_then_assign_all():
    x, _ = planted_embeddings(3000, groups=6, seed=8)
    full = spherical_kmeans(x, 6, iterations=10)
    sampled = spherical_kmeans(x, 6, iterations=10, sample_fraction=0.3)
    assert sampled.assignments.shape == (3000,)
    assert sampled.objective >= 0.97 * full.objective
    assert not np.array_equal(sampled.centroids, full.centroids)


def test_assignment_does_not_depend_on_the_batch_a_row_is_in():
    x, _ = planted_embeddings(5000, hidden=64, seed=6)
    xu = normalised(x)
    centroids = initial_centroids(xu, 50, seed=0)
    labels, cosine = assign(xu, centroids)
    pieces = np.split(np.arange(5000), [1, 333, 4097])
    split = [assign(xu[p], centroids) for p in pieces]
    assert np.array_equal(np.concatenate([l for l, _ in split]), labels)
    assert np.array_equal(np.concatenate([c for _, c in split]), cosine)


def test_clear_errors():
    with pytest.raises(ValueError, match="row 2"):
        spherical_kmeans(np.array([[1.0, 0], [0, 1], [np.nan, 0]]), 2)
    with pytest.raises(ValueError, match="at least 1"):
        spherical_kmeans(np.ones((3, 2)), 0)
