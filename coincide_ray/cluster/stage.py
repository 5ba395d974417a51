"""Spherical k-means on Ray: the rows stay on shard workers, the centroids travel.

Each ShardWorker reads whole embeddings files, reports their rows so the driver can judge
them (coincide_ray.embeddings.judge), then keeps only the accepted raw vectors with their
global row index (position in canonical order). Every Lloyd iteration broadcasts the
centroids once through the object store; each shard returns exact partial sums (core
`partial_sums`), and the driver adds them and updates. Because assignment is row-wise
deterministic and the sums are exact, the result is the same bits as the in-memory
`spherical_kmeans` on the same rows, for any number of workers or files.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from coincide_ray import embeddings, io
from coincide_ray.arrays import unit_rows
from coincide_ray.holds import hold, hold_point
from coincide_ray.cluster.kmeans import (
    CentroidIndex,
    KMeansResult,
    PartialSums,
    Spare,
    check_kmeans_args,
    initial_draw,
    objective,
    partial_sums,
    sample_mask,
    spare_needed,
    start_centroids,
    update_centroids,
)

SHARD_CPUS = 0.25  # CPUs a shard worker reserves (see ShardSet.load)
CHUNK_BYTES = 256 * 2**20  # float32 rows normalised and assigned at a time: bounds a worker's temporaries


def chunks(count: int, dim: int):
    """Slices over `count` rows of `dim` floats, CHUNK_BYTES at a time."""
    step = max(256, CHUNK_BYTES // (4 * max(dim, 1)))
    return (slice(start, start + step) for start in range(0, count, step))


class KMeansGauges:
    """k-means progress on Ray's metrics API (the dashboard, and Prometheus scraping the
    cluster): iterations done, the share of the run done, and seconds per iteration."""

    def __init__(self, iterations: int):
        from ray.util.metrics import Gauge

        self.iterations = iterations
        self.done = Gauge("coincide_kmeans_iterations_done", description="Lloyd iterations finished")
        self.progress = Gauge("coincide_kmeans_progress", description="share of the Lloyd iterations finished")
        self.seconds = Gauge("coincide_kmeans_seconds_per_iteration", description="seconds of the last iteration")

    def set(self, done: int, seconds: float) -> None:
        self.done.set(done)
        self.progress.set(done / max(self.iterations, 1))
        self.seconds.set(seconds)


def as_completed(refs: list):
    """Results of Ray object refs in the order they finish."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


