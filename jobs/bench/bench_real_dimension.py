"""`select` at the paper's dimension, D = 20,480 (5 layers x 2,048): time and memory.

    python jobs/bench/bench_real_dimension.py                       # N = 20,000 (BENCHMARKS.md)
    python jobs/bench/bench_real_dimension.py --rows 20000,100000   # on a machine with room for 100,000
    python jobs/bench/bench_real_dimension.py --quick               # N = 3,000: checks the script works (tests)

N = 100,000 is not in the default: it needs about 12 GB and half an hour of both cores on the
project's 2-core machines, most of it k-means (BENCHMARKS.md).

For each N the embeddings are written first, by a process of their own (Parquet parts of
2,500 rows, float32, planted groups), so that no figure measures the generator. Then a
fresh process runs `run_select` on a local Ray with every core: K = N / 66.5 (LLaVA-665K's
ratio at K = 10,000), 5 Lloyd iterations, budget 20%. It records the seconds per stage, its
own peak RSS, and each shard worker's peak RSS (VmHWM, sampled while the workers live) and its
largest private memory less that of an idle shard worker started in the same run.

Targets (issue 19): the driver within 1.5 GB plus two copies of the K x D float32 centroid
matrix; a shard worker within 1.3x its share of the rows plus its centroid structures
(the K x D float32 centroids in the assignment index and the K x D int64 sums). Also shown:
read throughput per worker, and k-means seconds per iteration, the CPU baseline that the
GPU path is measured against.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchkit import report

LAYERS, HIDDEN = 5, 2048
DIMENSION = 2 * LAYERS * HIDDEN
PART_ROWS = 2_500
MB = 2**20

GENERATE = r"""
import sys
from coincide_ray import io, schema
from coincide_ray.toy.synthetic import planted_embeddings
n, layers, hidden, rows = map(int, sys.argv[1:5])
folder = sys.argv[5]
for part, start in enumerate(range(0, n, rows)):
    count = min(rows, n - start)
    x, _ = planted_embeddings(count, num_layers=layers, hidden=hidden, groups=200, noise=1.0, seed=part)
    io.write_parquet(schema.embeddings_table([f"r{start + i:07d}" for i in range(count)], x),
                     f"{folder}/emb/part-{part:05d}.parquet")
"""

RUN = r"""
import json, os, resource, sys, threading, time
import psutil, ray
from coincide_ray.config import ClusterConfig, JobConfig, SelectConfig
from coincide_ray.pipeline import run_select

n, layers, iterations, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
peaks, private, stop = {}, {}, threading.Event()

def watch():  # each shard worker's high-water mark, and its largest private (anonymous) memory seen
    me = psutil.Process()
    while not stop.is_set():
        for process in me.children(recursive=True):  # this Ray's workers, not another's on the machine
            try:
                if process.name().startswith("ray::ShardWorker"):
                    status = dict(line.split(":", 1) for line in open(f"/proc/{process.pid}/status").read().splitlines()
                                  if ":" in line)
                    hwm, anon = (int(status[key].split()[0]) / 1024 for key in ("VmHWM", "RssAnon"))
                    peaks[process.pid] = max(peaks.get(process.pid, 0.0), hwm)
                    private[process.pid] = max(private.get(process.pid, 0.0), anon)
            except (OSError, KeyError, psutil.Error):
                continue
        stop.wait(0.2)

ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
watcher = threading.Thread(target=watch, daemon=True)
watcher.start()
k = max(8, round(n / 66.5))
config = JobConfig(output=f"{folder}/out", embeddings=f"{folder}/emb", layers=tuple(range(layers)),
                   cluster=ClusterConfig(clusters=k, iterations=iterations), select=SelectConfig(fraction=0.2))
start = time.perf_counter()
from coincide_ray.cluster.stage import ShardWorker
idle = ShardWorker.remote([])  # the resident memory of a worker holding no rows (Python, Ray, torch, faiss)
idle_process = psutil.Process(ray.get(idle.__ray_call__.remote(lambda self: os.getpid())))
idle_mb = idle_process.memory_info().rss / 2**20
idle_private_mb = int(next(l for l in open(f"/proc/{idle_process.pid}/status") if l.startswith("RssAnon")).split()[1]) / 1024
ray.kill(idle)
time.sleep(0.5)
peaks.clear()
private.clear()
said = []
manifest = run_select(config, progress=said.append)
workers = next(int(m.split(" onto ")[1].split()[0]) for m in said if " onto " in m)  # "read ... onto N worker(s)"
total = time.perf_counter() - start
stop.set()
watcher.join()
print(json.dumps({"n": n, "k": k, "total": total, "timings": manifest["timings_s"],
                  "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "worker_peaks_mb": sorted(peaks.values()), "workers": workers, "worker_idle_mb": idle_mb,
                  "worker_private_mb": sorted(private.values()), "worker_idle_private_mb": idle_private_mb,
                  "selected": manifest["counts"]["selected"]}))
