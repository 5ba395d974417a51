"""`make demo`: the selection job on an embedded default, on this machine.

Until the embedding stage lands, the demo generates sample vectors with planted
concept-skill groups (shaped like DESIGN.md step 1 output, including text-only rows and a
few broken rows) and runs clustering + selection on them.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from coincide_ray import io, schema
from coincide_ray.config import ClusterConfig, JobConfig, SelectConfig
from coincide_ray.pipeline import run_select
from coincide_ray.synthetic import planted_embeddings


def make_embeddings(folder: Path, n: int, groups: int, seed: int) -> str:
    vectors, labels = planted_embeddings(n, num_layers=5, hidden=32, groups=groups, noise=0.7, seed=seed)
    ids = [f"demo-{i:06d}" for i in range(n)]
    vectors[7, 3] = np.nan  # broken rows: the job rejects them with a reason
    ids[11] = ids[10]
    folder.mkdir(parents=True, exist_ok=True)
    half = n // 2
    for part, rows in enumerate([slice(0, half), slice(half, n)]):
        table = schema.embeddings_table(ids[rows], vectors[rows], {"group": labels[rows]})
        pq.write_table(table, folder / f"part-{part:05d}.parquet")
    return str(folder)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="folder for the run (default demo-output)")
    parser.add_argument("--records", type=int, default=4000)
    args = parser.parse_args()
    output = Path(args.output).resolve()
    start = time.perf_counter()
    embeddings = make_embeddings(output / "input-embeddings", args.records, groups=12, seed=0)
    config = JobConfig(
        output=str(output),
        embeddings=embeddings,
        layers=(3, 7, 11, 15, 19),
        cluster=ClusterConfig(clusters=24, iterations=20),
        select=SelectConfig(fraction=0.2),
    )
    manifest = run_select(config)
    counts = manifest["counts"]
    print(f"\ncoincide-ray demo finished in {time.perf_counter() - start:.1f}s")
    print(f"  records {counts['records']}, rejected {counts['rejected']}, selected {counts['selected']}")
    print(f"  rejected by reason: {manifest['health']['rejected_by_reason']}")
    print(f"  outputs: {output}")
    for name, path in manifest["paths"].items():
        print(f"    {name:12s} {path}")
    print(f"    {'manifest':12s} {io.join(str(output), schema.MANIFEST_PATH)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
