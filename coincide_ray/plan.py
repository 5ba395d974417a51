"""`--dry-run`: what a run would do and what it would need, before it does anything.

Reads the input listing and the records (the JSON list format cannot be sampled), checks a
sample of them, looks at what is already finished under the output, and estimates the
embedding work, the k-means memory and the largest cluster's kernel from the model's config
and the job's settings. `--calibrate N` embeds N records in this process to measure the
model's samples/s on this machine and project the whole corpus from it.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

from coincide_ray import io, schema
from coincide_ray.config import JobConfig
from coincide_ray.embed.msa import default_layers

SAMPLE = 200  # records checked in full (parsed, image found)
H100_BF16_FLOPS = 989e12  # dense bf16 peak of one H100 SXM
ASSUMED_MFU = 0.45  # DESIGN.md's planning figure
LARGEST_CLUSTER_FACTOR = 10  # skew assumed for the largest cluster: 10 x the mean size
IMPRACTICAL_KMEANS_GPU_HOURS = 8.0  # a k-means fit longer than a night on one GPU
DRIVER_BYTES_PER_RECORD = 40  # the driver's share per record: id keys (16 B) and their dedup (~24 B), at peak
DRIVER_BASE_BYTES = 350e6  # the driver process itself (Python, Ray, Arrow) before any record


@dataclass(frozen=True)
class ModelShape:
    depth: int
    hidden: int
    intermediate: int
    image_tokens: int  # tokens one image becomes (0 when unknown)

    def flops_per_token(self, last_layer: int) -> float:
        """Forward FLOPs per token through decoder layers 0..last_layer (attention and MLP
        weights; the forward stops after the last pooled layer)."""
        per_layer = 4 * self.hidden**2 + 3 * self.hidden * self.intermediate
        return 2.0 * per_layer * (last_layer + 1)


def model_shape(config: JobConfig) -> ModelShape:
    from transformers import AutoConfig

    from coincide_ray.embed.model import local_copy

    hf = AutoConfig.from_pretrained(local_copy(config.model, config.embed.model_cache),
                                    trust_remote_code=config.embed.trust_remote_code)
    text = hf.get_text_config()
    image_tokens = int(getattr(hf, "image_seq_length", 0) or 0)
    vision = getattr(hf, "vision_config", None)
    if not image_tokens and vision is not None and getattr(vision, "patch_size", None):
        image_tokens = (int(vision.image_size) // int(vision.patch_size)) ** 2
    return ModelShape(int(text.num_hidden_layers), int(text.hidden_size),
                      int(getattr(text, "intermediate_size", 4 * text.hidden_size)), image_tokens)


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def plan(config: JobConfig, command: str, calibrate: int = 0, workers: int = 0) -> list[str]:
    """The plan as lines of text."""
    from coincide_ray.records import Record, parse_record, read_raw_records

    lines = [f"dry run of `coincide-ray {command}`: nothing is written"]
    out = config.output
    records, accepted, sample_problems, chars, with_image = 0, 0, [], 0, 0
    if config.input:
        files = io.list_files(config.input, (".json", ".jsonl", ".parquet"))
        lines.append(f"input: {len(files)} file(s), {gb(sum(io.size(f) for f in files))} under {config.input}")
        for position, raw in read_raw_records(config.input):
            records += 1
            if records > SAMPLE:
                continue
            item = parse_record(raw, position)
            if not isinstance(item, Record):
                sample_problems.append(item.reason)
                continue
            if item.image is not None:
                with_image += 1
                if not (config.image_root and io.exists(io.join(config.image_root, item.image))):
                    sample_problems.append("missing image file")
                    continue
            accepted += 1
            chars += sum(len(turn["value"]) for turn in item.conversations)
        checked = min(records, SAMPLE)
        lines.append(f"records: {records}; of the first {checked} checked, {accepted} look usable"
                     + (f" (problems: {', '.join(sorted(set(sample_problems)))})" if sample_problems else ""))
    expected = int(records * accepted / max(min(records, SAMPLE), 1)) if config.input else 0
    if config.input:
        lines.append(f"driver memory: ~{gb(DRIVER_BASE_BYTES + DRIVER_BYTES_PER_RECORD * records)} "
                     f"(records stay in shards under the output; the driver keeps {DRIVER_BYTES_PER_RECORD} "
                     "bytes a record of id keys)")

    if command in ("run", "embed"):
        done = 0
        try:
            done = len(io.list_files(io.join(out, schema.EMBEDDINGS_DIR), (".parquet",)))
        except FileNotFoundError:
            pass
        blocks = -(-records // config.embed.block_records)
        lines.append(f"embed: {blocks} blocks of {config.embed.block_records}; {done} already written, "
                     f"{max(blocks - done, 0)} to do")
        shape = model_shape(config)
        layers = config.layers or default_layers(shape.depth)
        last = max(layers)
        tokens = chars / 4 / max(accepted, 1) + shape.image_tokens * with_image / max(min(records, SAMPLE), 1)
        flops = shape.flops_per_token(last) * tokens * expected * max(blocks - done, 0) / max(blocks, 1)
        hours = flops / (H100_BF16_FLOPS * ASSUMED_MFU) / 3600
        lines.append(f"embed work: ~{tokens:.0f} tokens per record, decoder layers 0..{last} of {shape.depth}: "
                     f"~{flops:.2e} FLOP, ~{hours:.2f} H100-hours at {ASSUMED_MFU:.0%} MFU (vision tower not counted)")
        dim = 2 * len(layers) * shape.hidden
    else:
        dim = 0
        provenance = io.join(config.embeddings or "", "_provenance.json")
        if config.embeddings and io.exists(provenance):
            dim = int(io.read_json(provenance)["dimension"])
            expected = expected or sum(io.read_parquet(f, [schema.SAMPLE_ID]).num_rows
                                       for f in io.list_files(config.embeddings, (".parquet",)))

    if command in ("run", "select") and dim:
        from coincide_ray.stages import finished

        k, n = config.cluster.clusters, expected
        workers = workers or config.cluster.workers or 1
        cluster_done = finished(out, "cluster") is not None
        lines.append(f"cluster: {'a finished k-means is under the output (reused if its inputs match)' if cluster_done else 'to run'}; "
                     f"K = {k}, {config.cluster.iterations} iterations, N ~ {n}, D = {dim}")
        rows = n * dim * 4
        per_worker = rows / workers + k * dim * (4 + 8) + min(rows / workers, 256 * 2**20) * 2
        driver = k * dim * (8 + 8 + 8 + 4 + 4)
        lines.append(f"k-means memory: rows {gb(rows)} in all; per worker ({workers}) ~{gb(per_worker)}; "
                     f"driver ~{gb(driver)}")
        sample = config.cluster.sample_fraction or 1.0
        fit_rows = int(n * sample)
        flops = 2.0 * fit_rows * k * dim  # one assignment pass: the N x K similarity matmul
        fit_hours = flops * config.cluster.iterations / (H100_BF16_FLOPS * ASSUMED_MFU) / 3600
        lines.append(f"k-means work: ~{flops:.2e} FLOP per iteration over {fit_rows} rows"
                     + (f" (--kmeans-sample {sample:g})" if sample < 1 else "")
                     + f", ~{fit_hours:.2f} GPU-hours for {config.cluster.iterations} iterations at "
                     f"{ASSUMED_MFU:.0%} of an H100's bf16 peak")
        if fit_hours > IMPRACTICAL_KMEANS_GPU_HOURS:
            lines.append(f"warning: K x N x D = {k} x {fit_rows} x {dim} makes the k-means fit take over "
                         f"{IMPRACTICAL_KMEANS_GPU_HOURS:g} GPU-hours; fit on a sample with --kmeans-sample "
                         f"(e.g. {max(0.01, min(1.0, sample * IMPRACTICAL_KMEANS_GPU_HOURS / fit_hours)):.2g})")
        largest = min(n, LARGEST_CLUSTER_FACTOR * n // max(k, 1))
        kernel = largest**2 * 8
        cap = config.select.kernel_memory_mb * 2**20
        lines.append(f"largest cluster (assumed {LARGEST_CLUSTER_FACTOR} x the mean, {largest} records): kernel "
                     f"{gb(kernel)}" + (f", over select.kernel_memory_mb: processed blockwise in {gb(cap)}"
                                        if kernel > cap else ", in memory"))
        lines.append(f"select: budget ~{int(config.select.fraction * n)} records "
                     f"({config.select.fraction:.0%} of ~{n} accepted)")
    if calibrate and command in ("run", "embed"):
        rate = measure(config, calibrate)
        lines.append(f"calibration: {rate:.2f} samples/s for one model actor on this machine; the corpus "
                     f"(~{expected} records) would take ~{expected / rate / 3600:.2f} hours per actor")
    return lines


def measure(config: JobConfig, count: int) -> float:
    """Samples/s of the model on `count` records, prepared beforehand, in this process."""
    from coincide_ray.embed.model import load_model, local_copy, preprocessing
    from coincide_ray.embed.msa import extract_msa_embeddings
    from coincide_ray.embed.preprocess import Preprocessor
    from coincide_ray.records import accepted_records

    loaded = load_model(config.model, config.embed)
    layers = config.layers or default_layers(model_shape(config).depth)
    pre = Preprocessor(loaded.processor, image_root=config.image_root, batch_size=config.embed.batch_size,
                       batch_tokens=config.embed.batch_tokens,
                       max_image_pixels=config.embed.max_image_pixels,
                       **preprocessing(local_copy(config.model, config.embed.model_cache)))
    items = [item for _, _, item in itertools.islice(accepted_records(config.input), count)]
    batches = pre.prepare(0, items).batches
    done = sum(len(b.positions) for b in batches)
    if not done:
        raise ValueError("none of the calibration records could be prepared")
    extract_msa_embeddings(loaded.model, batches[0].inputs, layers)  # warm-up
    start = time.perf_counter()
    for batch in batches:
        extract_msa_embeddings(loaded.model, batch.inputs, layers)
    return done / (time.perf_counter() - start)
