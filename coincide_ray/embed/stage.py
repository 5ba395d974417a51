"""The embedding stage on Ray Data: records -> CPU preparation -> model actors -> Parquet.

Each Ray Data row is one input block: `embed.block_records` consecutive records in
canonical order, so block i always holds the same records whatever the cluster looks like.
A pool of CPU workers prepares blocks (images fetched by key and decoded, chat template
rendered, tokenised); a pool of model actors (one GPU each where there are GPUs) runs
extract_msa_embeddings; a writer publishes embeddings/part-<block>.parquet atomically.
Blocks whose file exists are skipped, so a rerun only does what is missing.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import ray

from coincide_ray import io, schema
from coincide_ray.config import EmbedConfig, JobConfig
from coincide_ray.embed import model as model_io
from coincide_ray.embed.msa import default_layers, extract_msa_embeddings
from coincide_ray.embed.preprocess import STAGE, PreparedBlock, Preprocessor
from coincide_ray.embed.reuse import PreviousVectors, fetch_vectors, run_salt
from coincide_ray.manifest import library_versions
from coincide_ray.records import Record, Rejection, parse_record, read_raw_records


def part_name(block: int) -> str:
    return f"part-{block:06d}.parquet"


def plan_blocks(input_uri: str, block_records: int) -> list[list[Record | Rejection]]:
    """Every input record, parsed and checked, cut into blocks in canonical order.
    Later copies of an id are rejected here, where every id is seen."""
    items: list[Record | Rejection] = []
    first: dict[str, str] = {}
    for position, raw in read_raw_records(input_uri):
        item = parse_record(raw, position)
        if isinstance(item, Record):
            if item.id in first:
                item = Rejection(item.id, "read", "duplicate id", f"{position}; first at {first[item.id]}")
            else:
                first[item.id] = position
        items.append(item)
    return [items[start : start + block_records] for start in range(0, len(items), block_records)]


class PrepareWorker:
    """Ray Data UDF (CPU actor): a block's records -> model-ready batches."""

    def __init__(self, model_uri: str, embed: EmbedConfig, image_root: str | None, salt: str, previous):
        from transformers import AutoProcessor

        folder = model_io.local_copy(model_uri, embed.model_cache)
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=embed.trust_remote_code)
        if isinstance(previous, ray.ObjectRef):
            previous = ray.get(previous)
        self.preprocessor = Preprocessor(processor, image_root=image_root, batch_size=embed.batch_size,
                                         max_image_pixels=embed.max_image_pixels, salt=salt, previous=previous,
                                         max_tokens=model_io.context_length(folder, embed.trust_remote_code))

    def __call__(self, row: dict) -> dict:
        return {"block": row["block"], "prepared": self.preprocessor.prepare(row["block"], row["items"])}


class ModelWorker:
    """Ray Data UDF (GPU actor, or CPU where there is none): batches -> pooled vectors."""

    def __init__(self, model_uri: str, embed: EmbedConfig, layers: tuple[int, ...], threads: int):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.loaded = model_io.load_model(model_uri, embed)
        self.layers = layers

    def embed(self, inputs: dict) -> np.ndarray:
        return extract_msa_embeddings(self.loaded.model, inputs, self.layers)

    def __call__(self, row: dict) -> dict:
        prepared: PreparedBlock = row["prepared"]
        n = len(prepared.ids)
        result = EmbeddedBlock(prepared.block, prepared.ids, [None] * n, np.zeros(n, np.int32),
                               np.zeros(n, np.int32), prepared.rejected, prepared.fingerprints, prepared.reused,
                               prepared.truncated)
        token = getattr(self.loaded.model.config, "image_token_id", None)
        for batch in prepared.batches:
            try:
                out = self.embed(batch.inputs)
            except Exception:  # a batch the model rejects: retry its rows one by one
                out = None
            for k, position in enumerate(batch.positions):
                if out is not None:
                    result.vectors[position] = out[k]
                else:
                    single = {key: value[k : k + 1] for key, value in batch.inputs.items()
                              if getattr(value, "shape", ())[:1] == (len(batch.positions),)}
                    try:
                        result.vectors[position] = self.embed(single)[0]
                    except Exception as error:
                        failure = f"{type(error).__name__}: {str(error)[:300]}"
                        result.rejected[position] = Rejection(prepared.ids[position], STAGE, "model failed", failure)
                        continue
                ids = batch.inputs["input_ids"][k]
                attended = batch.inputs["attention_mask"][k].astype(bool)
                result.image_tokens[position] = int(((ids == token) & attended).sum())
                result.text_tokens[position] = int(attended.sum()) - result.image_tokens[position]
        # A dataclass travels between Ray Data operators as an opaque object; plain dicts of
        # arrays would be converted to Arrow lists on the way.
        return {"block": prepared.block, "result": result}


