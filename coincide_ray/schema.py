"""Column names and Parquet schemas of every contract file (DESIGN.md, Output layout)."""

from __future__ import annotations

import pyarrow as pa

SAMPLE_ID = "sample_id"
EMBEDDING = "embedding"
CLUSTER = "cluster"
COSINE = "cosine"
RANK = "rank"
SELECTED = "selected"
STAGE = "stage"
REASON = "reason"  # a short category, e.g. "duplicate sample_id"
DETAIL = "detail"  # what exactly was wrong, e.g. where the first copy was

ASSIGNMENTS = pa.schema([(SAMPLE_ID, pa.string()), (CLUSTER, pa.int64()), (COSINE, pa.float32())])
SUMMARY = pa.schema(
    [
        (CLUSTER, pa.int64()),
        ("size", pa.int64()),
        ("transferability", pa.float64()),
        ("density", pa.float64()),
        ("score", pa.float64()),
        ("quota", pa.int64()),
    ]
)
# rank is null where a giant cluster was ranked only up to its quota.
SELECTION = pa.schema([(SAMPLE_ID, pa.string()), (CLUSTER, pa.int64()), (RANK, pa.int64()), (SELECTED, pa.bool_())])
STRATEGY_SELECTION = pa.schema([(SAMPLE_ID, pa.string()), (CLUSTER, pa.int64()), (SELECTED, pa.bool_())])
REJECTED = pa.schema([(SAMPLE_ID, pa.string()), (STAGE, pa.string()), (REASON, pa.string()), (DETAIL, pa.string())])

# an optional model input beside the processor's: attended tokens to skip on text-only rows
LANGUAGE_START = "language_start"

IMAGE_TOKENS = "image_tokens"
TEXT_TOKENS = "text_tokens"
# sha256 of what determines a record's vector: model, layers, conversations, image bytes
FINGERPRINT = "fingerprint"

# One file per input block: every record of the block, in block order. Rejected records
# have a null embedding and say why in stage/reason/detail, so a block's accounting is one
# atomic file. Vectors are float16 (the default, as the paper's authors store them) or float32.
VECTOR_TYPES = {"float16": pa.float16(), "float32": pa.float32()}


def embeddings_schema(vector_dtype: str = "float32") -> pa.Schema:
    return pa.schema(
        [
            (SAMPLE_ID, pa.string()),
            (EMBEDDING, pa.list_(VECTOR_TYPES[vector_dtype])),
            (IMAGE_TOKENS, pa.int32()),
            (TEXT_TOKENS, pa.int32()),
            (FINGERPRINT, pa.string()),
            (STAGE, pa.string()),
            (REASON, pa.string()),
            (DETAIL, pa.string()),
        ]
    )


EMBEDDINGS = embeddings_schema()

# Paths under --output.
EMBEDDINGS_DIR = "embeddings"
PROVENANCE_PATH = "embeddings/_provenance.json"
EMBEDDINGS_DONE_PATH = "embeddings/_SUCCESS"
CENTROIDS_PATH = "clusters/centroids.npy"
ASSIGNMENTS_PATH = "clusters/assignments.parquet"
SUMMARY_PATH = "clusters/summary.parquet"
SELECTION_PATH = "selection/selection.parquet"
REJECTED_PATH = "selection/rejected.parquet"
SELECTED_RECORDS_PATH = "selection/selected.json"
DIFF_PATH = "selection/diff.json"


def strategy_paths(strategy: str) -> tuple[str, str]:
    """(selection table, selected records) of an alternative strategy (select.strategies)."""
    return f"selection/{strategy}/selection.parquet", f"selection/{strategy}/selected.json"


MANIFEST_PATH = "manifest.json"
# Written before a run's first write into its output, removed after its manifest: a folder
# that holds it is mid-update (a run stopped there), whatever else it holds.
IN_PROGRESS_PATH = "_IN_PROGRESS.json"
REPORT_PATH = "report.html"


class SchemaError(ValueError):
    """An input file lacks a column the stage needs."""


def require_columns(schema: pa.Schema, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in schema.names]
    if missing:
        raise SchemaError(f"{where} lacks column(s) {', '.join(missing)}; it has {', '.join(schema.names)}")


def embeddings_table(ids: list[str], vectors, extra: dict | None = None) -> pa.Table:
    """An embeddings table per the contract: sample_id, embedding (list<float32>), extras."""
    import numpy as np

    vectors = np.asarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    column = pa.ListArray.from_arrays(pa.array(np.arange(0, n * dim + 1, dim, dtype=np.int32)), flat)
    return pa.table({SAMPLE_ID: pa.array(ids, pa.string()), EMBEDDING: column, **(extra or {})})
