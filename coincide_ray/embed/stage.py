"""The embedding stage on Ray Data: records -> CPU preparation -> model actors -> Parquet.

Each Ray Data row is one input block: `embed.block_records` consecutive records in
canonical order, so block i always holds the same records whatever the cluster looks like.
CPU tasks prepare blocks (images fetched by key and decoded, chat template rendered,
tokenised); a pool of model actors (one GPU each where there are GPUs) runs
extract_msa_embeddings and publishes embeddings/part-<block>.parquet atomically as soon as
each block is done.
A block whose file exists is reused only when the file reads back whole and names the same
records with the same fingerprints (ids, content, image bytes, model, layers): a light CPU
pass checks that before any model actor starts, so a rerun redoes exactly what changed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from coincide_ray import io, schema
from coincide_ray.corpus import shards
from coincide_ray.corpus import stage as corpus_stage
from coincide_ray.config import EmbedConfig, JobConfig
from coincide_ray.embed import model as model_io
from coincide_ray.embed.preprocess import (STAGE, PreparedBlock, Preprocessor, block_signature, decode_image,
                                           fetch_image, fingerprint_block, rejection)
from coincide_ray.embed.reuse import PreviousVectors, fetch_vectors, run_salt
from coincide_ray.holds import hold, hold_point, release_file
from coincide_ray.manifest import library_versions, mark_in_progress
from coincide_ray.records import Record, RecordProblem, Rejection, accepted_records


MODEL_FAILED = "model failed"  # the one rejection that can pass (a GPU out of memory): never reused


def part_name(block: int) -> str:
    return f"part-{block:06d}.parquet"


def plan_blocks(input_uri: str, block_records: int) -> list[list[Record | Rejection]]:
    """Every input record, parsed and checked, cut into blocks in canonical order, in this
    process: for tools over small inputs (gpu_check, benchmarks). The job itself never holds
    the records (coincide_ray.shards)."""
    items = [item for _, _, item in accepted_records(input_uri)]
    return [items[start : start + block_records] for start in range(0, len(items), block_records)]


def prepare_block(row: dict, model_uri: str, embed: EmbedConfig, image_root: str | None, salt: str,
                  previous: ray.ObjectRef | None, publish: Publish) -> dict:
    """Ray Data UDF (a CPU task): a block's records -> model-ready batches."""
    if publish.hold_prepare is not None and row["block"] >= publish.hold_prepare:
        hold(f"preparer holds block {row['block']}", publish.release)
    preprocessor = _preprocessor(model_uri, embed, image_root, salt, previous)
    prepared = preprocessor.prepare(row["block"], shards.read_block(row))
    return {"block": row["block"], "prepared": prepared.to_bytes()}


_kept_preprocessor: dict[tuple, Preprocessor] = {}  # this worker process's latest, by what it was built from


def _preprocessor(model_uri: str, embed: EmbedConfig, image_root: str | None, salt: str,
                  previous: ray.ObjectRef | None) -> Preprocessor:
    """The run's Preprocessor, built once per worker process. Preparing runs in Ray tasks, not
    actors: a task's worker process lives on after the task, so the next block, and the next
    run on the same Ray, find transformers imported and the processor loaded (some 5 CPU-s an
    actor would pay again for every run). The salt names the model's content, so a model changed
    at the same path builds a new one; only the latest is kept."""
    key = (model_uri, embed, image_root, salt, previous.hex() if previous is not None else None)
    if key not in _kept_preprocessor:
        _kept_preprocessor.clear()
        folder = model_io.local_copy(model_uri, embed.model_cache)
        processor = model_io.load_processor(model_uri, embed)
        _kept_preprocessor[key] = Preprocessor(processor, image_root=image_root, batch_size=embed.batch_size,
                                               batch_tokens=embed.batch_tokens,
                                               max_image_pixels=embed.max_image_pixels, salt=salt,
                                               previous=ray.get(previous) if previous is not None else None,
                                               **model_io.preprocessing(folder, embed.trust_remote_code))
    return _kept_preprocessor[key]