@dataclass
class EmbeddedBlock:
    block: int
    ids: list[str]  # every record of the block, in block order
    vectors: list[np.ndarray | None]
    image_tokens: np.ndarray
    text_tokens: np.ndarray
    rejected: dict[int, Rejection]  # position -> why
    fingerprints: dict[int, str]  # position -> record fingerprint
    reused: dict[int, tuple[str, int]]  # position -> (earlier run's part file, row): filled by write_block
    truncated: list[int]  # positions cut to the model's context

    def table(self) -> pa.Table:
        """Every record of the block, in block order; rejected ones with a null embedding."""
        n = len(self.ids)
        vectors = [None if p in self.rejected or self.vectors[p] is None else self.vectors[p].tolist()
                   for p in range(n)]
        fingerprints = [self.fingerprints.get(p) if vectors[p] is not None else None for p in range(n)]

        def why(field: str) -> list:
            return [getattr(self.rejected[p], field) if p in self.rejected else None for p in range(n)]

        return pa.table({
            schema.SAMPLE_ID: self.ids, schema.EMBEDDING: vectors,
            schema.IMAGE_TOKENS: self.image_tokens, schema.TEXT_TOKENS: self.text_tokens,
            schema.FINGERPRINT: fingerprints, schema.STAGE: why("stage"), schema.REASON: why("reason"), schema.DETAIL: why("detail"),
        }, schema=schema.EMBEDDINGS)


_COUNTERS: dict = {}


def count(name: str, value: int, reason: str | None = None) -> None:
    """Add to a counter exported through Ray's metrics API (the dashboard, and Prometheus
    scraping the cluster): coincide_records_<name>{reason=...}."""
    if value <= 0:
        return
    from ray.util.metrics import Counter as RayCounter

    if name not in _COUNTERS:
        _COUNTERS[name] = RayCounter(f"coincide_records_{name}", description=f"records {name} by coincide-ray",
                                     tag_keys=("reason",))
    _COUNTERS[name].inc(value, tags={"reason": reason or ""})


def progress_bar(done: int, total: int, width: int = 24) -> str:
    filled = int(width * done / max(total, 1))
    return "[" + "#" * filled + "-" * (width - filled) + f"] {done}/{total}"


def write_block(row: dict, output: str) -> dict:
    """Publish one block's file; returns the counts the driver shows and totals."""
    result: EmbeddedBlock = row["result"]
    for position, (vector, image, text) in fetch_vectors(result.reused).items():
        result.vectors[position] = vector
        result.image_tokens[position], result.text_tokens[position] = image, text
    io.write_parquet(result.table(), io.join(output, schema.EMBEDDINGS_DIR, part_name(result.block)))
    reasons = Counter(r.reason for r in result.rejected.values())
    count("read", len(result.ids))
    count("reused", len(result.reused))
    count("embedded", len(result.ids) - len(result.rejected) - len(result.reused))
    for reason, n in reasons.items():
        count("rejected", n, reason)
    return {"block": result.block, "records": len(result.ids), "rejected": sum(reasons.values()),
            "reused": len(result.reused), "truncated": len(result.truncated), "reasons": json.dumps(dict(sorted(reasons.items())))}


@dataclass
class EmbedResult:
    blocks: int
    reused_blocks: int
    records: int
    embedded: int  # records embedded by the model in this run
    reused: int  # records whose vector was copied from config.previous
    truncated: int  # records cut to the model's context
    seconds: float


def resolve_layers(config: JobConfig) -> tuple[JobConfig, int]:
    """The config with its layers decided (default_layers of the decoder's depth when none
    were given), and the decoder's hidden size."""
    from transformers import AutoConfig

    hf = AutoConfig.from_pretrained(model_io.local_copy(config.model, config.embed.model_cache),
                                    trust_remote_code=config.embed.trust_remote_code)
    text = hf.get_text_config()
    depth, hidden = int(text.num_hidden_layers), int(text.hidden_size)
    layers = config.layers if config.layers is not None else default_layers(depth)
    if max(layers) >= depth:
        raise model_io.ModelError(f"layers {list(layers)} out of range: {config.model} has {depth} decoder layers")
    return dataclasses.replace(config, layers=tuple(layers)), hidden


def provenance(config: JobConfig, hidden: int) -> dict:
    return {
        "model": config.model, "model_fingerprint": model_io.fingerprint(config.model),
        "layers": list(config.layers), "hidden": hidden, "dimension": 2 * len(config.layers) * hidden,
        "dtype": "float32", "block_records": config.embed.block_records, "versions": library_versions(),
    }


