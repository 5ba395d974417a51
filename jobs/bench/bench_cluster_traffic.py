"""Bytes the driver receives per Lloyd iteration, on 1 and 4 simulated nodes.

    python jobs/bench/bench_cluster_traffic.py            # N = 4,000, D = 1,024, K = 100, nodes of 2 CPUs
    python jobs/bench/bench_cluster_traffic.py --quick    # smaller: checks the script works (tests)

Each size runs in a process of its own on Ray's multi-node simulator (ray.cluster_utils.Cluster:
one raylet per simulated node on this machine), with one shard worker per node, and reads the
driver's received bytes per iteration from the run's own account (ShardSet.plan). The baseline
is one (K, D) int64 matrix plus the counts: the target is the driver receiving that, whatever the
number of nodes (the partial sums are added pairwise on the workers). Shown beside it: what the
earlier plan (one shard worker per CPU, each returning its own sums to the driver) would have
sent on the same cluster.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from benchkit import report

RUN = r"""
import json, sys
import ray
from ray.cluster_utils import Cluster
from coincide_ray import io, schema
from coincide_ray.cluster.stage import ShardSet
from coincide_ray.toy.synthetic import planted_embeddings

nodes, cpus, n, dim, k, folder = map(str, sys.argv[1:7])
nodes, cpus, n, dim, k = int(nodes), int(cpus), int(n), int(dim), int(k)
x, _ = planted_embeddings(n, num_layers=1, hidden=dim // 2, groups=20, noise=1.0, seed=0)
for part in range(8):  # enough files for every node's worker
    rows = slice(part * n // 8, (part + 1) * n // 8)
    io.write_parquet(schema.embeddings_table([f"r{i:06d}" for i in range(rows.start, rows.stop)], x[rows]),
                     f"{folder}/part-{part:05d}.parquet")
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": cpus, "include_dashboard": False})
for _ in range(nodes - 1):
    cluster.add_node(num_cpus=cpus)
ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
shards = ShardSet.load(folder)
try:
    shards.kmeans(k, iterations=3, seed=1)
    plan = shards.plan()
finally:
    shards.close()
    ray.shutdown()
    cluster.shutdown()
print(json.dumps(plan))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n, dim, k, cpus = (800, 64, 10, 2) if args.quick else (4_000, 1_024, 100, 2)
    one_matrix = k * dim * 8 + k * 8
    for nodes in (1, 4):
        with tempfile.TemporaryDirectory(prefix="bench-traffic-") as folder:
            out = subprocess.run([sys.executable, "-c", RUN, str(nodes), str(cpus), str(n), str(dim), str(k), folder],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode:
                raise SystemExit(f"{nodes} node(s) failed: {out.stderr.strip().splitlines()[-1:]}")
            plan = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
        received = plan["driver_bytes_per_iteration"]
        report(f"driver_bytes_per_iteration_{nodes}_nodes", received / 2**20, "MB", one_matrix / 2**20,
               received / one_matrix, "<= 1.0", received <= one_matrix, args.quick)
        report(f"driver_bytes_one_worker_per_cpu_{nodes}_nodes", nodes * cpus * one_matrix / 2**20, "MB",
               one_matrix / 2**20, nodes * cpus, None, None, args.quick)
        if plan["shard_workers"] != nodes or len(plan["nodes"]) != nodes:
            raise SystemExit(f"expected one shard worker on each of {nodes} node(s), got {plan}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
