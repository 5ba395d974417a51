"""The run manifest: what ran, on what, what came out, and whether to trust it."""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
import socket
import sys
import threading
import time
import uuid
from collections import Counter
from importlib import metadata

import numpy as np

from coincide_ray import io, schema
from coincide_ray.arrays import unit_rows

COLLAPSED_COSINE = 0.99


def library_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in ("coincide-ray", "numpy", "faiss-cpu", "faiss-gpu", "pyarrow", "torch", "transformers", "ray"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            continue
    return versions


def fingerprint(root: str, files: list[str]) -> str:
    """sha256 over every input file's name under `root` and its content digest (io.digest),
    in order: what a stage read, never only the names or sizes."""
    digest = hashlib.sha256()
    prefix = root.rstrip("/") + "/"
    for uri in files:
        name = uri[len(prefix):] if uri.startswith(prefix) else uri.rsplit("/", 1)[-1]
        digest.update(f"{name}\0{io.digest(uri)}\n".encode())
    return digest.hexdigest()


def collapsed_centroid_pairs(centroids: np.ndarray, block_rows: int = 1024) -> int:
    """Pairs of distinct centroids with cosine > 0.99: clusters that split one mode."""
    unit = unit_rows(centroids)
    pairs = 0
    for start in range(0, len(unit), block_rows):
        cos = unit[start : start + block_rows] @ unit.T
        rows = np.arange(len(cos))
        upper = np.arange(len(unit))[None, :] > (rows + start)[:, None]
        pairs += int(((cos > COLLAPSED_COSINE) & upper).sum())
    return pairs


def cluster_warnings(clusters: int, accepted: int) -> list[str]:
    """What makes a clustering suspect before it runs."""
    if clusters > accepted:
        return [f"{clusters} clusters for {accepted} accepted records: at least {clusters - accepted} clusters "
                "stay empty; choose K well below the number of records (the paper: about N / 66)"]
    return []


def health(centroids: np.ndarray, sizes: np.ndarray, rejected_reasons: list[str], budget: int, selected: int) -> dict:
    accepted = int(sizes.sum())
    return {
        "warnings": cluster_warnings(len(sizes), accepted),
        "collapsed_centroid_pairs": collapsed_centroid_pairs(centroids),
        "empty_clusters": int((sizes == 0).sum()),
        "largest_cluster_share": float(sizes.max() / accepted) if accepted else 0.0,
        "rejected_by_reason": dict(sorted(Counter(rejected_reasons).items())),
        "budget": budget,
        # DESIGN.md step 4 passes what a capped cluster cannot take to the clusters after it;
        # when the last clusters visited are too small the selection falls short of the budget.
        "budget_shortfall": budget - selected,
    }


def command_line() -> str:
    return " ".join(sys.argv)


RUN_ID = uuid.uuid4().hex  # this process's run: its stages share one lease on the output
HEARTBEAT_S = 20.0  # the lease is rewritten this often while the run lives
STALE_S = 120.0  # a lease not rewritten for this long belongs to a run that is gone


class OutputBusy(RuntimeError):
    """Another live run is writing into the same output (one line, for the user)."""


_beating: dict[str, threading.Event] = {}
# Held while a lease is written or removed: a heartbeat that woke just before its run ended
# must not write the mark back after clear_in_progress removed it.
_lease_lock = threading.Lock()


def mark_in_progress(output: str) -> None:
    """Mark `output` as mid-update before a run's first write into it: the mark is also a
    lease, with the run's id and a heartbeat rewritten every HEARTBEAT_S. A second run
    refuses while another's lease is live (its process alive on this host, or its heartbeat
    fresh from another); a lease left by a killed run is taken over. clear_in_progress
    removes the mark after the manifest. The nightly refresh never builds on a marked run."""
    marker = io.join(output, schema.IN_PROGRESS_PATH)
    if io.exists(marker):
        try:
            holder = io.read_json(marker)
        except ValueError:
            holder = {}
        if holder.get("run_id") not in (None, RUN_ID) and lease_is_live(holder):
            raise OutputBusy(f"{output} is being written by another run (id {holder['run_id'][:12]}, host "
                             f"{holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}); "
                             "wait for it to finish or choose another --output")
    started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    lease = {"run_id": RUN_ID, "host": socket.gethostname(), "pid": os.getpid(), "command": command_line(),
             "started": started}
    write_lease(marker, lease)
    if output not in _beating:
        stop = _beating[output] = threading.Event()
        threading.Thread(target=heartbeat, args=(marker, lease, stop), daemon=True, name="lease").start()


def write_lease(marker: str, lease: dict) -> None:
    io.write_json({**lease, "heartbeat": time.time()}, marker)


def heartbeat(marker: str, lease: dict, stop: threading.Event) -> None:
    while not stop.wait(HEARTBEAT_S):
        with _lease_lock:
            if stop.is_set():
                return
            try:
                write_lease(marker, lease)
            except Exception:  # a missed beat: the next one may pass; staleness takes minutes
                pass


def lease_is_live(holder: dict) -> bool:
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True  # another user's live process
    return time.time() - float(holder.get("heartbeat") or 0) < STALE_S


def stop_heartbeats() -> None:
    """Stop rewriting every lease this process holds (the run ended, finished or not); the
    marks stay where a run did not finish."""
    with _lease_lock:
        while _beating:
            _beating.popitem()[1].set()


def clear_in_progress(output: str) -> None:
    with _lease_lock:
        stop = _beating.pop(output, None)
        if stop is not None:
            stop.set()
        marker = io.join(output, schema.IN_PROGRESS_PATH)
        if io.exists(marker):
            io.remove(marker)