def check_provenance(config: JobConfig, hidden: int, output: str) -> dict:
    """Write embeddings/_provenance.json, or check that existing shards came from the same
    model, layers and blocking (reusing them otherwise would mix incompatible vectors)."""
    wanted = provenance(config, hidden)
    path = io.join(output, schema.PROVENANCE_PATH)
    if io.exists(path):
        found = io.read_json(path)
        keys = ("model_fingerprint", "layers", "dimension", "block_records")
        changed = [k for k in keys if found.get(k) != wanted[k]]
        if changed:
            raise model_io.ModelError(f"{output}/embeddings was made with other {', '.join(changed)}; "
                                      "write to a new --output")
        return found
    io.write_json(wanted, path)
    return wanted


@dataclass(frozen=True)
class Pool:
    actors: int  # model actors
    gpus: float  # GPUs per model actor
    threads: int  # torch threads per model actor (0: leave torch's default)
    preparers: int  # CPU workers preparing blocks


def plan_pool(embed: EmbedConfig) -> Pool:
    """One model actor per GPU; without GPUs one CPU actor whose torch threads use every
    core (the forward pass dominates, preparation only needs a share of a core)."""
    resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), int(resources.get("CPU", 1))
    actors = embed.actors or max(1, gpus)
    if gpus:
        pool = Pool(actors, 1.0, 0, max(1, cpus - 1))
    else:
        pool = Pool(actors, 0.0, max(1, cpus // actors), max(1, cpus - actors))
    if embed.prepare_workers:
        pool = Pool(pool.actors, pool.gpus, pool.threads, embed.prepare_workers)
    return pool


def run_embed(config: JobConfig, progress=print) -> EmbedResult:
    """Embed every record under config.input into config.output/embeddings."""
    for key in ("input", "model"):
        if not getattr(config, key):
            raise model_io.ModelError(f"the embed stage needs --{key}")
    start = time.perf_counter()
    out = config.output
    config, hidden = resolve_layers(config)
    made = check_provenance(config, hidden, out)
    salt = run_salt(made["model_fingerprint"], config.layers)
    progress(f"embed: model {config.model}, layers {list(config.layers)}, dimension {2 * len(config.layers) * hidden}")
    blocks = plan_blocks(config.input, config.embed.block_records)
    records = sum(len(b) for b in blocks)
    done = set()
    try:
        done = {os.path.basename(p) for p in io.list_files(io.join(out, schema.EMBEDDINGS_DIR), (".parquet",))}
    except FileNotFoundError:  # no block written yet
        pass
    pending = [i for i in range(len(blocks)) if part_name(i) not in done]
    progress(f"embed: {records} records in {len(blocks)} blocks; {len(blocks) - len(pending)} blocks already done")
    embedded = reused = truncated = 0
    if pending:
        previous = None
        if config.previous:
            previous = PreviousVectors.of_run(config.previous)
            progress(f"embed: {len(previous)} vectors of {config.previous} can be reused by fingerprint")
            previous = ray.put(previous)  # sent once to every CPU worker
        pool = plan_pool(config.embed)
        ds = ray.data.from_items([{"block": i, "items": blocks[i]} for i in pending], override_num_blocks=len(pending))
        ds = ds.map(PrepareWorker, fn_constructor_args=(config.model, config.embed, config.image_root, salt, previous),
                    concurrency=pool.preparers, num_cpus=1)
        ds = ds.map(ModelWorker, fn_constructor_args=(config.model, config.embed, config.layers, pool.threads),
                    concurrency=pool.actors, num_gpus=pool.gpus, num_cpus=0 if pool.gpus else 1)
        ds = ds.map(write_block, fn_kwargs={"output": out}, num_cpus=0.25)
        began = time.perf_counter()
        for finished, summary in enumerate(ds.iter_rows(), start=1):
            embedded += summary["records"] - summary["rejected"] - summary["reused"]
            reused += summary["reused"]
            truncated += summary["truncated"]
            elapsed = time.perf_counter() - began
            left = (len(pending) - finished) * elapsed / finished  # blocks are the same size
            progress(f"embed {progress_bar(finished, len(pending))} blocks, {embedded / max(elapsed, 1e-9):.1f} "
                     f"samples/s, ~{left:.0f}s left; "
                     f"block {summary['block']} written: reused {summary['reused']}, rejected {summary['rejected']} "
                     f"{summary['reasons'] if summary['rejected'] else ''}".rstrip())
    listing = sorted(part_name(i) for i in range(len(blocks)))
    io.write_json({"parts": listing, "records": records}, io.join(out, schema.EMBEDDINGS_DONE_PATH))
    return EmbedResult(len(blocks), len(blocks) - len(pending), records, embedded, reused, truncated,
                       time.perf_counter() - start)