@dataclass(frozen=True)
class Publish:
    """Where a model actor publishes its blocks. `hold_prepare`, `hold_model` and
    `hold_block` (tests only, coincide_ray.holds): blocks numbered from there on wait before
    they are prepared, before the model runs, or instead of being published, for ever or
    until the `release` file exists."""

    output: str
    vector_dtype: str = "float32"
    hold_model: int | None = None
    hold_block: int | None = None
    release: str | None = None
    hold_prepare: int | None = None


class ModelWorker:
    """Ray Data UDF (GPU actor, or CPU where there is none): a prepared block -> pooled
    vectors -> its part file. The actor publishes the file itself, so a block is on storage
    as soon as its vectors are, whatever CPUs the other pools hold, and the vectors never
    travel through the object store."""

    def __init__(self, model_uri: str, embed: EmbedConfig, layers: tuple[int, ...], threads: int,
                 publish: Publish | None = None):  # None: embed_block only (no part files)
        import torch

        self.publish = publish
        if threads:
            torch.set_num_threads(threads)
        self.loaded = model_io.load_model(model_uri, embed)
        self.layers = layers

    def embed(self, inputs: dict) -> np.ndarray:
        from coincide_ray.embed.msa import extract_msa_embeddings  # torch: model actors only

        return extract_msa_embeddings(self.loaded.model, inputs, self.layers)

    def embed_block(self, prepared: PreparedBlock) -> "EmbeddedBlock":
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
                        result.rejected[position] = Rejection(prepared.ids[position], STAGE, MODEL_FAILED, failure)
                        continue
                ids = batch.inputs["input_ids"][k]
                attended = batch.inputs["attention_mask"][k].astype(bool)
                result.image_tokens[position] = int(((ids == token) & attended).sum())
                result.text_tokens[position] = int(attended.sum()) - result.image_tokens[position]
        return result

    def __call__(self, row: dict) -> dict:
        prepared = PreparedBlock.from_bytes(row["prepared"])
        publish = self.publish
        if publish.hold_model is not None and prepared.block >= publish.hold_model:
            hold(f"model actor holds block {prepared.block}", publish.release)
        return write_block(self.embed_block(prepared), publish)


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

    def table(self, vector_dtype: str = "float32") -> pa.Table:
        """Every record of the block, in block order; rejected ones with a null embedding.
        Every record that was fingerprinted keeps its fingerprint, rejected or not: a rerun
        compares them to decide whether the block can be reused."""
        n = len(self.ids)
        present = [p not in self.rejected and self.vectors[p] is not None for p in range(n)]

        def why(field: str) -> list:
            return [getattr(self.rejected[p], field) if p in self.rejected else None for p in range(n)]

        return pa.table({
            schema.SAMPLE_ID: self.ids, schema.EMBEDDING: vector_column(self.vectors, present, vector_dtype),
            schema.IMAGE_TOKENS: self.image_tokens, schema.TEXT_TOKENS: self.text_tokens,
            schema.FINGERPRINT: [self.fingerprints.get(p) for p in range(n)],
            schema.STAGE: why("stage"), schema.REASON: why("reason"), schema.DETAIL: why("detail"),
        }, schema=schema.embeddings_schema(vector_dtype))

    def reject_outside_float16(self) -> None:
        """A vector with a value beyond float16's range would be stored as inf: reject the
        record with the reason (float32 storage keeps it)."""
        for position, vector in enumerate(self.vectors):
            if vector is not None and position not in self.rejected and np.abs(vector).max(initial=0) > FLOAT16_MAX:
                self.rejected[position] = Rejection(self.ids[position], STAGE, "vector outside float16 range",
                                                    f"largest value {np.abs(vector).max():.4g}; set "
                                                    "embed.vector_dtype: float32 to keep it")


FLOAT16_MAX = float(np.finfo(np.float16).max)


