"""Spherical k-means on Ray: the rows stay on shard workers, the centroids travel.

One ShardWorker per node (using the node's cores) reads whole embeddings files, reports
their rows so the driver can judge them (coincide_ray.embeddings.judge), then keeps only
the accepted raw vectors with their global row index (position in canonical order). Every
Lloyd iteration broadcasts the centroids once through the object store; each shard computes
exact partial sums (core `partial_sums`), the workers add them pairwise in a tree, and the
driver receives one (K, D) matrix and updates. Because assignment is row-wise deterministic
and the sums are exact, the result is the same bits as the in-memory `spherical_kmeans` on
the same rows, for any number of workers or files, and after a lost shard is rebuilt from
its files on another node and the interrupted phase is run again.
"""

from __future__ import annotations

import ctypes
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import ray
from ray.exceptions import (GetTimeoutError, NodeDiedError, ObjectLostError, OwnerDiedError, RayActorError,
                            WorkerCrashedError)
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from coincide_ray import embeddings, io
from coincide_ray.holds import hold, hold_point, release_file
from coincide_ray.cluster.kmeans import (
    CentroidIndex,
    KMeansResult,
    PartialSums,
    Spare,
    Sums,
    as_tensor,
    check_kmeans_args,
    initial_draw,
    objective,
    sample_mask,
    spare_needed,
    start_centroids,
    unit,
    update_centroids,
)

# CPUs a shard worker reserves: none. It holds its rows for the whole selection but computes
# only while the driver waits on it; a reservation would keep the scoring tasks that run
# beside it off a small node (one of 1 CPU holding a 0.25-CPU worker has no room for a task
# of 1: a deadlock). The worker's threads are its node's CPUs.
SHARD_CPUS = 0.0
CHUNK_BYTES = 16 * 2**20  # float32 rows normalised and assigned at a time: bounds a worker's temporaries


