"""The run manifest: what ran, on what, what came out, and whether to trust it."""

from __future__ import annotations

import hashlib
import platform
import sys
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


def mark_in_progress(output: str) -> None:
    """Mark `output` as mid-update, before a run's first write into it (the nightly refresh
    never builds on such a folder); clear_in_progress removes the mark after the manifest."""
    import datetime

    io.write_json({"command": command_line(), "started": datetime.datetime.now(datetime.timezone.utc).isoformat()},
                  io.join(output, schema.IN_PROGRESS_PATH))


def clear_in_progress(output: str) -> None:
    marker = io.join(output, schema.IN_PROGRESS_PATH)
    if io.exists(marker):
        io.remove(marker)
