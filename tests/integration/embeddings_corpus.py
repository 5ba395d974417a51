"""Embeddings files for the select-side tests: planted groups plus a few bad rows."""

import numpy as np
import pyarrow as pa

from coincide_ray import io, schema
from coincide_ray.toy.synthetic import planted_embeddings


def write_corpus(base, n=600):
    """Two embeddings files with planted groups and three bad rows.

    Returns (uri, vectors, ids, accepted rows in canonical order, bad rows with reasons)."""
    vectors, _ = planted_embeddings(n, num_layers=2, hidden=8, groups=6, seed=1)
    ids = [f"s{i:04d}" for i in range(n)]
    half = n // 2
    bad = {
        5: ("embedding holds NaN or inf", None),
        9: ("duplicate sample_id", None),
        n - 5: ("wrong embedding dimension", None),
    }
    vectors_list = [v for v in vectors]
    vectors_list[5] = vectors[5].copy()
    vectors_list[5][0] = np.nan
    ids[9] = ids[8]
    vectors_list[n - 5] = vectors[n - 5][:-1]
    for part, rows in enumerate([range(0, half), range(half, n)]):
        emb = pa.array([vectors_list[r].tolist() for r in rows], pa.list_(pa.float32()))
        table = pa.table({schema.SAMPLE_ID: [ids[r] for r in rows], schema.EMBEDDING: emb})
        # the second file is named so that string order != creation order
        io.write_parquet(table, io.join(base, "emb", f"part-{['b', 'a'][part]}.parquet"))
    good = [r for r in range(n) if r not in bad]
    order = list(range(half, n)) + list(range(half))  # part-a (the second half) sorts first
    return io.join(base, "emb"), vectors, ids, [r for r in order if r in good], bad
