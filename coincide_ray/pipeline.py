"""The selection job: embeddings -> clusters -> selection -> manifest, on Ray.

The embeddings stay on shard workers (coincide_ray.cluster.stage); the driver holds ids,
assignments and ranks only. Every bad row becomes a rejected row with a reason; the
contract files of DESIGN.md are written under the output, manifest.json last.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from coincide_ray import io, schema
from coincide_ray.corpus import shards as record_shards
from coincide_ray.corpus import stage as corpus_stage
from coincide_ray.config import JobConfig
from coincide_ray.manifest import (clear_in_progress, cluster_warnings, command_line, fingerprint, health,
                                   library_versions, mark_in_progress)
from coincide_ray.records import Record
from coincide_ray.report import block_labels, block_records_of, label_figures, label_warning
from coincide_ray.report import render as render_report
from coincide_ray.stages import Finished, finished, publish, sha256, stage_key

Progress = Callable[[str], None]


class InputError(ValueError):
    """The input cannot give a run at all (as opposed to a bad record, which is rejected)."""


def stderr_progress(message: str) -> None:
    print(f"[coincide-ray] {message}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class EmbedStats:
    """What the embed stage of this run did, for the manifest."""

    embedded: int  # vectors computed by this run
    seconds: float
    truncated: int = 0  # records cut to the model's context by this run
    resources: dict | None = None  # the embedding pool that ran
    reused_here: int = 0  # vectors this output already held (an earlier attempt of this run)
    reused_previous: int = 0  # vectors copied from --previous


def selected_records_json(corpus: record_shards.Corpus, block_records: int,
                          subsets: dict[str, set[str]]) -> dict[str, tuple[bytes, int]]:
    """Per subset (name -> selected ids): the selected records as the input holds them, in
    canonical order, as one JSON list, and how many; for an id with several copies, the copy
    that was accepted. Ray tasks read the record shards, block by block; the driver joins
    their pieces and never parses a record."""
    names = list(subsets)
    keysets = [record_shards.KeySet(subsets[name]) for name in names]
    pieces = corpus_stage.map_blocks(corpus, block_records, selected_texts, keysets)
    out = {}
    for k, name in enumerate(names):
        texts = [text for piece in pieces for text in piece[k]]
        out[name] = (b"[\n" + b",\n".join(texts) + b"\n]\n" if texts else b"[]\n", len(texts))
    return out


def input_corpus(config: JobConfig, progress: Progress) -> record_shards.Corpus:
    """The input's record shards under the output (made by the embed stage when it ran here;
    made now, or brought up to date, otherwise)."""
    return corpus_stage.prepare(config.input, config.output, config.embed.block_records, progress)


def selected_texts(row: dict, keysets: list) -> list[list[bytes]]:
    """For one block: per key set, the JSON text of each accepted record whose id it holds."""
    pairs = [(item, text) for item, text in record_shards.raw_texts(row) if isinstance(item, Record)]
    ids = [item.id for item, _ in pairs]
    return [[pairs[i][1] for i in np.flatnonzero(keys.holds(ids))] for keys in keysets]


def gallery_lookup(corpus: record_shards.Corpus, block_records: int) -> Callable[[set[str]], dict[str, dict]]:
    """{id: raw record} of the few ids the report's gallery shows, read by Ray tasks."""
    def lookup(wanted: set[str]) -> dict[str, dict]:
        pieces = corpus_stage.map_blocks(corpus, block_records, block_records_of, record_shards.KeySet(wanted))
        return dict(pair for piece in pieces for pair in piece)

    return lookup


def recorded_provenance(embeddings: str) -> dict | None:
    """The embed stage's _provenance.json beside the embeddings, when there is one."""
    path = io.join(embeddings, os.path.basename(schema.PROVENANCE_PATH))
    return io.read_json(path) if io.exists(path) else None


def with_recorded_layers(config: JobConfig, provenance: dict | None) -> JobConfig:
    """The config with the layers the embeddings were made with: taken from the provenance
    when --layers is not given, and refused when --layers says otherwise."""
    recorded = tuple(provenance["layers"]) if provenance else None
    if config.layers is None:
        if recorded is None:
            raise InputError(f"no _provenance.json beside {config.embeddings} to take the layers from: give --layers")
        return dataclasses.replace(config, layers=recorded)
    if recorded is not None and tuple(config.layers) != recorded:
        raise InputError(f"--layers {','.join(map(str, config.layers))} differ from the layers "
                         f"{','.join(map(str, recorded))} the embeddings under {config.embeddings} were made with: "
                         "leave --layers out, or give those")
    return config