@ray.remote
class ShardWorker:
    """Holds some embeddings files' accepted rows in memory for the whole selection."""

    def __init__(self, files: list[str]):
        self.files = files
        self.pending: dict[str, list] = {}
        self.x = np.zeros((0, 0), np.float32)
        self.index = np.zeros(0, np.int64)
        self.last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # rows, cluster, cosine of the last step
        self.fit_key: tuple | None = None  # (total rows, sample fraction, seed) of fit_rows
        self.fit_rows = np.zeros(0, np.int64)

    def scan(self) -> list[embeddings.FileRows]:
        reports = []
        for path in self.files:
            rows, vectors = embeddings.read_file(path)
            self.pending[path] = vectors
            reports.append(rows)
        return reports

    def keep(self, masks: list[np.ndarray], first_index: list[int], dim: int) -> int:
        """Keep the accepted rows; `first_index` is the global index of each file's first one.
        The rows go into one preallocated array file by file, each file's read buffers freed
        as soon as it is copied, so the peak is the rows plus what is still pending."""
        counts = [int(mask.sum()) for mask in masks]
        self.x = np.empty((sum(counts), dim), np.float32)
        index, at = [], 0
        for path, mask, start, count in zip(self.files, masks, first_index, counts):
            embeddings.stack_accepted(self.pending.pop(path), mask, dim, out=self.x[at : at + count])
            index.append(start + np.arange(count, dtype=np.int64))
            at += count
        self.index = np.concatenate(index) if index else np.zeros(0, np.int64)
        pa.default_memory_pool().release_unused()  # Arrow keeps freed read buffers otherwise
        return len(self.x)

    def unit_rows_at(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        held = np.isin(self.index, wanted)
        return self.index[held], unit_rows(self.x[held])

    def _assign(self, centroids: np.ndarray, rows: np.ndarray,
                sums: PartialSums | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of each of `rows`, chunk by chunk; their sums added to `sums`."""
        index = CentroidIndex(centroids)
        cluster = np.empty(len(rows), np.int64)
        cosine = np.empty(len(rows), np.float32)
        for chunk in chunks(len(rows), self.x.shape[1]):
            x_unit = unit_rows(self.x[rows[chunk]])
            cluster[chunk], cosine[chunk] = index.assign(x_unit)
            if sums is not None:
                partial_sums(x_unit, cluster[chunk], len(centroids), into=sums)  # exact whatever the chunks
        return cluster, cosine

    def step(self, centroids: np.ndarray, fit: tuple[int, float, int]) -> PartialSums:
        """Assign the rows the centroids are fitted on; their partial sums."""
        if self.fit_key != fit:
            total, fraction, seed = fit
            self.fit_key, self.fit_rows = fit, np.flatnonzero(sample_mask(total, fraction, seed)[self.index])
        k = len(centroids)
        sums = PartialSums(np.zeros((k, self.x.shape[1]), np.int64), np.zeros(k, np.int64))
        cluster, cosine = self._assign(centroids, self.fit_rows, sums)
        self.last = (self.fit_rows, cluster, cosine)
        return sums

    def spare(self, m: int) -> Spare:
        rows, cluster, cosine = self.last
        worst = np.lexsort((self.index[rows], cosine))[:m]
        return Spare(unit_rows(self.x[rows[worst]]), cosine[worst], cluster[worst], self.index[rows[worst]])

    def assign_all(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cluster, cosine = self._assign(centroids, np.arange(len(self.x)))
        return self.index, cluster, cosine

    def export(self, assignments: np.ndarray, bucket_of_cluster: np.ndarray) -> dict[int, ray.ObjectRef]:
        """This shard's rows grouped by scoring bucket, each group put in the object store:
        (global index, cluster, raw vectors). `assignments` covers every accepted row."""
        cluster = assignments[self.index]
        buckets = bucket_of_cluster[cluster]
        refs = {}
        for bucket in np.unique(buckets):
            rows = np.flatnonzero(buckets == bucket)
            refs[int(bucket)] = ray.put((self.index[rows], cluster[rows], self.x[rows]))
        return refs


@dataclass
class ShardSet:
    """The shard workers of one run and the driver's view of what they hold."""

    workers: list
    verdict: embeddings.Verdict

    @property
    def n(self) -> int:
        return len(self.verdict.ids)

    @property
    def dim(self) -> int:
        return self.verdict.dim

    @staticmethod
    def load(source, workers: int = 0, stage: str = "select", dim: int | None = None) -> "ShardSet":
        """Start workers over the embeddings files (a folder URI or a list of files), judge
        every row on the driver (`dim`: the dimension the embed stage recorded, else the
        majority's), and leave the accepted rows on the workers."""
        files = io.list_files(source, (".parquet",)) if isinstance(source, str) else list(source)
        cpus = float(ray.cluster_resources().get("CPU", 1))
        count = max(1, min(len(files), workers or int(cpus)))
        groups = [list(g) for g in np.array_split(np.array(files, dtype=object), count) if len(g)]
        # Workers hold their rows for the whole selection; reserving whole CPUs would leave none
        # for the scoring tasks that run beside them (a deadlock), so each reserves a quarter.
        actors = [ShardWorker.options(num_cpus=SHARD_CPUS).remote(group) for group in groups]
        try:
            return ShardSet._judge_and_keep(actors, stage, dim)
        except BaseException:
            for actor in actors:  # nobody else holds them yet
                ray.kill(actor)
            raise

    @staticmethod
    def _judge_and_keep(actors: list, stage: str, dim: int | None) -> "ShardSet":
        reports = ray.get([a.scan.remote() for a in actors])
        verdict = embeddings.judge([r for group in reports for r in group], stage, dim)
        masks = iter(verdict.accepted)
        next_index = 0
        per_actor = []
        for group in reports:
            group_masks, group_starts = [], []
            for _ in group:
                mask = next(masks)
                group_masks.append(mask)
                group_starts.append(next_index)
                next_index += int(mask.sum())
            per_actor.append((group_masks, group_starts))
        ray.get([a.keep.remote(m, s, verdict.dim) for a, (m, s) in zip(actors, per_actor)])
        return ShardSet(actors, verdict)

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)

    def unit_rows_at(self, wanted: np.ndarray) -> np.ndarray:
        parts = ray.get([w.unit_rows_at.remote(wanted) for w in self.workers])
        index = np.concatenate([i for i, _ in parts])
        rows = np.concatenate([r for _, r in parts])
        return rows[np.argsort(index)]

    def kmeans(self, k: int, *, iterations: int, seed: int, init=None, sample_fraction: float = 1.0,
               progress=None) -> KMeansResult:
        """Lloyd iterations over the shards; `progress(message)` hears about every tenth."""
        check_kmeans_args(k, iterations)
        fit = (self.n, float(sample_fraction), seed)
        if init is not None:
            centroids = start_centroids(init, k, self.dim)
        else:
            fitted = np.flatnonzero(sample_mask(self.n, sample_fraction, seed))
            picks, filler = initial_draw(len(fitted), self.dim, k, seed)
            centroids = np.concatenate([self.unit_rows_at(fitted[picks]), filler]).astype(np.float32)
        hold_at = hold_point("kmeans-iteration")
        gauges = KMeansGauges(iterations)
        gauges.set(0, 0.0)
        for done in range(iterations):
            if done == hold_at:
                hold(f"k-means before iteration {done}")
            began = time.perf_counter()
            shared = ray.put(centroids)  # sent once per iteration, read by every shard
            stats = PartialSums.combine(as_completed([w.step.remote(shared, fit) for w in self.workers]))
            m = spare_needed(stats.counts)
            spare = Spare.combine(ray.get([w.spare.remote(m) for w in self.workers]), m) if m else None
            centroids = update_centroids(stats, spare, centroids)
            gauges.set(done + 1, time.perf_counter() - began)
            if progress and (done + 1) % max(1, iterations // 10) == 0:
                empty = int((stats.counts == 0).sum())
                progress(f"k-means {'[' + '#' * (24 * (done + 1) // iterations)}"
                         f"{'-' * (24 - 24 * (done + 1) // iterations)}] {done + 1}/{iterations} iterations"
                         + (f", {empty} empty clusters reseeded" if empty else ""))
        shared = ray.put(centroids)
        parts = ray.get([w.assign_all.remote(shared) for w in self.workers])
        index = np.concatenate([p[0] for p in parts])
        order = np.argsort(index)
        cluster = np.concatenate([p[1] for p in parts])[order]
        cosine = np.concatenate([p[2] for p in parts])[order]
        return KMeansResult(centroids, cluster, cosine, objective(cosine))


def spherical_kmeans_on_ray(source, k: int, *, iterations: int = 50, seed: int = 1234, init=None,
                            sample_fraction: float = 1.0, workers: int = 0) -> KMeansResult:
    """`spherical_kmeans` over embeddings files, rows kept on Ray workers. Rows an
    embeddings file marks as rejected, or that are malformed, are left out."""
    shards = ShardSet.load(source, workers)
    try:
        return shards.kmeans(k, iterations=iterations, seed=seed, init=init, sample_fraction=sample_fraction)
    finally:
        shards.close()
