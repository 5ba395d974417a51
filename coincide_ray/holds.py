"""Test-only hold points: COINCIDE_RAY_TEST_HOLD=<point>:<n> parks a run at a known place
so that a crash test can kill it there, with no timing race deciding the verdict. Points:
`embed-block:N` (every block numbered N or more waits instead of being published, so exactly
blocks 0..N-1 are written), `embed-prepare:N` (a preparer holds every block numbered N or
more before preparing it), `embed-model:N` (a model actor holds every block numbered N or
more before running the model) and `kmeans-iteration:N` (the driver waits before iteration N).
`<point>:<n>:<file>` waits only until `file` exists, then goes on: a test can change the
cluster (remove a node) at a known place and see the same run finish.
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
    value = value.partition(":")[0]
    return int(value) if name == point and value.isdigit() else None


def release_file() -> str | None:
    """The file whose appearance ends a hold, when the variable names one."""
    return os.environ.get(VARIABLE, "").split(":", 2)[2] if os.environ.get(VARIABLE, "").count(":") >= 2 else None


def hold(message: str, release: str | None = None) -> None:
    """Say where the run is held, then wait until it is killed, or until `release` exists."""
    print(f"[coincide-ray] test hold: {message}", file=sys.stderr, flush=True)
    while not (release and os.path.exists(release)):
        time.sleep(0.2 if release else 3600)