@dataclass(frozen=True)
class StageKeys:
    """What each select-side stage's outputs depend on (coincide_ray.stages)."""

    cluster: str  # the embeddings files + k-means settings
    rank: str  # + kernel width: densities and greedy rankings
    transfer: str  # + layers and similarity mask: transferability
    select: str  # + budget settings and the records file behind selected.json

    @staticmethod
    def of(config: JobConfig, embeddings_fingerprint: str, input_fingerprint: str | None,
           init_fingerprint: str | None) -> StageKeys:
        c, s = config.cluster, config.select
        cluster = stage_key("cluster", embeddings_fingerprint, c.clusters, c.iterations, c.seed, c.sample_fraction,
                            init_fingerprint)
        rank = stage_key("rank", cluster, s.sigma)
        transfer = stage_key("transfer", cluster, config.layers, s.similarity_mask)
        select = stage_key("select", rank, transfer, s.fraction, s.temperature, config.input, input_fingerprint,
                           *([s.strategies, c.seed] if s.strategies else []))
        return StageKeys(cluster, rank, transfer, select)


@dataclass(frozen=True)
class Clusters:
    ids: list[str]  # accepted records, canonical order
    centroids: np.ndarray
    assignments: np.ndarray
    cosine: np.ndarray
    objective: float
    digests: dict[str, str]  # sha256 of the published files


class LazyShards:
    """The shard workers, started only when a stage has work that needs the vectors."""

    def __init__(self, config: JobConfig, files: list[str], dimension: int | None, progress: Progress):
        self.config, self.files, self.dimension, self.progress = config, files, dimension, progress
        self.shards = None
        self.seconds = 0.0

    def get(self):
        from coincide_ray.cluster.stage import ShardSet

        if self.shards is not None:
            return self.shards
        start = time.perf_counter()
        self.shards = shards = ShardSet.load(self.files, self.config.cluster.workers, dim=self.dimension,
                                             progress=self.progress, device=self.config.cluster.device)
        data = shards.verdict
        self.seconds = time.perf_counter() - start
        self.progress(f"read {data.records} records from {len(self.files)} file(s) onto {len(shards.workers)} "
                      f"worker(s) on {len(set(s.node for s in shards.shards))} node(s): {len(data.ids)} accepted, "
                      f"{len(data.rejected)} rejected")
        if not data.ids:
            reasons = Counter(reason for _, _, reason, _ in data.rejected)
            raise InputError(f"no usable embeddings in {self.config.embeddings}: {len(data.rejected)} rows rejected "
                             f"({'; '.join(f'{n} x {r}' for r, n in reasons.most_common(3))})")
        if data.dim % (2 * self.config.num_layers):
            raise InputError(f"embedding dimension {data.dim} is not a multiple of "
                             f"2 * {self.config.num_layers} layers: do --layers match the embeddings?")
        return shards

    def close(self) -> None:
        if self.shards is not None:
            self.shards.close()


def warm_start_centroids(config: JobConfig, progress: Progress) -> np.ndarray | None:
    """The previous run's centroids when cluster.warm_start asks for them and they fit."""
    if not (config.cluster.warm_start and config.previous):
        return None
    uri = io.join(config.previous, schema.CENTROIDS_PATH)
    if not io.exists(uri):
        progress(f"warm start skipped: no {uri}")
        return None
    centroids = io.read_npy(uri)
    if len(centroids) != config.cluster.clusters:
        progress(f"warm start skipped: {uri} has {len(centroids)} centroids, this run asks for "
                 f"{config.cluster.clusters}")
        return None
    return centroids


