"""What every benchmark script shares: one printed line per figure, and timing helpers.

A figure line is: name, value, unit, baseline, ratio, target, verdict. `jobs/bench.py`
collects these lines from every script; in quick mode the sizes are too small for the
targets to apply, so the verdict reads "(quick)".
"""

from __future__ import annotations

import json
import os
import platform
import resource
import time


def best_of(runs: int, fn) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def timed(fn):
    """(result, seconds) of one call."""
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def machine(**extra) -> None:
    import numpy

    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "python": platform.python_version(),
                      "numpy": numpy.__version__, **extra}), flush=True)


def report(name: str, value: float, unit: str, baseline: float, ratio: float, target: str | None,
           ok: bool | None, quick: bool) -> None:
    """One figure. `target` None means the figure is shown for information, with no target."""
    verdict = "(quick)" if quick else "-" if target is None else "PASS" if ok else "MISS"
    print(f"{name:40s} {value:12.4f} {unit:9s} baseline {baseline:12.4f}  ratio {ratio:8.3f}  "
          f"target {target or '(shown)':10s} {verdict}", flush=True)
