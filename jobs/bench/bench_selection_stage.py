"""The select stage (k-means + scoring + fan-out) at growing N: time and memory per stage.

    python jobs/bench/bench_selection_stage.py           # 10k, 100k, 665k rows x 1,024 (BENCHMARKS.md)
    python jobs/bench/bench_selection_stage.py --quick   # 2k and 10k rows x 128: checks the script works

Synthetic embeddings with planted groups (coincide_ray.toy.synthetic, 4 layers x 128 hidden:
D = 1,024) are written as Parquet parts of 10,000 rows, then `run_select` runs on a local
Ray with every core, K = N / 665 (as LLaVA-665K at K = 1,000), few Lloyd iterations (the
k-means figure of record is jobs/bench/bench_kmeans.py). Each size runs in a fresh process, so
the driver's peak RSS belongs to that size alone. The baseline of each figure is the
smallest size's, scaled linearly to N: a ratio near 1 means linear growth.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from benchkit import report

CHILD = r"""
import json, os, resource, sys, time
import numpy as np, pyarrow.parquet as pq, ray
from coincide_ray import io, schema
from coincide_ray.config import ClusterConfig, JobConfig, SelectConfig
from coincide_ray.pipeline import run_select
from coincide_ray.toy.synthetic import planted_embeddings

n, layers, hidden, iterations, folder = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
part_rows = 10_000
for part, start in enumerate(range(0, n, part_rows)):
    rows = min(part_rows, n - start)
    x, _ = planted_embeddings(rows, num_layers=layers, hidden=hidden, groups=64, seed=part)
    pq.write_table(schema.embeddings_table([f"r{start + i}" for i in range(rows)], x),
                   f"{folder}/emb/part-{part:06d}.parquet")
ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
k = max(8, n // 665)
config = JobConfig(output=f"{folder}/out", embeddings=f"{folder}/emb", layers=tuple(range(layers)),
                   cluster=ClusterConfig(clusters=k, iterations=iterations), select=SelectConfig(fraction=0.2))
start = time.perf_counter()
manifest = run_select(config, progress=lambda m: None)
total = time.perf_counter() - start
print(json.dumps({"n": n, "k": k, "total": total, "timings": manifest["timings_s"],
                  "driver_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "selected": manifest["counts"]["selected"]}))
"""


def one_size(n: int, layers: int, hidden: int, iterations: int) -> dict:
    folder = tempfile.mkdtemp(prefix="bench-stage-")
    os.makedirs(f"{folder}/emb")
    out = subprocess.run([sys.executable, "-c", CHILD, str(n), str(layers), str(hidden), str(iterations), folder],
                         check=True, capture_output=True, text=True).stdout
    subprocess.run(["rm", "-rf", folder], check=False)
    return json.loads(out.strip().splitlines()[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--iterations", type=int, default=5)
    args = parser.parse_args()
    sizes = [2_000, 10_000] if args.quick else [10_000, 100_000, 665_000]
    layers, hidden = (2, 32) if args.quick else (4, 128)
    print(json.dumps({"cpus": os.cpu_count(), "dimension": 2 * layers * hidden, "iterations": args.iterations,
                      "quick": args.quick}), flush=True)
    first = None
    for n in sizes:
        result = one_size(n, layers, hidden, args.iterations)
        first = first or result
        scale = n / first["n"]
        for stage in ("read", "cluster", "select"):
            value, base = result["timings"][stage], first["timings"][stage] * scale
            report(f"stage_{stage}_n{n // 1000}k_k{result['k']}", value, "s", base, value / base if base else 0.0,
                   None, None, args.quick)
        report(f"stage_total_n{n // 1000}k", result["total"], "s", first["total"] * scale,
               result["total"] / (first["total"] * scale), None, None, args.quick)
        report(f"stage_driver_peak_rss_n{n // 1000}k", result["driver_peak_mb"], "MB", first["driver_peak_mb"],
               result["driver_peak_mb"] / first["driver_peak_mb"], None, None, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