def vector_column(vectors: list, present: list[bool], vector_dtype: str = "float32") -> pa.Array:
    """list<float16 or float32> with a null where a record has no vector, built from one flat
    buffer: no Python float object per value (D = 20,480 makes 1.3 million per block)."""
    rows = [np.asarray(vectors[p], np.float32) for p in range(len(present)) if present[p]]
    flat = (np.concatenate(rows) if rows else np.zeros(0, np.float32)).astype(vector_dtype, copy=False)
    lengths = np.array([len(vectors[p]) if present[p] else 0 for p in range(len(present))], np.int32)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    mask = pa.array([not p for p in present], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, schema.VECTOR_TYPES[vector_dtype]), mask=mask)


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


def write_block(result: "EmbeddedBlock", publish: Publish) -> dict:
    """Publish one block's file; returns the counts the driver shows and totals."""
    if publish.hold_block is not None and result.block >= publish.hold_block:
        hold(f"block {result.block} not published", publish.release)
    for position, (vector, image, text) in fetch_vectors(result.reused).items():
        result.vectors[position] = vector
        result.image_tokens[position], result.text_tokens[position] = image, text
    if publish.vector_dtype == "float16":
        result.reject_outside_float16()
    io.write_parquet(result.table(publish.vector_dtype),
                     io.join(publish.output, schema.EMBEDDINGS_DIR, part_name(result.block)))
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
    reused_here: int  # records of blocks this output already held, unchanged (an earlier attempt's)
    reused_previous: int  # records whose vector was copied from config.previous
    truncated: int  # records cut to the model's context
    seconds: float
    resources: dict | None = None  # the pool that ran (None when every block was reused)


def resolve_layers(config: JobConfig) -> tuple[JobConfig, int]:
    """The config with its layers decided (default_layers of the decoder's depth when none
    were given), and the decoder's hidden size."""
    from transformers import AutoConfig

    from coincide_ray.embed.msa import default_layers

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
        "layers": list(config.layers), "max_image_pixels": config.embed.max_image_pixels,
        "hidden": hidden, "dimension": 2 * len(config.layers) * hidden,
        "dtype": config.embed.vector_dtype, "block_records": config.embed.block_records, "versions": library_versions(),
        # a converted checkpoint's recipe (coincide_recipe.json: tokens dropped, context, tower)
        "recipe": model_io.recipe(str(model_io.local_copy(config.model, config.embed.model_cache))),
    }


def check_provenance(config: JobConfig, hidden: int, output: str) -> dict:
    """Write embeddings/_provenance.json, or check that existing shards came from the same
    model, layers and blocking (reusing them otherwise would mix incompatible vectors)."""
    wanted = provenance(config, hidden)
    path = io.join(output, schema.PROVENANCE_PATH)
    if io.exists(path) and part_files(output):  # a provenance with no block written pins nothing
        found = io.read_json(path)
        keys = ("model_fingerprint", "layers", "dimension", "dtype", "block_records")
        changed = [k for k in keys if found.get(k) != wanted[k]]
        if changed:
            raise model_io.ModelError(f"{output}/embeddings was made with other {', '.join(changed)}; "
                                      "write to a new --output")
        return found
    io.write_json(wanted, path)
    return wanted


# What the Ray cluster has, what its autoscaler could add, and waiting for what the pool asks:
# the pool is planned from what it asks for, never only from what happens to be up at the
# first second (on an autoscaling cluster GPU nodes start from zero and join minutes later).

WAIT_MESSAGE_EVERY_S = 10.0
POLL_S = 0.5


class ResourcesUnavailable(RuntimeError):
    """The cluster did not offer what the run asked for within its wait."""


def present() -> dict[str, float]:
    """Resources of the nodes alive now."""
    return dict(ray.cluster_resources())


def reachable() -> dict[str, float]:
    """The most of each resource the cluster could have: what is up now, or what its
    autoscaler's node types add up to when that is more (sys.maxsize: no limit)."""
    now = present()
    try:
        from ray._private.state import state

        most = state.get_max_resources_from_cluster_config() or {}
    except Exception:  # no autoscaler (a fixed cluster, a local Ray): only what is up
        most = {}
    return {key: max(now.get(key, 0.0), float(most.get(key, 0))) for key in set(now) | set(most)}


def capped(value: float, limit: int) -> int:
    """`value` as a count, at most `limit` (an autoscaler without a limit says sys.maxsize)."""
    return int(min(value, limit, sys.maxsize))


