"""Every benchmark figure in one command: one line per figure (name, value, unit, baseline,
ratio, target, verdict), each measured against its baseline in the same run.

    python jobs/bench.py            # the figures of record (BENCHMARKS.md); about 55 minutes on 2 cores
    python jobs/bench.py --quick    # every script at small sizes: a few minutes, checks they all work

Runs, in turn: greedy MMD vs a naive ranking and one kernel (bench_select.py), k-means on Ray
vs faiss (bench_kmeans.py), the embedding pipeline vs a bare loop (bench_embed.py), the
select stage at growing N (bench_selection_stage.py), the real dimension, driver traffic,
padding and image fetching (bench_real_dimension.py, bench_cluster_traffic.py,
bench_batching.py, bench_fetch.py), the whole job at 665,000 and 5,000,000 records
(bench_scale.py: about 25 of the minutes), and the demo end to end (jobs/demo.py), whose time
per stage is shown against the whole run.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCH = HERE / "bench"  # the benchmark scripts and their helper, benchkit.py
sys.path.insert(0, str(BENCH))

from benchkit import report  # noqa: E402
SCRIPTS = ["bench_select.py", "bench_kmeans.py", "bench_embed.py", "bench_selection_stage.py", "bench_real_dimension.py",
           "bench_cluster_traffic.py", "bench_batching.py", "bench_fetch.py", "bench_scale.py"]


def is_figure(line: str) -> bool:
    return " baseline " in line and " ratio " in line and " target " in line


def run_script(script: str, quick: bool) -> int:
    """Run one benchmark script, echo its figure lines; returns how many there were, or -1
    when the script failed (a figure it printed before failing does not make it a success)."""
    command = [sys.executable, str(BENCH / script), *(["--quick"] if quick else [])]
    out = subprocess.run(command, capture_output=True, text=True)
    figures = [line for line in out.stdout.splitlines() if is_figure(line)]
    for line in figures:
        print(line, flush=True)
    if out.returncode:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        print(f"{script} failed (exit {out.returncode}): {' | '.join(tail)}", flush=True)
        return -1
    return len(figures)


def demo_end_to_end(quick: bool) -> int:
    records = 200 if quick else 2000
    training = ["--train-epochs", "1"] if quick else []  # quick: one pass over the corpus, not six
    folder = tempfile.mkdtemp(prefix="bench-demo-")
    start = time.perf_counter()
    subprocess.run([sys.executable, str(HERE / "demo.py"), "--output", folder, "--records", str(records), *training],
                   check=True, capture_output=True, text=True)
    total = time.perf_counter() - start
    manifest = json.loads(Path(folder, "manifest.json").read_text())
    for stage, seconds in manifest["timings_s"].items():
        report(f"demo_{records}_{stage}", seconds, "s", total, seconds / total, None, None, quick)
    report(f"demo_{records}_end_to_end", total, "s", total, 1.0, "< 600 s", total < 600, quick)
    subprocess.run(["rm", "-rf", folder], check=False)
    return len(manifest["timings_s"]) + 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: checks every script works")
    args = parser.parse_args()
    print(json.dumps({"command": " ".join(sys.argv), "quick": args.quick}), flush=True)
    counts = {script: run_script(script, args.quick) for script in SCRIPTS}
    counts["demo"] = demo_end_to_end(args.quick)
    failed = [name for name, count in counts.items() if count < 0]
    missing = [name for name, count in counts.items() if count == 0]
    if failed or missing:
        print(f"failed: {', '.join(failed) or '-'}; no figures from: {', '.join(missing) or '-'}", flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
