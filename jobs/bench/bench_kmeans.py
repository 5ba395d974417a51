"""Spherical k-means on Ray against faiss's spherical k-means on one node.

    python jobs/bench/bench_kmeans.py            # 100k, 200k, 400k rows x 256, K = 1,000 (BENCHMARKS.md)
    python jobs/bench/bench_kmeans.py --quick    # small sizes: checks the script works

Both fit the same rows (a Gaussian mixture, unit-normalised) with the same K and number of
iterations from a seeded draw of K rows; faiss is told to use every row (no subsampling).
The objective is the sum of each row's cosine to its nearest final centroid. Ours runs as
the `select` stage does: embeddings Parquet files read onto shard workers of a local Ray
with one CPU each, every core in use; reading the files is timed apart from the fit.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

import faiss
import numpy as np
import pyarrow.parquet as pq
from benchkit import machine, report, timed


def mixture(n: int, d: int, modes: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((modes, d)).astype(np.float32)
    x = centers[rng.integers(0, modes, n)] + 1.5 * rng.standard_normal((n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_files(x: np.ndarray, folder: str, files: int) -> None:
    from coincide_ray.schema import embeddings_table

    for part, rows in enumerate(np.array_split(np.arange(len(x)), files)):
        pq.write_table(embeddings_table([f"r{i}" for i in rows], x[rows]), f"{folder}/part-{part:06d}.parquet")


def faiss_kmeans(x: np.ndarray, k: int, iterations: int, seed: int) -> float:
    """faiss's spherical k-means; returns the objective of the final assignment."""
    km = faiss.Kmeans(x.shape[1], k, niter=iterations, spherical=True, seed=seed, verbose=False,
                      max_points_per_centroid=len(x), min_points_per_centroid=1)
    km.train(x)
    cosine, _ = km.index.search(x, 1)
    return float(cosine.astype(np.float64).sum())


def one_size(n: int, d: int, k: int, iterations: int, workers: int, quick: bool) -> None:
    from coincide_ray.cluster.stage import ShardSet

    x = mixture(n, d, modes=2 * k, seed=n)
    folder = tempfile.mkdtemp(prefix="bench-kmeans-")
    write_files(x, folder, files=4 * workers)
    faiss.omp_set_num_threads(os.cpu_count())
    faiss_objective, faiss_seconds = timed(lambda: faiss_kmeans(x, k, iterations, seed=1))
    shards, read_seconds = timed(lambda: ShardSet.load(folder, workers))
    try:
        ours, ours_seconds = timed(lambda: shards.kmeans(k, iterations=iterations, seed=1))
    finally:
        shards.close()
    label = f"n{n // 1000}k_d{d}_k{k}"
    ratio = ours.objective / faiss_objective
    report(f"kmeans_ray_objective_{label}", ours.objective, "sum cos", faiss_objective, ratio, ">= 0.99",
           ratio >= 0.99, quick)
    ratio = ours_seconds / faiss_seconds
    report(f"kmeans_ray_time_{label}", ours_seconds, "s", faiss_seconds, ratio, "<= 1.5", ratio <= 1.5, quick)
    report(f"kmeans_ray_read_files_{label}", read_seconds, "s", faiss_seconds, read_seconds / faiss_seconds,
           None, None, quick)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    parser.add_argument("--iterations", type=int, default=None, help="Lloyd iterations (default 20; 5 quick)")
    args = parser.parse_args()
    import ray

    cpus = os.cpu_count()
    iterations = args.iterations or (5 if args.quick else 20)
    machine(faiss=faiss.__version__, iterations=iterations, quick=args.quick)
    ray.init(address="local", num_cpus=cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    sizes = [(5_000, 32, 50)] if args.quick else [(100_000, 256, 1000), (200_000, 256, 1000), (400_000, 256, 1000)]
    for n, d, k in sizes:
        one_size(n, d, k, iterations, workers=cpus, quick=args.quick)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