def cluster_stage(config: JobConfig, key: str, shards: LazyShards, progress: Progress,
                  init: np.ndarray | None = None) -> Clusters:
    """k-means, or the finished result of an earlier run with the same key."""
    out, c = config.output, config.cluster
    done = finished(out, "cluster", key)
    if done:
        table = io.parquet_from_bytes(done.files[schema.ASSIGNMENTS_PATH])
        progress(f"k-means already finished under {out}: reused")
        return Clusters(table.column(schema.SAMPLE_ID).to_pylist(),
                        io.npy_from_bytes(done.files[schema.CENTROIDS_PATH]),
                        table.column(schema.CLUSTER).to_numpy(), table.column(schema.COSINE).to_numpy(),
                        float(done.info["objective"]), done.digests)
    data = shards.get().verdict
    start = time.perf_counter()
    for warning in cluster_warnings(c.clusters, len(data.ids)):
        progress(f"warning: {warning}")
    if init is not None and init.shape[1] != data.dim:
        progress(f"warm start skipped: the previous centroids have dimension {init.shape[1]}, not {data.dim}")
        init = None
    kmeans = shards.get().kmeans(c.clusters, iterations=c.iterations, seed=c.seed, init=init,
                                 sample_fraction=c.sample_fraction, progress=progress)
    progress(f"k-means: K={c.clusters}, {c.iterations} iterations, objective {kmeans.objective:.2f} "
             f"({time.perf_counter() - start:.1f}s)")
    assignments = pa.table({schema.SAMPLE_ID: data.ids, schema.CLUSTER: kmeans.assignments,
                            schema.COSINE: kmeans.cosine}, schema=schema.ASSIGNMENTS)
    files = {schema.CENTROIDS_PATH: io.npy_bytes(kmeans.centroids),
             schema.ASSIGNMENTS_PATH: io.parquet_bytes(assignments)}
    digests = publish(out, "cluster", key, files, {"objective": kmeans.objective})
    return Clusters(list(data.ids), kmeans.centroids, kmeans.assignments, kmeans.cosine, kmeans.objective, digests)


def rejected_table(rejected: list[tuple]) -> pa.Table:
    columns = list(zip(*rejected)) if rejected else [[]] * len(schema.REJECTED)
    return pa.table(dict(zip(schema.REJECTED.names, columns)), schema=schema.REJECTED)


def rebudget(config: JobConfig, keys: StageKeys, clusters: Clusters, prior: Finished | None, progress: Progress):
    """(Selection, rejected table) from a previous selection's rankings (`prior`, the select
    stage finished under the output with other settings), when they were made over the same
    clusters and cover the new quotas; else None."""
    from coincide_ray.select.scoring import transferability
    from coincide_ray.select.selection import assemble, scores_and_quotas

    if prior is None or prior.info.get("rank_key") != keys.rank:
        return None
    ranked = io.parquet_from_bytes(prior.files[schema.SELECTION_PATH])
    if ranked.column(schema.SAMPLE_ID).to_pylist() != clusters.ids:
        return None
    summary = io.parquet_from_bytes(prior.files[schema.SUMMARY_PATH])
    s, k = config.select, len(clusters.centroids)
    if prior.info.get("transfer_key") == keys.transfer:
        transfer = summary.column("transferability").to_numpy()
    else:
        transfer = transferability(clusters.centroids, num_layers=config.num_layers, similarity_mask=s.similarity_mask)
    density = summary.column("density").to_numpy()
    sizes = np.bincount(clusters.assignments, minlength=k).astype(np.int64)
    rank = pc.fill_null(ranked.column(schema.RANK), -1).to_numpy().astype(np.int64)
    score, budget, quota = scores_and_quotas(transfer, density, sizes, len(rank), s.fraction, s.temperature)
    if (np.bincount(clusters.assignments[rank >= 0], minlength=k) < quota).any():
        return None  # a giant cluster was ranked only up to a smaller quota: rank it again
    progress("re-budgeted from the rankings of the previous selection under the output")
    rejected = io.parquet_from_bytes(prior.files[schema.REJECTED_PATH])
    return assemble(rank, clusters.assignments, transfer, density, score, sizes, quota, budget), rejected


