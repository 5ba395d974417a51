"""Record shards on Ray: the shard pass and the duplicate search as tasks, and one function
applied to every block of a corpus by tasks that read the shards themselves."""

from __future__ import annotations

from collections.abc import Callable

import ray

from coincide_ray import io
from coincide_ray.corpus import shards


def on_ray(fn: Callable, calls: list[tuple]) -> list:
    """A shards.Runner: each call a Ray task of one CPU (they parse JSON), retried when storage
    keeps failing or a node is lost; results in the order of the calls."""
    task = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[io.StorageError])(fn)
    return ray.get([task.remote(*args) for args in calls])


def prepare(input_uri: str, output: str, chunk_records: int, progress: Callable[[str], None]) -> shards.Corpus:
    """shards.prepare with its work on Ray tasks: the driver never holds the records."""
    return shards.prepare(input_uri, output, chunk_records, progress, run=on_ray)


def map_blocks(corpus: shards.Corpus, block_records: int, fn: Callable, *args, blocks: list[int] | None = None,
               blocks_per_task: int = 8) -> list:
    """[fn(block row, *args) for every block (or each of `blocks`)], in block order, run by
    Ray tasks of `blocks_per_task` blocks each (a quarter CPU each: they mostly wait on
    storage). Each argument goes to the object store once; one already there is passed as it is."""
    rows = corpus.block_rows(block_records, blocks)
    shared = [arg if isinstance(arg, ray.ObjectRef) else ray.put(arg) for arg in args]
    task = ray.remote(num_cpus=0.25, max_retries=3, retry_exceptions=[io.StorageError])(_map_rows)
    refs = [task.remote(fn, rows[start:start + blocks_per_task], *shared)
            for start in range(0, len(rows), blocks_per_task)]
    return [result for ref in refs for result in ray.get(ref)]


def _map_rows(fn: Callable, rows: list[dict], *args) -> list:
    return [fn(row, *args) for row in rows]
