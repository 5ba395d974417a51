import numpy as np
import pytest

from coincide_ray import io, schema
from coincide_ray.cluster import spherical_kmeans
from coincide_ray.toy.synthetic import planted_embeddings


def write_parts(folder, x, sizes):
    ids = [f"r{i:05d}" for i in range(len(x))]
    start = 0
    for part, size in enumerate(sizes):
        table = schema.embeddings_table(ids[start:start + size], x[start:start + size])
        io.write_parquet(table, io.join(folder, f"part-{part:03d}.parquet"))
        start += size
    return folder


@pytest.mark.parametrize("workers, sizes", [(1, [1200]), (2, [500, 700]), (3, [100, 333, 267, 400, 100])])
def test_same_bits_as_in_memory(tmp_path, ray_session, workers, sizes):
    x, _ = planted_embeddings(1200, num_layers=2, hidden=16, groups=10, noise=0.9, seed=3)
    folder = write_parts(str(tmp_path / "emb"), x, sizes)
    from coincide_ray.cluster.stage import spherical_kmeans_on_ray

    expected = spherical_kmeans(x, 12, iterations=8, seed=7)
    got = spherical_kmeans_on_ray(folder, 12, iterations=8, seed=7, workers=workers)
    assert np.array_equal(got.centroids, expected.centroids)
    assert np.array_equal(got.assignments, expected.assignments)
    assert np.array_equal(got.cosine, expected.cosine)
    assert got.objective == expected.objective


def test_empty_clusters_and_sampling(tmp_path, ray_session):
    from coincide_ray.cluster.stage import spherical_kmeans_on_ray

    x = np.repeat(np.eye(4, dtype=np.float32), [300, 5, 5, 5], axis=0)  # k > distinct rows: clusters stay empty
    x += np.random.default_rng(0).normal(0, 0.05, x.shape).astype(np.float32)
    folder = write_parts(str(tmp_path / "emb"), x, [100, 215])
    expected = spherical_kmeans(x, 9, iterations=6, seed=1, sample_fraction=0.5)
    got = spherical_kmeans_on_ray(folder, 9, iterations=6, seed=1, sample_fraction=0.5)
    assert np.array_equal(got.centroids, expected.centroids)
    assert np.array_equal(got.assignments, expected.assignments)