def selection_outputs(config: JobConfig, keys: StageKeys, clusters: Clusters, shards: LazyShards,
                      prior: Finished | None, corpus: record_shards.Corpus | None,
                      progress: Progress) -> dict[str, bytes]:
    """Score, budget and rank: the select stage's files, from the previous rankings when
    they serve (a new budget), else from the embeddings on the shard workers."""
    from coincide_ray.select.stage import select_on_ray

    cfg = config.select
    reused = rebudget(config, keys, clusters, prior, progress)
    if reused:
        selection, rejected = reused
    else:
        data = shards.get().verdict
        if list(data.ids) != clusters.ids:
            raise InputError(f"the embeddings under {config.embeddings} changed since k-means ran: "
                             f"remove {io.join(config.output, 'clusters')} and run again")
        selection = select_on_ray(
            shards.get(), clusters.assignments, clusters.centroids, num_layers=config.num_layers,
            fraction=cfg.fraction, temperature=cfg.temperature, sigma=cfg.sigma,
            similarity_mask=cfg.similarity_mask, kernel_memory_bytes=cfg.kernel_memory_mb * 2**20)
        rejected = rejected_table(data.rejected)
    ids = clusters.ids
    selected = np.zeros(len(ids), dtype=bool)
    selected[selection.selected] = True
    progress(f"selected {int(selected.sum())} of {len(ids)} (budget {selection.budget})")
    rank = pa.array(selection.rank, mask=selection.rank < 0, type=pa.int64())
    outputs = {
        schema.SUMMARY_PATH: io.parquet_bytes(pa.table(selection.clusters.as_columns(), schema=schema.SUMMARY)),
        schema.SELECTION_PATH: io.parquet_bytes(pa.table(
            {schema.SAMPLE_ID: ids, schema.CLUSTER: clusters.assignments, schema.RANK: rank,
             schema.SELECTED: selected}, schema=schema.SELECTION)),
        schema.REJECTED_PATH: io.parquet_bytes(rejected),
    }
    subsets = {schema.SELECTED_RECORDS_PATH: {ids[i] for i in selection.selected}}
    subsets.update(strategy_outputs(config, clusters, selection, outputs, progress))
    if corpus is not None:
        for path, (data, written) in selected_records_json(corpus, config.embed.block_records, subsets).items():
            outputs[path] = data
            progress(f"writing {written} selected records to {io.join(config.output, path)}")
    return outputs


def strategy_outputs(config: JobConfig, clusters: Clusters, selection, outputs: dict[str, bytes],
                     progress: Progress) -> dict[str, set[str]]:
    """selection/<strategy>/selection.parquet for each of select.strategies, added to
    `outputs`, from COINCIDE's clusters, scores and rankings: seconds, however large the run.
    Returns each strategy's selected.json path and its selected ids."""
    from coincide_ray.select.strategies import choose

    subsets = {}
    ids, table = clusters.ids, selection.clusters
    for strategy in config.select.strategies:
        chosen = choose(strategy, rank=selection.rank, assignments=clusters.assignments,
                        transfer=table.transferability, density=table.density, fraction=config.select.fraction,
                        temperature=config.select.temperature, seed=config.cluster.seed)
        selected = np.zeros(len(ids), dtype=bool)
        selected[chosen.selected] = True
        selection_path, records_path = schema.strategy_paths(strategy)
        outputs[selection_path] = io.parquet_bytes(pa.table(
            {schema.SAMPLE_ID: ids, schema.CLUSTER: clusters.assignments, schema.SELECTED: selected},
            schema=schema.STRATEGY_SELECTION))
        subsets[records_path] = {ids[i] for i in chosen.selected}
        progress(f"strategy {strategy}: selected {len(chosen.selected)} of {len(ids)}, "
                 f"from {int((np.bincount(clusters.assignments[chosen.selected]) > 0).sum())} clusters")
    return subsets


def remove_stale_strategies(out: str, published: dict) -> None:
    """Strategy folders an earlier run wrote that this one did not ask for: removed, so that
    selection/ holds only what this run's manifest names."""
    from coincide_ray.select.strategies import STRATEGIES

    for strategy in STRATEGIES:
        for path in schema.strategy_paths(strategy):
            if path not in published and io.exists(io.join(out, path)):
                io.remove(io.join(out, path))


def selected_ids(selection: pa.Table) -> list[str]:
    return selection.filter(selection.column(schema.SELECTED)).column(schema.SAMPLE_ID).to_pylist()


def write_diff(previous: str, selection: pa.Table, out: str, progress: Progress) -> dict:
    """selection/diff.json: the selected ids added and dropped since the previous run, in
    this run's canonical order (dropped ones in the previous run's order)."""
    uri = io.join(previous, schema.SELECTION_PATH)
    if not io.exists(uri):
        progress(f"no selection to compare with at {uri}")
        return {"previous": previous, "compared": False}
    before = selected_ids(io.read_parquet(uri, [schema.SAMPLE_ID, schema.SELECTED]))
    now = selected_ids(selection)
    kept_before, kept_now = set(before), set(now)
    diff = {"previous": previous, "added": [i for i in now if i not in kept_before],
            "dropped": [i for i in before if i not in kept_now]}
    io.write_json(diff, io.join(out, schema.DIFF_PATH))
    progress(f"since {previous}: {len(diff['added'])} selected ids added, {len(diff['dropped'])} dropped")
    return {"previous": previous, "compared": True, "added": len(diff["added"]), "dropped": len(diff["dropped"]),
            "path": io.join(out, schema.DIFF_PATH)}


