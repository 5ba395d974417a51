"""Where `select`'s memory goes, stage by stage: the driver's and each shard worker's
resident memory (peak), and the peaks of its parts: private (anonymous) pages, mapped files
(the libraries' code) and shared memory (the object store's pages a process has touched are
counted in its RSS), sampled every 0.2 s and lined up with the
run's own progress messages.

    python jobs/bench/profile_select_memory.py --rows 20000     # D = 20,480, K = N / 66.5, 5 iterations

The profile behind the memory figures of jobs/bench/bench_real_dimension.py (BENCHMARKS.md).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile

from bench_real_dimension import GENERATE, HIDDEN, LAYERS, PART_ROWS

RUN = r"""
import os, sys, threading, time
import psutil, ray
from coincide_ray.config import ClusterConfig, JobConfig, SelectConfig
from coincide_ray.pipeline import run_select

n, folder = int(sys.argv[1]), sys.argv[2]
MB = 2**20
samples, events, stop = [], [], threading.Event()
began = time.perf_counter()

def memory(pid):
    fields = dict(line.split(":", 1) for line in open(f"/proc/{pid}/status").read().splitlines() if ":" in line)
    kb = lambda key: int(fields.get(key, "0 kB").split()[0]) / 1024
    return kb("RssAnon"), kb("RssFile"), kb("RssShmem")

def watch():
    while not stop.is_set():
        now = time.perf_counter() - began
        row = {"driver": memory(os.getpid())}
        for p in psutil.process_iter(["pid", "name"]):
            if (p.info["name"] or "").startswith("ray::ShardWorker"):
                try:
                    row[f"worker {p.pid}"] = memory(p.pid)
                except OSError:
                    pass
        samples.append((now, row))
        stop.wait(0.2)

ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
threading.Thread(target=watch, daemon=True).start()
config = JobConfig(output=f"{folder}/out", embeddings=f"{folder}/emb", layers=tuple(range(5)),
                   cluster=ClusterConfig(clusters=max(8, round(n / 66.5)), iterations=5),
                   select=SelectConfig(fraction=0.2))
run_select(config, progress=lambda m: events.append((time.perf_counter() - began, m[:70])))
events.append((time.perf_counter() - began, "run_select returned"))
stop.set()
time.sleep(0.3)
start = 0.0
for at, message in events:
    window = [row for t, row in samples if start <= t <= at]
    peaks = {}
    for row in window:
        for who, parts in row.items():
            old = peaks.get(who, (0.0, 0.0, 0.0, 0.0))
            peaks[who] = (max(old[0], sum(parts)), *(max(a, b) for a, b in zip(old[1:], parts)))
    text = "; ".join(f"{who} {rss:.0f} MB (private {anon:.0f}, files {mapped:.0f}, shared {shared:.0f})"
                     for who, (rss, anon, mapped, shared) in sorted(peaks.items()))
    print(f"{start:6.1f}-{at:6.1f}s up to '{message}': {text}", flush=True)
    start = at
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=20_000)
    args = parser.parse_args()
    folder = tempfile.mkdtemp(prefix="profile-d20k-")
    os.makedirs(f"{folder}/emb")
    try:
        subprocess.run([sys.executable, "-c", GENERATE, str(args.rows), str(LAYERS), str(HIDDEN), str(PART_ROWS),
                        folder], check=True)
        return subprocess.run([sys.executable, "-c", RUN, str(args.rows), folder]).returncode
    finally:
        subprocess.run(["rm", "-rf", folder], check=False)


if __name__ == "__main__":
    sys.exit(main())