@dataclass(frozen=True)
class Wanted:
    """`count` placements of `per` (e.g. 2 x {"GPU": 1}) that a stage waits for."""

    what: str  # for messages: "model actor"
    per: dict[str, float]
    count: int = 1

    def satisfied(self, nodes: list[dict[str, float]]) -> bool:
        """Whether `count` bundles fit on the alive nodes' total resources (first fit)."""
        free = [dict(node) for node in nodes]
        for _ in range(self.count):
            for node in free:
                if all(node.get(key, 0.0) >= amount for key, amount in self.per.items()):
                    for key, amount in self.per.items():
                        node[key] -= amount
                    break
            else:
                return False
        return True

    def describe(self) -> str:
        shape = ", ".join(f"{amount:g} {key}" for key, amount in sorted(self.per.items()))
        return f"{self.count} {self.what}(s) of {shape} each"


def node_totals() -> list[dict[str, float]]:
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def wait_for(wanted: Wanted, seconds: float, progress=print) -> float:
    """Block until the cluster's nodes can hold `wanted`, asking the autoscaler for it while
    waiting; seconds waited. ResourcesUnavailable, in one line, after `seconds`."""
    began = time.monotonic()
    if wanted.satisfied(node_totals()):
        return 0.0
    request_from_autoscaler([wanted.per] * wanted.count)
    said = began
    try:
        while not wanted.satisfied(node_totals()):
            waited = time.monotonic() - began
            if waited >= seconds:
                have = ", ".join(f"{value:g} {key}" for key, value in sorted(present().items())
                                 if key in ("CPU", "GPU") or key in wanted.per) or "nothing"
                raise ResourcesUnavailable(
                    f"waited {seconds:g} s for {wanted.describe()} and the cluster still cannot place them "
                    f"(it has {have}); add such nodes, raise embed.wait_for_resources_s, or choose --device cpu")
            if time.monotonic() - said >= WAIT_MESSAGE_EVERY_S:
                said = time.monotonic()
                progress(f"waiting for {wanted.describe()}: {waited:.0f} s of at most {seconds:g} s")
            time.sleep(POLL_S)
    finally:
        request_from_autoscaler([])  # the pool's own demand takes over from here
    return time.monotonic() - began


def request_from_autoscaler(bundles: list[dict[str, float]]) -> None:
    """Ask the autoscaler to make room for `bundles` (an empty list withdraws the request).
    A cluster without an autoscaler ignores it."""
    try:
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=bundles)
    except Exception:  # not supported here: nothing scales, the wait alone decides
        pass


@dataclass(frozen=True)
class Pool:
    device: str  # "gpu" or "cpu": what the model actors ask Ray for
    actors: tuple[int, int]  # model actors: (fewest, most); the pool grows as room appears
    gpus: float  # GPUs each model actor asks for
    threads: int  # torch threads per model actor (0: leave torch's default)
    preparers: tuple[int, int]  # CPU tasks preparing blocks at a time: (fewest, most)

    def wanted(self) -> Wanted:
        """What must be placeable before the pipeline starts: the fewest model actors."""
        per = {"GPU": self.gpus} if self.device == "gpu" else {"CPU": 1.0}
        return Wanted("model actor", per, self.actors[0])


def resolve_device(embed: EmbedConfig) -> str:
    """embed.device, with auto meaning gpu when the cluster has GPUs or can add them."""
    if embed.device != "auto":
        return embed.device
    return "gpu" if reachable().get("GPU", 0) > 0 else "cpu"


