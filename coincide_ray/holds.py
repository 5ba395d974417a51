"""Test-only hold points: COINCIDE_RAY_TEST_HOLD=<point>:<n> parks a run at a known place
so that a crash test can kill it there, with no timing race deciding the verdict. Points:
`embed-block:N` (every block numbered N or more waits instead of being published, so exactly
blocks 0..N-1 are written) and `kmeans-iteration:N` (the driver waits before iteration N).
Unset, as in every real run, nothing waits."""

from __future__ import annotations

import os
import sys
import time

VARIABLE = "COINCIDE_RAY_TEST_HOLD"


def hold_point(point: str) -> int | None:
    """N for `point` when the variable names it, else None (read where the run starts: Ray
    workers do not share the driver's environment, so the driver passes N on)."""
    name, _, value = os.environ.get(VARIABLE, "").partition(":")
    return int(value) if name == point and value.isdigit() else None


def hold(message: str) -> None:
    """Say where the run is held, then wait until it is killed."""
    print(f"[coincide-ray] test hold: {message}", file=sys.stderr, flush=True)
    while True:
        time.sleep(3600)