"""


def one_size(n: int, iterations: int) -> dict:
    folder = tempfile.mkdtemp(prefix="bench-d20k-")
    os.makedirs(f"{folder}/emb")
    try:
        subprocess.run([sys.executable, "-c", GENERATE, str(n), str(LAYERS), str(HIDDEN), str(PART_ROWS), folder],
                       check=True, capture_output=True, text=True)
        size = sum(os.path.getsize(f"{folder}/emb/{name}") for name in os.listdir(f"{folder}/emb"))
        out = subprocess.run([sys.executable, "-c", RUN, str(n), str(LAYERS), str(iterations), folder],
                             capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"select at N = {n} failed: {out.stderr.strip().splitlines()[-1:]}")
        return {**json.loads(out.stdout.strip().splitlines()[-1]), "file_bytes": size}
    finally:
        subprocess.run(["rm", "-rf", folder], check=False)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 3,000 only: a smoke run")
    parser.add_argument("--iterations", type=int, default=5)
    parser.add_argument("--rows", default="20000", help="sizes N to run, comma-separated (default 20000)")
    args = parser.parse_args()
    sizes = [3_000] if args.quick else [int(n) for n in args.rows.split(",")]
    print(json.dumps({"cpus": os.cpu_count(), "dimension": DIMENSION, "iterations": args.iterations,
                      "quick": args.quick}), flush=True)
    for n in sizes:
        r = one_size(n, args.iterations)
        k, workers = r["k"], r["workers"]
        tag = f"n{n // 1000}k_k{k}"
        for stage in ("read", "cluster", "select"):
            report(f"rd_{stage}_{tag}", r["timings"][stage], "s", r["total"], r["timings"][stage] / r["total"],
                   None, None, args.quick)
        centroids_mb = k * DIMENSION * 4 / MB
        driver_budget = 1536 + 2 * centroids_mb
        report(f"rd_driver_peak_rss_{tag}", r["driver_peak_mb"], "MB", driver_budget,
               r["driver_peak_mb"] / driver_budget, "<= 1.0", r["driver_peak_mb"] <= driver_budget, args.quick)
        share_mb = n * DIMENSION * 4 / MB / workers
        worker_budget = 1.3 * share_mb + k * DIMENSION * (4 + 8) / MB
        worst = max(r["worker_peaks_mb"] or [0.0])
        report(f"rd_worker_peak_rss_{tag}", worst, "MB", worker_budget, worst / worker_budget, "<= 1.0",
               worst <= worker_budget, args.quick)
        # The worker's own (anonymous) memory less an idle worker's (measured in the same run):
        # what its rows and steps cost, the part that grows with N. RSS also counts the object
        # store's shared pages the worker touched (centroids read, sums and scoring rows
        # written), which belong to the store's budget, and the fixed footprint of a process
        # with Python, Ray, torch and faiss loaded, which dominates at small N.
        grown = max(r["worker_private_mb"] or [0.0]) - r["worker_idle_private_mb"]
        report(f"rd_worker_private_over_idle_{tag}", grown, "MB", worker_budget, grown / worker_budget, "<= 1.0",
               grown <= worker_budget, args.quick)
        read_mb_s = r["file_bytes"] / MB / max(r["timings"]["read"], 1e-9) / workers
        report(f"rd_read_mb_per_s_per_worker_{tag}", read_mb_s, "MB/s", r["file_bytes"] / MB, 0.0, None, None,
               args.quick)
        per_iteration = r["timings"]["cluster"] / args.iterations
        flops = 2.0 * n * k * DIMENSION * (args.iterations + 1)
        report(f"rd_kmeans_s_per_iteration_{tag}", per_iteration, "s", flops / r["timings"]["cluster"] / 1e9,
               0.0, None, None, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
