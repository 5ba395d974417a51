"""Benchmarks of the selection core, each against a baseline measured in the same run.

    python jobs/bench/bench_select.py            # the figures of record (BENCHMARKS.md)
    python jobs/bench/bench_select.py --quick    # small sizes, seconds: checks the script works

One line per figure: name, value, unit, baseline, ratio, target, verdict.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys

import benchkit
import numpy as np
from benchkit import best_of

from coincide_ray.select import greedy_mmd_order


def gaussian_kernel(x: np.ndarray, sigma: float = 1.0) -> np.ndarray:
    """The n x n float64 kernel, computed once the plain way: the cost unit of a ranking."""
    sq = np.einsum("ij,ij->i", x, x)
    return np.exp(-np.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0) / (2 * sigma**2))


def naive_greedy(x: np.ndarray, count: int) -> list[int]:
    """The authors' approach: for every candidate, MMD^2 from kernel sub-matrix means
    (vectorised over candidates as their script does)."""
    k = gaussian_kernel(x)
    n = len(x)
    chosen: list[int] = []
    k_xx = k.mean()
    for _ in range(count):
        candidates = np.setdiff1d(np.arange(n), chosen)
        trial = np.concatenate([np.tile(np.array(chosen, dtype=np.int64), (len(candidates), 1)),
                                candidates[:, None]], axis=1)
        k_xy = k[:, trial].mean(axis=(0, 2))
        k_yy = k[trial[:, :, None], trial[:, None, :]].mean(axis=(1, 2))
        chosen.append(int(candidates[np.argmin(k_xx + k_yy - 2 * k_xy)]))
    return chosen


JUDGE_TARGETS = True  # off in --quick mode: its sizes are too small for the targets to apply


def report(name: str, value: float, unit: str, baseline: float, ratio: float, target: str, ok: bool) -> None:
    benchkit.report(name, value, unit, baseline, ratio, target, ok, quick=not JUDGE_TARGETS)


def full_ranking_vs_kernel(n: int, d: int, runs: int) -> None:
    x = np.random.default_rng(0).standard_normal((n, d)) * 0.06
    kernel = best_of(runs, lambda: gaussian_kernel(x))
    ranking = best_of(runs, lambda: greedy_mmd_order(x))
    ratio = ranking / kernel
    report(f"mmd_full_ranking_n{n}_d{d}", ranking, "s", kernel, ratio, "<= 2.0", ratio <= 2.0)


def prefix_vs_naive(n: int, d: int, count: int, runs: int) -> None:
    x = np.random.default_rng(1).standard_normal((n, d)) * 0.06
    ours = greedy_mmd_order(x, limit=count)
    if list(ours) != naive_greedy(x, count):
        raise SystemExit("the fast ranking disagrees with the naive one: benchmark aborted")
    naive = best_of(runs, lambda: naive_greedy(x, count))
    fast = best_of(runs, lambda: greedy_mmd_order(x, limit=count))
    report(f"mmd_first{count}_of_n{n}_vs_naive", fast, "s", naive, naive / fast, ">= 100", naive / fast >= 100)


MEMORY_CHILD = """
import resource, sys, time, numpy as np
from coincide_ray.select import greedy_mmd_order
n, d, top = map(int, sys.argv[1:4])
x = np.random.default_rng(2).standard_normal((n, d)).astype(np.float32) * 0.1
start = time.perf_counter()
order = greedy_mmd_order(x, limit=top)
print(time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
"""


def giant_cluster_memory(n: int, d: int, top: int) -> None:
    """Peak resident memory of a fresh process ranking the top of one giant cluster."""
    out = subprocess.run([sys.executable, "-c", MEMORY_CHILD, str(n), str(d), str(top)],
                         check=True, capture_output=True, text=True).stdout.split()
    seconds, peak_mb = float(out[0]), float(out[1])
    full_kernel_mb = n * n * 8 / 2**20  # what keeping the whole float64 kernel would need
    report(f"mmd_top{top}_of_n{n}_d{d}_peak_rss", peak_mb, "MB", full_kernel_mb, peak_mb / full_kernel_mb,
           "< 1536 MB", peak_mb < 1536)
    print(f"{'':34s} ({seconds:.1f}s for the ranking)", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run in seconds")
    args = parser.parse_args()
    global JUDGE_TARGETS
    JUDGE_TARGETS = not args.quick

    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                      "numpy": np.__version__, "quick": args.quick}))
    if args.quick:
        full_ranking_vs_kernel(600, 64, runs=1)
        prefix_vs_naive(120, 32, 20, runs=1)
        giant_cluster_memory(4000, 32, 20)
    else:
        full_ranking_vs_kernel(3000, 256, runs=3)
        prefix_vs_naive(300, 256, 60, runs=3)
        giant_cluster_memory(40_000, 128, 200)
    return 0


if __name__ == "__main__":
    sys.exit(main())