FILE_NAMES = {schema.CENTROIDS_PATH: "centroids", schema.ASSIGNMENTS_PATH: "assignments",
              schema.SUMMARY_PATH: "summary", schema.SELECTION_PATH: "selection", schema.REJECTED_PATH: "rejected",
              schema.SELECTED_RECORDS_PATH: "selected_records"}


def file_name(path: str) -> str:
    """The manifest's name for a published file: selection/random/selected.json -> random/selected_records."""
    if path in FILE_NAMES:
        return FILE_NAMES[path]
    strategy, leaf = path.split("/")[1:3]
    return f"{strategy}/{FILE_NAMES['selection/' + leaf]}"


def strategy_counts(tables: dict[str, pa.Table]) -> dict[str, dict]:
    """Per strategy's selection table: records selected and clusters they come from."""
    counts = {}
    for strategy, table in tables.items():
        chosen = table.filter(table.column(schema.SELECTED))
        counts[strategy] = {"selected": chosen.num_rows,
                            "clusters": len(set(chosen.column(schema.CLUSTER).to_pylist()))}
    return counts


def comparison(other: str, manifest: dict) -> dict:
    """This run's figures beside those of the finished run under `other` (--compare-with)."""
    theirs = io.read_json(io.join(other, schema.MANIFEST_PATH))

    def figures(run: dict) -> dict:
        labels = run.get("labels") or {}
        return {"model": run["config"].get("model"), "records": run["counts"]["records"],
                "clusters": run["config"]["cluster"]["clusters"],
                "collapsed centroid pairs": run["health"]["collapsed_centroid_pairs"],
                "cluster purity": round(labels["purity"], 3) if "purity" in labels else None,
                "label groups the selection covers": labels.get("groups_covered_by_selection"),
                "label groups a random subset covers": labels.get("groups_covered_by_random"),
                "label groups": labels.get("groups")}

    return {"output": other, "this run": figures(manifest), "that run": figures(theirs)}