def chunk_rows(dim: int) -> int:
    """Rows of `dim` floats assigned at a time: CHUNK_BYTES of them, at least 64."""
    return max(64, CHUNK_BYTES // (4 * max(dim, 1)))


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


def return_freed_memory() -> None:
    """Hand the C heap's free pages back to the system. Every step allocates and frees
    chunk-sized temporaries on several of torch's threads; glibc keeps them per
    thread otherwise, and a long-lived worker's resident memory creeps up step by step."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to do
        pass


class Blocks:
    """A shard's rows as blocks of tensors (one per batch read, in the dtype stored), on the
    worker's device, addressed as one array of rows. On the CPU a block is Arrow's own
    decoded buffer, so the rows are held once, never gathered into a second array; on a GPU
    they are held there and nowhere else."""

    def __init__(self, blocks: list, dim: int):
        self.blocks = blocks
        self.dim = dim
        self.starts = np.cumsum([0] + [len(b) for b in blocks])

    def __len__(self) -> int:
        return int(self.starts[-1])

    def pieces(self, rows: np.ndarray, max_rows: int):
        """(positions in `rows`, their vectors) for the sorted row numbers `rows`, at most
        `max_rows` at a time and never across blocks: a run of consecutive rows is a view."""
        cuts = np.searchsorted(rows, self.starts)
        for block, (first, last) in enumerate(zip(cuts[:-1], cuts[1:])):
            for begin in range(first, last, max_rows):
                end = min(begin + max_rows, last)
                local = rows[begin:end] - self.starts[block]
                if local[-1] - local[0] + 1 == len(local):
                    yield slice(begin, end), self.blocks[block][int(local[0]) : int(local[-1]) + 1]
                else:
                    yield slice(begin, end), self.blocks[block][as_tensor(local, self.blocks[block].device)]

    def take(self, rows: np.ndarray) -> np.ndarray:
        """The vectors of the sorted row numbers `rows`, as one new float32 array in memory."""
        out = np.empty((len(rows), self.dim), np.float32)
        for where, vectors in self.pieces(rows, max(len(rows), 1)):
            out[where] = vectors.float().cpu().numpy()
        return out

    def unit_rows(self, rows: np.ndarray) -> np.ndarray:
        """The unit vectors of the sorted row numbers `rows`, normalised on the device as
        every k-means step normalises them (the same bits), as a float32 array in memory."""
        out = np.empty((len(rows), self.dim), np.float32)
        for where, vectors in self.pieces(rows, max(len(rows), 1)):
            out[where] = unit(vectors).cpu().numpy()
        return out


@ray.remote
class ShardWorker:
    """Holds some embeddings files' accepted rows in memory for the whole selection: in GPU
    memory when Ray gave it a GPU (and torch sees one), else in the node's memory."""

    def __init__(self, files: list[str], threads: int = 0):
        import torch

        # The C heap, not Arrow's default mimalloc: the rows are kept as Arrow's decoded
        # buffers for the whole run, and mimalloc's segments around them held about 6% more
        # resident memory than the rows themselves (96 MB at a 1.56 GB share).
        pa.set_memory_pool(pa.system_memory_pool())
        if threads:  # the node's cores: Ray sets a fractional-CPU actor's OpenMP threads to 1
            torch.set_num_threads(threads)
        self.device = "cuda" if ray.get_gpu_ids() and torch.cuda.is_available() else "cpu"
        self.files = files
        self.pending: dict[str, tuple[embeddings.FileRows, list]] = {}
        self.x = Blocks([], 0)
        self.index = np.zeros(0, np.int64)
        self.last: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None  # rows, cluster, cosine of the last step
        self.fit_key: tuple | None = None  # (total rows, sample fraction, seed) of fit_rows
        self.fit_rows = np.zeros(0, np.int64)

    def scan(self) -> list[embeddings.FileRows]:
        reports = []
        for path in self.files:
            rows, values = embeddings.read_file(path)
            self.pending[path] = (rows, values)
            reports.append(rows)
            pa.default_memory_pool().release_unused()  # Arrow keeps freed read buffers otherwise
        return reports

    def keep(self, masks: list[np.ndarray], first_index: list[int], dim: int) -> int:
        """Keep the accepted rows; `first_index` is the global index of each file's first one.
        A batch whose vectors are all accepted keeps its decoded buffer as it is (or is moved
        to the GPU); any other is copied without its rejected rows and its buffer freed."""
        blocks, index = [], []
        for path, mask, start in zip(self.files, masks, first_index):
            rows, values = self.pending.pop(path)
            kept = embeddings.accepted_rows(rows, values, mask, dim)
            blocks += [as_tensor(block, self.device) for block in kept]
            index.append(start + np.arange(sum(len(block) for block in kept), dtype=np.int64))
            del rows, values, kept
            pa.default_memory_pool().release_unused()
        self.x = Blocks(blocks, dim)
        self.index = np.concatenate(index) if index else np.zeros(0, np.int64)
        return len(self.x)

    def reload(self, masks: list[np.ndarray], first_index: list[int], dim: int) -> int:
        """Read and keep this shard's rows as judged before: a lost shard's replacement."""
        self.scan()
        return self.keep(masks, first_index, dim)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def where(self) -> tuple[str, str]:
        """(node id, device) of this worker, for the manifest."""
        return self.node(), self.device

    def add(self, first: PartialSums, second: PartialSums) -> PartialSums:
        """Two shards' partial sums added, where one of them lives: a step of the reduction
        tree that keeps the driver's traffic at one (K, D) matrix per iteration."""
        return PartialSums.combine([first, second])

    def unit_rows_at(self, wanted: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        held = np.flatnonzero(np.isin(self.index, wanted))
        return self.index[held], self.x.unit_rows(held)

    def _assign(self, centroids: np.ndarray, rows: np.ndarray,
                sums: Sums | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Nearest centroid of each of `rows` (sorted), chunk by chunk; their sums added to `sums`."""
        import torch

        index = CentroidIndex(centroids, self.device)
        cluster = torch.empty(len(rows), dtype=torch.int64, device=self.device)
        cosine = torch.empty(len(rows), dtype=torch.float32, device=self.device)
        for chunk, vectors in self.x.pieces(rows, chunk_rows(self.x.dim)):
            x_unit = unit(vectors)
            cluster[chunk], cosine[chunk] = index.assign(x_unit)
            if sums is not None:
                sums.add(x_unit, cluster[chunk])  # exact whatever the chunks
        return cluster.cpu().numpy(), cosine.cpu().numpy()

    def step(self, centroids: np.ndarray, fit: tuple[int, float, int]) -> PartialSums:
        """Assign the rows the centroids are fitted on; their partial sums."""
        if self.fit_key != fit:
            total, fraction, seed = fit
            self.fit_key, self.fit_rows = fit, np.flatnonzero(sample_mask(total, fraction, seed)[self.index])
        sums = Sums(len(centroids), self.x.dim, self.device)
        cluster, cosine = self._assign(centroids, self.fit_rows, sums)
        self.last = (self.fit_rows, cluster, cosine)
        return_freed_memory()
        return sums.result()

    def spare(self, m: int) -> Spare:
        rows, cluster, cosine = self.last
        worst = np.lexsort((self.index[rows], cosine))[:m]
        order = np.argsort(rows[worst])  # Blocks wants sorted rows; Spare.combine reorders anyway
        worst = worst[order]
        return Spare(self.x.unit_rows(rows[worst]), cosine[worst], cluster[worst], self.index[rows[worst]])

    def assign_all(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        cluster, cosine = self._assign(centroids, np.arange(len(self.x)))
        return_freed_memory()
        return self.index, cluster, cosine

    def bucket_rows(self, assignments: np.ndarray, bucket_of_cluster: np.ndarray,
                    bucket: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This shard's rows in one scoring bucket: (global index, cluster, raw float32
        vectors). Asked for bucket by bucket while scoring runs, so that only the buckets
        being scored have a copy in the object store. `assignments` covers every accepted row."""
        cluster = assignments[self.index]
        rows = np.flatnonzero(bucket_of_cluster[cluster] == bucket)
        picked = self.index[rows], cluster[rows], self.x.take(rows)
        return_freed_memory()  # the previous bucket's copy
        return picked


LOST = (RayActorError, ObjectLostError, OwnerDiedError, WorkerCrashedError, NodeDiedError)
HEAL_ATTEMPTS = 3  # node losses survived within one phase before giving up
HEAL_DEADLINE_S = 600.0  # replacing the lost shards of one phase, retries included
ANSWER_S = 30.0  # a worker or a node that has not answered in this long is taken as lost


class ShardsLost(RuntimeError):
    """Lost shard workers could not be replaced (one line, for the user)."""


@ray.remote(num_cpus=0)
def node_of_this_task() -> str:
    return ray.get_runtime_context().get_node_id()


def node_answers(node: str, timeout: float = ANSWER_S) -> bool:
    """Whether a task pinned to `node` runs there now. Ray's node table still lists a node
    lost without warning (a spot preemption) until its heartbeats time out, so being
    listed alive is not enough to place a replacement there."""
    ref = node_of_this_task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False)).remote()
    try:
        return ray.get(ref, timeout=timeout) == node
    except Exception:  # lost, unschedulable or silent: not a place for a shard
        ray.cancel(ref, force=True)
        return False


def lost(error: BaseException) -> bool:
    """Whether `error` means a worker or its objects were lost (a node gone), not a bug."""
    return isinstance(error, LOST) or isinstance(getattr(error, "cause", None), LOST)


@dataclass
class Shard:
    """One worker's part of the input, as judged: enough to rebuild it anywhere."""

    files: list[str]
    masks: list[np.ndarray]
    first_index: list[int]
    node: str = ""
    device: str = "cpu"


@dataclass(frozen=True)
class Place:
    """Where a shard worker runs: its node, its threads, and whether it takes one of the
    node's GPUs to hold its rows and compute there."""

    node: str
    threads: int
    gpu: bool = False


def shard_nodes(workers: int = 0, device: str = "auto") -> list[Place]:
    """One place per alive node that has CPUs, using all of them, or `workers` spread over
    those nodes round-robin, sharing each node's CPUs. With device "auto" a worker on a node
    that has GPUs takes one of them (as many workers as the node has GPUs can)."""
    nodes = sorted((node["NodeID"], int(node["Resources"].get("CPU", 0)), int(node["Resources"].get("GPU", 0)))
                   for node in ray.nodes() if node.get("Alive") and node["Resources"].get("CPU", 0) >= 1)
    if not nodes:
        raise RuntimeError("no node of the Ray cluster has a CPU for a shard worker")
    count = workers or len(nodes)
    placed = [nodes[i % len(nodes)] for i in range(count)]
    sharing = Counter(node for node, _, _ in placed)
    seen: Counter = Counter()
    places = []
    for node, cpus, gpus in placed:
        seen[node] += 1
        places.append(Place(node, max(1, cpus // sharing[node]), device == "auto" and seen[node] <= gpus))
    return places


def start_worker(files: list[str], place: Place):
    """A shard worker pinned to its node: if the node is lost the worker is lost with it,
    and ShardSet.heal starts another on a node that is alive."""
    return ShardWorker.options(
        num_cpus=SHARD_CPUS, num_gpus=1 if place.gpu else 0,
        scheduling_strategy=NodeAffinitySchedulingStrategy(place.node, soft=False),
    ).remote(files, place.threads)


@dataclass
class ShardSet:
    """The shard workers of one run and the driver's view of what they hold."""

    workers: list
    verdict: embeddings.Verdict
    shards: list[Shard] = field(default_factory=list)
    driver_bytes: list[int] = field(default_factory=list)  # received per Lloyd iteration
    replaced: list[str] = field(default_factory=list)  # what each replacement of a lost shard was for
    progress: object = None
    device: str = "auto"  # cluster.device: "auto" lets a worker on a GPU node take a GPU

    @property
    def n(self) -> int:
        return len(self.verdict.ids)

    @property
    def dim(self) -> int:
        return self.verdict.dim

    @staticmethod
    def load(source, workers: int = 0, stage: str = "select", dim: int | None = None, progress=None,
             device: str = "auto") -> "ShardSet":
        """Start workers over the embeddings files (a folder URI or a list of files), one per
        node by default, judge every row on the driver (`dim`: the dimension the embed stage
        recorded, else the majority's), and leave the accepted rows on the workers."""
        files = io.list_files(source, (".parquet",)) if isinstance(source, str) else list(source)
        places = shard_nodes(workers, device)[: max(1, len(files))]
        groups = [list(g) for g in np.array_split(np.array(files, dtype=object), len(places))]
        actors = [start_worker(group, place) for group, place in zip(groups, places)]
        try:
            shards = ShardSet._judge_and_keep(actors, groups, stage, dim, progress)
            shards.device = device
            return shards
        except BaseException:
            for actor in actors:  # nobody else holds them yet
                ray.kill(actor)
            raise

    @staticmethod
    def _judge_and_keep(actors: list, groups: list[list[str]], stage: str, dim: int | None,
                        progress) -> "ShardSet":
        reports = ray.get([a.scan.remote() for a in actors])
        verdict = embeddings.judge([r for group in reports for r in group], stage, dim)
        masks = iter(verdict.accepted)
        next_index = 0
        shards = []
        for files in groups:
            shard = Shard(files, [], [])
            for _ in files:
                shard.masks.append(next(masks))
                shard.first_index.append(next_index)
                next_index += int(shard.masks[-1].sum())
            shards.append(shard)
        ray.get([a.keep.remote(s.masks, s.first_index, verdict.dim) for a, s in zip(actors, shards)])
        for shard, (node, on) in zip(shards, ray.get([a.where.remote() for a in actors])):
            shard.node, shard.device = node, on
        return ShardSet(actors, verdict, shards, progress=progress)

    def close(self) -> None:
        for worker in self.workers:
            ray.kill(worker)

    def plan(self) -> dict:
        """Where the shards ran, for the manifest."""
        per_iteration = int(np.mean(self.driver_bytes)) if self.driver_bytes else 0
        return {"shard_workers": len(self.workers), "nodes": sorted({s.node for s in self.shards}),
                "devices": dict(sorted(Counter(s.device for s in self.shards).items())),
                "driver_bytes_per_iteration": per_iteration, "shards_replaced": list(self.replaced)}

    def heal(self, why: str) -> int:
        """Replace each worker that no longer answers with a new one over the same files, on
        a node that answers; the number replaced. Raises a LOST error when a replacement is
        lost too (survive tries again)."""
        answers = [w.node.remote() for w in self.workers]
        dead, answering = [], set()
        for i, answer in enumerate(answers):
            try:
                answering.add(ray.get(answer, timeout=ANSWER_S))
            except (*LOST, GetTimeoutError):
                dead.append(i)
        if not dead:
            return 0
        places = [place for place in shard_nodes(device=self.device)
                  if place.node in answering or node_answers(place.node)]
        if not places:
            raise NodeDiedError("no node of the cluster answers")  # survive waits for one, up to its deadline
        for turn, i in enumerate(dead):
            ray.kill(self.workers[i])
            place = places[turn % len(places)]
            shard = self.shards[i]
            began = time.perf_counter()
            self.workers[i] = start_worker(shard.files, place)
            ray.get(self.workers[i].reload.remote(shard.masks, shard.first_index, self.dim))
            shard.node, shard.device = ray.get(self.workers[i].where.remote())
            node = shard.node
            note = (f"shard {i} lost during {why}: reloaded {len(shard.files)} file(s) on node {node[:12]} "
                    f"in {time.perf_counter() - began:.1f}s")
            self.replaced.append(note)
            if self.progress:
                self.progress(note)
        return len(dead)

    def survive(self, why: str, phase, deadline_s: float = HEAL_DEADLINE_S):
        """`phase()`, run again after replacing lost shards when a node is lost during it.
        Every phase is a deterministic function of the shards' rows, so a rerun gives what
        an uninterrupted one would have. Healing is retried (a replacement can be lost too)
        until `deadline_s`; then ShardsLost, in one line."""
        deadline = time.monotonic() + deadline_s
        for attempt in range(HEAL_ATTEMPTS + 1):
            try:
                return phase()
            except Exception as error:
                if not lost(error):
                    raise
                if attempt == HEAL_ATTEMPTS:
                    raise ShardsLost(f"{why}: shard workers were lost {attempt + 1} times; "
                                     f"last: {type(error).__name__}") from None
                last = error
            while True:
                if time.monotonic() > deadline:
                    raise ShardsLost(f"{why}: lost shard workers could not be replaced within {deadline_s:g} s "
                                     f"({type(last).__name__}); the cluster has no node that answers") from None
                try:
                    if not self.heal(why):
                        time.sleep(1.0)  # the loss is still being noticed: look again
                    break
                except Exception as error:
                    if not lost(error):
                        raise
                    last = error
                    time.sleep(1.0)

    def unit_rows_at(self, wanted: np.ndarray) -> np.ndarray:
        def gather():
            return ray.get([w.unit_rows_at.remote(wanted) for w in self.workers])

        parts = self.survive("the k-means start", gather)
        index = np.concatenate([i for i, _ in parts])
        rows = np.concatenate([r for _, r in parts])
        return rows[np.argsort(index)]

    def reduced_sums(self, shared: ray.ObjectRef, fit: tuple) -> PartialSums:
        """Every shard's partial sums, added pairwise on the workers (a tree), so that the
        driver receives one (K, D) matrix however many shards there are."""
        level = [(w, w.step.remote(shared, fit)) for w in self.workers]
        while len(level) > 1:
            paired = []
            for (worker, first), (_, second) in zip(level[0::2], level[1::2]):
                paired.append((worker, worker.add.remote(first, second)))
            level = paired + level[len(paired) * 2 :]  # an odd one out waits for the next level
        return ray.get(level[0][1])

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
                hold(f"k-means before iteration {done}", release_file())
            began = time.perf_counter()
            shared = ray.put(centroids)  # sent once per iteration, read by every shard
            centroids = ray.get(shared)  # a view of that copy: the driver holds no second one of its own

            def iteration(shared=shared):
                stats = self.reduced_sums(shared, fit)
                m = spare_needed(stats.counts)
                spares = ray.get([w.spare.remote(m) for w in self.workers]) if m else []
                received = stats.sums.nbytes + stats.counts.nbytes + sum(
                    sum(a.nbytes for a in (p.rows, p.cosine, p.cluster, p.index)) for p in spares)
                return stats, (Spare.combine(spares, m) if m else None), received

            stats, spare, received = self.survive(f"k-means iteration {done + 1}", iteration)
            self.driver_bytes.append(received)
            centroids = update_centroids(stats, spare, centroids)
            empty = int((stats.counts == 0).sum())
            del shared, stats, spare  # freed before the next iteration's: the object store reuses their pages
            gauges.set(done + 1, time.perf_counter() - began)
            if progress and (done + 1) % max(1, iterations // 10) == 0:
                progress(f"k-means {'[' + '#' * (24 * (done + 1) // iterations)}"
                         f"{'-' * (24 - 24 * (done + 1) // iterations)}] {done + 1}/{iterations} iterations"
                         + (f", {empty} empty clusters reseeded" if empty else ""))

        def assign_all():
            shared = ray.put(centroids)
            return ray.get([w.assign_all.remote(shared) for w in self.workers])

        parts = self.survive("the final assignment", assign_all)
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
