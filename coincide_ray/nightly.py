"""The nightly refresh: one complete run a night under <root>/runs/<date>, reusing the vectors
of the newest usable earlier run and diffing against it; <root>/latest.json points at the
newest finished night and only ever moves forward.

Which earlier run a night builds on is decided from the runs themselves, not only from
latest.json: a run that was deleted, cut short or is mid-update cannot wedge the nights
after it (they fall back to the newest run that is usable, or to none, and say so), and a
backfill of an older date neither builds on a newer night nor moves latest.json back.
"""

from __future__ import annotations

import datetime
import re
from typing import Callable

from coincide_ray import io, schema

LATEST = "latest.json"
RUNS = "runs"
DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def check_date(date: str) -> str:
    """--date as YYYY-MM-DD (runs sort by name, so the name must be the date)."""
    try:
        if DATE.match(date) and datetime.date.fromisoformat(date):
            return date
    except ValueError:
        pass
    raise ValueError(f"--date {date!r} is not a date of the form YYYY-MM-DD")


def why_unusable(run: str) -> str | None:
    """None when `run` is a finished run whose vectors and selection can be built on; else
    why not, in a few words."""
    if io.exists(io.join(run, schema.IN_PROGRESS_PATH)):
        return "it is marked in progress (a run was stopped before it finished)"
    if not io.exists(io.join(run, schema.MANIFEST_PATH)):
        return f"it has no {schema.MANIFEST_PATH} (it never finished)"
    done = io.join(run, schema.EMBEDDINGS_DONE_PATH)
    if not io.exists(done):
        return f"it has no {schema.EMBEDDINGS_DONE_PATH}"
    try:
        listed = io.read_json(done).get("parts", [])
    except (ValueError, OSError) as error:
        return f"its {schema.EMBEDDINGS_DONE_PATH} cannot be read ({type(error).__name__})"
    try:  # one listing, not a request per part file
        present = {uri.rsplit("/", 1)[-1] for uri in io.list_files(io.join(run, schema.EMBEDDINGS_DIR), (".parquet",))}
    except FileNotFoundError:
        present = set()
    missing = [name for name in listed if name not in present]
    if missing:
        return f"{len(missing)} of its {len(listed)} embeddings part files are gone (first: {missing[0]})"
    if not io.exists(io.join(run, schema.SELECTION_PATH)):
        return f"it has no {schema.SELECTION_PATH}"
    return None


def dated_runs(root: str) -> list[str]:
    """The dates of the runs under <root>/runs, oldest first."""
    return [name for name in io.list_folders(io.join(root, RUNS)) if DATE.match(name)]


def read_latest(root: str) -> dict | None:
    pointer = io.join(root, LATEST)
    if not io.exists(pointer):
        return None
    try:
        latest = io.read_json(pointer)
    except ValueError:
        return None
    return latest if isinstance(latest, dict) and DATE.match(str(latest.get("date", ""))) else None


def choose_previous(root: str, date: str, progress: Callable[[str], None]) -> str | None:
    """The newest usable run dated before `date`, saying why each newer one is passed over;
    None, said too, when there is none."""
    for earlier in reversed([d for d in dated_runs(root) if d < date]):
        run = io.join(root, RUNS, earlier)
        reason = why_unusable(run)
        if reason is None:
            progress(f"previous run: {run}")
            return run
        progress(f"previous run {run} cannot be used: {reason}; trying an older one")
    progress("no usable earlier run: this night embeds every record")
    return None


def finish_night(root: str, date: str, output: str, previous: str | None,
                 progress: Callable[[str], None]) -> None:
    """Point latest.json at tonight's run, unless a newer night is already the latest (a
    backfill): then the run stays where it was written and latest.json does not move."""
    latest = read_latest(root)
    if latest is not None and latest["date"] > date:
        progress(f"backfill: {output} written; {io.join(root, LATEST)} stays at {latest['run']} "
                 f"({latest['date']} is newer)")
        return
    io.write_json({"run": output, "previous": previous, "date": date}, io.join(root, LATEST))
    progress(f"{io.join(root, LATEST)} -> {output}")