def plan_pool(embed: EmbedConfig, blocks: int) -> Pool:
    """The embedding pool, planned from what the run asks for and what the cluster can reach
    (its autoscaler's node types included), not from what is up this second.

    On GPUs: actors asking for embed.gpus_per_actor each, autoscaling from 1 to
    embed.max_actors (default: the reachable GPUs / gpus_per_actor), or exactly embed.actors.
    On CPUs: embed.actors (default 1) actors sharing the cores' torch threads. Preparers:
    the CPUs the model actors leave, at least one, growing with the cluster."""
    device = resolve_device(embed)
    most = reachable()
    cpus_now, cpus_most = int(present().get("CPU", 0)), most.get("CPU", 0)
    if device == "gpu":
        high = embed.max_actors or max(1, capped(most.get("GPU", 0) // embed.gpus_per_actor, blocks))
        actors = (embed.actors, embed.actors) if embed.actors else (1, max(1, min(high, blocks)))
        gpus, threads, cpus_for_model = embed.gpus_per_actor, 0, 0
    else:
        count = embed.actors or 1
        actors, gpus, threads, cpus_for_model = (count, count), 0.0, max(1, cpus_now // count), count
    if embed.prepare_workers:
        preparers = (embed.prepare_workers, embed.prepare_workers)
    else:
        preparers = (1, max(1, capped(cpus_most - cpus_for_model, blocks)))
    return Pool(device, actors, gpus, threads, preparers)


def pool_text(pool: Pool) -> str:
    """The pool in words, for progress lines and the manifest."""
    low, high = pool.actors
    actors = f"{low}" if low == high else f"{low} to {high}"
    each = f"{pool.gpus:g} GPU each" if pool.device == "gpu" else f"{pool.threads} torch thread(s) each"
    low, high = pool.preparers
    preparers = f"{low}" if low == high else f"{low} to {high}"
    return f"{actors} model actor(s), {each}; {preparers} preparer(s)"


def part_files(output: str) -> dict[str, str]:
    """{file name: uri} of the part files under output/embeddings."""
    try:
        return {uri.rsplit("/", 1)[-1]: uri for uri in io.list_files(io.join(output, schema.EMBEDDINGS_DIR),
                                                                     (".parquet",))}
    except FileNotFoundError:
        return {}


def part_signature(uri: str, dimension: int) -> tuple[list[tuple], int] | None:
    """(block_signature, rejected records) of a finished part file, or None when it does not
    read back whole (truncated, corrupt, another schema, a vector of the wrong length) or
    records a model failure: then the block is redone."""
    try:
        table = io.read_parquet(uri)
    except io.InputFormatError:
        return None
    if not set(schema.EMBEDDINGS.names) <= set(table.schema.names):
        return None
    columns = {name: table.column(name).to_pylist() for name in (schema.SAMPLE_ID, schema.FINGERPRINT,
                                                                 schema.REASON)}
    lengths = pc.list_value_length(table.column(schema.EMBEDDING)).to_numpy(zero_copy_only=False)
    if any(length == length and length != dimension for length in lengths):  # NaN: a null vector
        return None
    if MODEL_FAILED in columns[schema.REASON]:
        return None  # try the model again: its failure may not have been the record's
    signature = [(sample_id, fingerprint) if fingerprint else (sample_id, reason)
                 for sample_id, fingerprint, reason in zip(*columns.values())]
    return signature, sum(reason is not None for reason in columns[schema.REASON])


def check_block(row: dict, output: str, image_root: str | None, salt: str, dimension: int) -> dict:
    """Whether the block's finished part file can be reused: it reads back whole and holds
    the same records with the same fingerprints. Asks for the images' digests only (an
    unchanged image is never read again), never runs the model. Returns the counts write_block would have given."""
    items = shards.read_block(row)
    fetched = fingerprint_block(items, image_root, salt, read=False)
    wanted = block_signature([item.id for item in items], fetched.fingerprints, fetched.rejected)
    found = part_signature(io.join(output, schema.EMBEDDINGS_DIR, part_name(row["block"])), dimension)
    return {"block": row["block"], "unchanged": found is not None and found[0] == wanted, "records": len(items),
            "rejected": found[1] if found else 0}


def embed_dataset(rows: list[dict], config: JobConfig, salt: str, previous: ray.ObjectRef | None, publish: Publish,
                  pool: Pool) -> ray.data.Dataset:
    """The blocks' pipeline: CPU tasks prepare each block, the model actors embed and publish it."""
    ds = ray.data.from_items(rows, override_num_blocks=len(rows))
    # max_calls=0: a worker process is never retired after some number of tasks, so the
    # preprocessor it built stays (_preprocessor). Said explicitly, it also keeps Ray Data from
    # fusing the preparation into the model actors, which it does to a task stage whose remote
    # arguments and size match the actor stage after it.
    ds = ds.map(prepare_block, fn_args=(config.model, config.embed, config.image_root, salt, previous, publish),
                compute=ray.data.TaskPoolStrategy(size=pool.preparers[1]), num_cpus=1, max_calls=0)
    return ds.map(ModelWorker, fn_constructor_args=(config.model, config.embed, config.layers, pool.threads, publish),
                  compute=ray.data.ActorPoolStrategy(min_size=pool.actors[0], max_size=pool.actors[1]),
                  num_gpus=pool.gpus, num_cpus=0 if pool.gpus else 1)


def run_embed(config: JobConfig, progress=print) -> EmbedResult:
    """Embed every record under config.input into config.output/embeddings."""
    for key in ("input", "model"):
        if not getattr(config, key):
            raise model_io.ModelError(f"the embed stage needs --{key}")
    start = time.perf_counter()
    out = config.output
    config, hidden = resolve_layers(config)
    model_io.load_processor(config.model, config.embed)  # a broken checkpoint fails here, before any write
    made = check_provenance(config, hidden, out)
    # after the provenance check: an output refused for another model stays as it was, unmarked
    mark_in_progress(out)
    dimension = 2 * len(config.layers) * hidden
    salt = run_salt(made["model_fingerprint"], config.layers, config.embed.max_image_pixels)
    progress(f"embed: model {config.model}, layers {list(config.layers)}, dimension {dimension}")
    per_block = config.embed.block_records
    corpus = corpus_stage.prepare(config.input, out, per_block, lambda line: progress(f"embed: {line}"))
    blocks, records = corpus.blocks(per_block), corpus.records
    existing = part_files(out)
    unchanged = {}
    candidates = [i for i in range(blocks) if part_name(i) in existing]
    if candidates:
        progress(f"embed: checking {len(candidates)} finished block(s) against the input (ids, content, images)")
        checks = corpus_stage.map_blocks(corpus, per_block, check_block, out, config.image_root, salt, dimension,
                                          blocks=candidates)
        unchanged = {c["block"]: c for c in checks if c["unchanged"]}
    pending = [i for i in range(blocks) if i not in unchanged]
    progress(f"embed: {records} records in {blocks} blocks; {len(unchanged)} finished and unchanged, "
             f"{len(pending)} to embed")
    embedded = reused_previous = truncated = 0
    reused_here = sum(check["records"] - check["rejected"] for check in unchanged.values())
    plan = None
    publish = Publish(out, config.embed.vector_dtype, hold_point("embed-model"), hold_point("embed-block"),
                      release_file(), hold_point("embed-prepare"))
    previous = reusable_previous(config, made, progress) if pending else None
    if previous is not None:
        previous = ray.put(previous)  # sent once to every CPU worker
        whole = reuse_whole_blocks(corpus, per_block, pending, config.image_root, salt, config.embed.max_image_pixels,
                                   previous, publish)
        if whole:
            reused_previous += sum(summary["reused"] for summary in whole.values())
            pending = [i for i in pending if i not in whole]
            progress(f"embed: {len(whole)} block(s) copied whole from {config.previous}, no model needed; "
                     f"{len(pending)} left for the model")
    if pending:
        pool = plan_pool(config.embed, len(pending))
        progress(f"embed: model on {pool.device.upper()}: {pool_text(pool)}")
        waited = wait_for(pool.wanted(), config.embed.wait_for_resources_s,
                                    progress=lambda line: progress(f"embed: {line}"))
        if waited:
            progress(f"embed: waited {waited:.0f} s for the cluster; starting")
        plan = {"device": pool.device, "model_actors": list(pool.actors), "gpus_per_actor": pool.gpus,
                "torch_threads": pool.threads, "preparers": list(pool.preparers), "waited_s": round(waited, 1)}
        ds = embed_dataset(corpus.block_rows(per_block, pending), config, salt, previous, publish, pool)
        began = time.perf_counter()
        for finished, summary in enumerate(ds.iter_rows(), start=1):
            embedded += summary["records"] - summary["rejected"] - summary["reused"]
            reused_previous += summary["reused"]
            truncated += summary["truncated"]
            elapsed = time.perf_counter() - began
            left = (len(pending) - finished) * elapsed / finished  # blocks are the same size
            progress(f"embed {progress_bar(finished, len(pending))} blocks, {embedded / max(elapsed, 1e-9):.1f} "
                     f"samples/s, ~{left:.0f}s left; "
                     f"block {summary['block']} written: reused {summary['reused']}, rejected {summary['rejected']} "
                     f"{summary['reasons'] if summary['rejected'] else ''}".rstrip())
    listing = sorted(part_name(i) for i in range(blocks))
    for name, uri in part_files(out).items():
        if name not in listing:  # a block of an earlier, longer input: not part of this one
            io.remove(uri)
            progress(f"embed: removed {name}, a block the input no longer has")
    io.write_json({"parts": listing, "records": records}, io.join(out, schema.EMBEDDINGS_DONE_PATH))
    return EmbedResult(blocks, len(unchanged), records, embedded, reused_here, reused_previous, truncated,
                       time.perf_counter() - start, plan)


def reuse_block(row: dict, image_root: str | None, salt: str, max_image_pixels: int, previous,
                publish: Publish) -> dict:
    """Publish the block from --previous's vectors alone when every record of it either has
    a vector there or is rejected before the model (its image does not decode), as the
    model pipeline would reject it; else say it was not written. A CPU task: images' digests,
    and only the images --previous lacks read and decoded; no model."""
    if isinstance(previous, ray.ObjectRef):
        previous = ray.get(previous)
    items = shards.read_block(row)
    fetched = fingerprint_block(items, image_root, salt, read=False)
    found = {}
    for position, fingerprint in fetched.fingerprints.items():
        found[position] = previous.find(fingerprint, items[position].id)
        if found[position] is None and items[position].image is not None:
            try:  # read only now: an image the model pipeline would reject needs no model either
                decode_image(fetch_image(image_root, items[position])[0], max_image_pixels)
            except RecordProblem as problem:
                fetched.rejected[position] = rejection(items[position], problem)
                del found[position]
                continue
        if found[position] is None:
            return {"block": row["block"], "written": False}
    n = len(items)
    result = EmbeddedBlock(row["block"], [item.id for item in items], [None] * n, np.zeros(n, np.int32),
                           np.zeros(n, np.int32), fetched.rejected, fetched.fingerprints, found, [])
    return {**write_block(result, publish), "written": True}


def reuse_whole_blocks(corpus: shards.Corpus, block_records: int, pending: list[int], image_root: str | None,
                       salt: str, max_image_pixels: int, previous, publish: Publish) -> dict[int, dict]:
    """{block: write_block's counts} of the pending blocks --previous covers whole: written
    by CPU tasks, so an unchanged night starts no model actor. The blocks left go to the
    model pipeline, which fetches their images."""
    done = corpus_stage.map_blocks(corpus, block_records, reuse_block, image_root, salt, max_image_pixels, previous,
                                    publish, blocks=pending)
    return {row["block"]: row for row in done if row["written"]}


def reusable_previous(config: JobConfig, made: dict, progress) -> PreviousVectors | None:
    """config.previous's vectors, when their fingerprints can match this run's: a run made
    with another model, other layers or another image pixel limit has a different salt in
    every fingerprint, so none of its vectors can be reused, and the line says so."""
    if not config.previous:
        return None
    theirs_uri = io.join(config.previous, schema.PROVENANCE_PATH)
    theirs = io.read_json(theirs_uri) if io.exists(theirs_uri) else {}
    differs = [key for key in ("model_fingerprint", "layers", "max_image_pixels")
               if key in theirs and key in made and theirs[key] != made[key]]
    if differs:
        progress(f"embed: none of the vectors of {config.previous} can be reused: it was made with other "
                 f"{', '.join(differs)}")
        return None
    previous = PreviousVectors.of_run(config.previous, config.embed.vector_dtype)
    progress(f"embed: {len(previous)} vectors of {config.previous} can be reused by fingerprint")
    return previous