def run_select(config: JobConfig, progress: Progress = stderr_progress, embed: EmbedStats | None = None) -> dict:
    """k-means + COINCIDE selection over embeddings Parquet files; returns the manifest.

    Each stage is skipped when an earlier run under the same output finished it with the same
    inputs and settings, and a new budget reuses the rankings (coincide_ray.stages); the
    manifest is written last, from the published files, on every run."""
    config.validate()
    if not config.embeddings:
        raise InputError("the select stage needs embeddings (--embeddings URI)")
    if config.compare_with and not io.exists(io.join(config.compare_with, schema.MANIFEST_PATH)):
        raise InputError(f"--compare-with {config.compare_with}: no finished run there (no {schema.MANIFEST_PATH})")
    if not io.exists(config.embeddings):
        raise FileNotFoundError(f"no such file or folder: {config.embeddings}")
    made = recorded_provenance(config.embeddings)
    config = with_recorded_layers(config, made)
    out = config.output
    files = io.list_files(config.embeddings, (".parquet",))
    embeddings_fingerprint = fingerprint(config.embeddings, files)
    input_files = io.list_files(config.input, (".json", ".jsonl", ".parquet")) if config.input else []
    input_fingerprint = fingerprint(config.input, input_files) if config.input else None
    init = warm_start_centroids(config, progress)
    keys = StageKeys.of(config, embeddings_fingerprint, input_fingerprint,
                        None if init is None else sha256(io.npy_bytes(init)))

    timings: dict[str, float] = {"embed": embed.seconds} if embed else {}
    shards = LazyShards(config, files, made["dimension"] if made else None, progress)
    mark_in_progress(out)
    corpus = input_corpus(config, progress) if config.input else None  # where the records are read from
    try:
        start = time.perf_counter()
        clusters = cluster_stage(config, keys.cluster, shards, progress, init)
        timings["cluster"] = time.perf_counter() - start - shards.seconds
        start, read = time.perf_counter(), shards.seconds
        prior = finished(out, "select")  # read and verified once: reused whole, or for its rankings
        if prior and prior.key == keys.select:
            progress(f"selection already finished under {out}: reused")
            outputs, digests = prior.files, prior.digests
        else:
            outputs = selection_outputs(config, keys, clusters, shards, prior, corpus, progress)
            digests = publish(out, "select", keys.select, outputs, {"rank_key": keys.rank, "transfer_key": keys.transfer})
        remove_stale_strategies(out, outputs)
        timings["select"] = time.perf_counter() - start - (shards.seconds - read)
        timings["read"] = shards.seconds
    finally:
        shards.close()

    summary = io.parquet_from_bytes(outputs[schema.SUMMARY_PATH])
    selection = io.parquet_from_bytes(outputs[schema.SELECTION_PATH])
    strategy_tables = {strategy: io.parquet_from_bytes(outputs[schema.strategy_paths(strategy)[0]])
                       for strategy in config.select.strategies}
    selected = int(pc.sum(selection.column(schema.SELECTED)).as_py() or 0)
    rejected = io.parquet_from_bytes(outputs[schema.REJECTED_PATH]).column(schema.REASON).to_pylist()
    accepted = len(clusters.ids)
    budget = int(config.select.fraction * accepted)
    digests = {**clusters.digests, **digests}
    embedded = embed.embedded if embed else 0
    manifest = {
        "command": command_line(),
        "config": config.to_dict(),
        "versions": library_versions(),
        "input": {"embeddings": config.embeddings, "files": files, "fingerprint": embeddings_fingerprint,
                  "records": config.input, "records_fingerprint": input_fingerprint},
        "counts": {"records": accepted + len(rejected), "rejected": len(rejected), "selected": selected,
                   "embedded": embedded,
                   "reused": embed.reused_here + embed.reused_previous if embed else 0,
                   "reused_from_this_output": embed.reused_here if embed else 0,
                   "reused_from_previous": embed.reused_previous if embed else 0,
                   "truncated": embed.truncated if embed else 0},
        "health": health(clusters.centroids, summary.column("size").to_numpy(), rejected, budget, selected),
        "timings_s": {k: round(v, 3) for k, v in timings.items()},
        "resources": {"embed": embed.resources if embed else None,
                      "select": shards.shards.plan() if shards.shards is not None else None},
        # relative to the output folder, so a copied or moved output still names its own files
        "paths": {file_name(path): path for path in digests},
        "sha256": {file_name(path): digest for path, digest in digests.items()},
        "stage_keys": {"cluster": keys.cluster, "select": keys.select},
        "strategies": strategy_counts(strategy_tables),
    }
    if config.previous:
        manifest["diff"] = write_diff(config.previous, selection, out, progress)
    labels = None
    if config.label_fields and config.input:
        masks = {strategy: table.column(schema.SELECTED).to_numpy(zero_copy_only=False)
                 for strategy, table in strategy_tables.items()}
        fields = list(config.label_fields)
        pieces = corpus_stage.map_blocks(corpus, config.embed.block_records, block_labels, fields)
        labelled = dict(pair for piece in pieces for pair in piece)
        labels = label_figures(labelled, fields, selection, strategies=masks)
        manifest["labels"] = {k: v for k, v in labels.items() if k != "per_group"}
        warning = label_warning(labels)
        if warning:
            manifest["health"]["warnings"].append(warning)
            progress(f"warning: {warning}")
        if labels["labelled"]:
            progress(f"labels {'/'.join(config.label_fields)} ({labels['labelled']} of {labels['records']} records): "
                     f"cluster purity {labels['purity']:.3f}; the selection covers "
                     f"{labels['groups_covered_by_selection']} of {labels['groups']} groups, a random subset "
                     f"of the same size {labels['groups_covered_by_random']}")
        else:
            labels = None
    if config.compare_with:
        manifest["compared_with"] = comparison(config.compare_with, manifest)
    report_uri = io.join(out, schema.REPORT_PATH)
    io.write_bytes(report_uri, render_report(manifest, summary, selection, config.embeddings,
                                             gallery_lookup(corpus, config.embed.block_records) if corpus else None,
                                             config.image_root, labels).encode())
    manifest["paths"]["report"] = schema.REPORT_PATH
    manifest_uri = io.join(out, schema.MANIFEST_PATH)
    io.write_json(manifest, manifest_uri)  # last: marks the run complete
    clear_in_progress(out)
    progress(f"outputs under {out} (report: {report_uri}; manifest: {manifest_uri})")
    return manifest
