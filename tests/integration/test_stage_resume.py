"""Every select-side stage is skipped when finished, and only when its files are intact."""

import dataclasses

import numpy as np
from embeddings_corpus import write_corpus

from coincide_ray import io, schema
from coincide_ray.cluster import spherical_kmeans
from coincide_ray.config import ClusterConfig, JobConfig, SelectConfig
from coincide_ray.pipeline import run_select
from coincide_ray.select import select_from_clusters
from coincide_ray.toy.synthetic import planted_embeddings

FILES = [schema.CENTROIDS_PATH, schema.ASSIGNMENTS_PATH, schema.SUMMARY_PATH, schema.SELECTION_PATH,
         schema.REJECTED_PATH]


def run(config: JobConfig) -> tuple[dict, list[str]]:
    messages: list[str] = []
    return run_select(config, progress=messages.append), messages


def base_config(storage, emb_uri, **select) -> JobConfig:
    return JobConfig(output=io.join(storage, "run"), embeddings=emb_uri, layers=(3, 7),
                     cluster=ClusterConfig(clusters=6, iterations=8), select=SelectConfig(**select))


def started_workers(messages):
    return any(m.startswith("read ") for m in messages)


def core_selection(x, k, fraction, iterations=8, **kw):
    km = spherical_kmeans(x, k, iterations=iterations, seed=1234)
    return km, select_from_clusters(x, km.assignments, km.centroids, num_layers=2, fraction=fraction, **kw)


def selected_rows(out):
    return list(np.flatnonzero(io.read_parquet(io.join(out, schema.SELECTION_PATH)).column(schema.SELECTED)))


def test_a_second_run_does_no_new_work(storage):
    emb_uri, *_ = write_corpus(storage, n=300)
    config = base_config(storage, emb_uri, fraction=0.25)
    first, _ = run(config)
    files = {p: io.read_bytes(io.join(config.output, p)) for p in FILES}
    second, messages = run(config)
    assert not started_workers(messages)
    assert "k-means already finished" in messages[0] and "selection already finished" in messages[1]
    assert {p: io.read_bytes(io.join(config.output, p)) for p in FILES} == files
    assert second["counts"] == first["counts"] and second["sha256"] == first["sha256"]
    assert second["health"] == first["health"]


def test_a_new_budget_reuses_clusters_and_rankings(storage):
    emb_uri, vectors, _, accepted, _ = write_corpus(storage, n=300)
    config = base_config(storage, emb_uri, fraction=0.25)
    run(config)
    centroids = io.read_bytes(io.join(config.output, schema.CENTROIDS_PATH))
    for fraction, temperature in [(0.1, 0.1), (0.5, 0.3)]:
        changed = dataclasses.replace(config, select=SelectConfig(fraction=fraction, temperature=temperature))
        manifest, messages = run(changed)
        assert not started_workers(messages) and "k-means already finished" in messages[0]
        assert any("re-budgeted" in m for m in messages)
        _, core = core_selection(vectors[accepted], 6, fraction, temperature=temperature)
        assert selected_rows(config.output) == list(core.selected)
        assert manifest["counts"]["rejected"] == 3 and manifest["counts"]["selected"] == len(core.selected)
        assert io.read_bytes(io.join(config.output, schema.CENTROIDS_PATH)) == centroids


def test_a_larger_budget_ranks_giant_clusters_again(tmp_path):
    """Clusters too large for the kernel memory are ranked only up to their quota; a larger
    budget must rank them further, from the embeddings, with k-means still reused."""
    x, _ = planted_embeddings(900, num_layers=2, hidden=8, groups=2, seed=3)
    emb = str(tmp_path / "emb" / "part-0.parquet")
    io.write_parquet(schema.embeddings_table([f"r{i}" for i in range(900)], x), emb)
    config = JobConfig(output=str(tmp_path / "run"), embeddings=emb, layers=(3, 7),
                       cluster=ClusterConfig(clusters=2, iterations=5),
                       select=SelectConfig(fraction=0.1, kernel_memory_mb=1))  # 1 MB: 362 rows at most
    run(config)
    for fraction, reranked in [(0.3, True), (0.2, False)]:
        _, messages = run(dataclasses.replace(config, select=dataclasses.replace(config.select, fraction=fraction)))
        assert started_workers(messages) == reranked
        assert any("k-means already finished" in m for m in messages)
        _, core = core_selection(x, 2, fraction, iterations=5, kernel_memory_bytes=2**20)
        assert selected_rows(config.output) == list(core.selected)


def test_files_from_another_attempt_are_not_taken_as_finished(tmp_path):
    """An attempt that overwrote one cluster file leaves a marker that no longer matches:
    the next run redoes k-means and publishes one consistent result."""
    emb_uri, *_ = write_corpus(str(tmp_path), n=300)
    config = base_config(str(tmp_path), emb_uri, fraction=0.25)
    run(config)
    good = {p: io.read_bytes(io.join(config.output, p)) for p in (schema.ASSIGNMENTS_PATH, schema.SELECTION_PATH)}
    other = dataclasses.replace(config, output=str(tmp_path / "other"),
                                cluster=dataclasses.replace(config.cluster, clusters=5))
    run(other)
    foreign = io.read_bytes(io.join(other.output, schema.ASSIGNMENTS_PATH))
    assert foreign != good[schema.ASSIGNMENTS_PATH]
    io.write_bytes(io.join(config.output, schema.ASSIGNMENTS_PATH), foreign)
    _, messages = run(config)
    assert any(m.startswith("k-means: K=6") for m in messages)
    assert {p: io.read_bytes(io.join(config.output, p)) for p in good} == good


def test_changed_settings_redo_what_they_affect(tmp_path):
    emb_uri, vectors, _, accepted, _ = write_corpus(str(tmp_path), n=300)
    x = vectors[accepted]
    config = base_config(str(tmp_path), emb_uri, fraction=0.25)
    run(config)
    centroids = io.read_bytes(io.join(config.output, schema.CENTROIDS_PATH))
    _, messages = run(dataclasses.replace(config, select=SelectConfig(fraction=0.25, sigma=0.5)))
    assert "k-means already finished" in messages[0] and started_workers(messages)
    _, core = core_selection(x, 6, 0.25, sigma=0.5)
    assert selected_rows(config.output) == list(core.selected)
    summary = io.read_parquet(io.join(config.output, schema.SUMMARY_PATH)).column("density").to_numpy()
    assert np.allclose(summary, core.clusters.density, equal_nan=True)  # densities of the new kernel width
    assert io.read_bytes(io.join(config.output, schema.CENTROIDS_PATH)) == centroids
    _, messages = run(dataclasses.replace(config, cluster=dataclasses.replace(config.cluster, seed=99)))
    assert any(m.startswith("k-means: K=6") for m in messages)
    km = spherical_kmeans(x, 6, iterations=8, seed=99)
    assert np.array_equal(io.read_npy(io.join(config.output, schema.CENTROIDS_PATH)), km.centroids)
    core = select_from_clusters(x, km.assignments, km.centroids, num_layers=2, fraction=0.25)
    assert selected_rows(config.output) == list(core.selected)


def test_warm_start_begins_from_the_previous_centroids(tmp_path):
    emb_uri, vectors, _, accepted, _ = write_corpus(str(tmp_path), n=300)
    first = base_config(str(tmp_path), emb_uri, fraction=0.25)
    run(first)
    previous_centroids = io.read_npy(io.join(first.output, schema.CENTROIDS_PATH))
    warm = dataclasses.replace(first, output=str(tmp_path / "warm"), previous=first.output,
                               cluster=dataclasses.replace(first.cluster, warm_start=True, iterations=0))
    manifest, messages = run(warm)
    assert not any("warm start skipped" in m for m in messages)
    # zero iterations: the centroids are the previous ones, normalised, and every row is assigned to them
    assert np.allclose(io.read_npy(io.join(warm.output, schema.CENTROIDS_PATH)), previous_centroids, atol=1e-6)
    km = spherical_kmeans(vectors[accepted], 6, iterations=0, init=previous_centroids)
    table = io.read_parquet(io.join(warm.output, schema.ASSIGNMENTS_PATH))
    assert list(table.column(schema.CLUSTER).to_numpy()) == list(km.assignments)
    _, messages = run(dataclasses.replace(warm, output=str(tmp_path / "other-k"),
                                          cluster=dataclasses.replace(warm.cluster, clusters=5)))
    assert any("warm start skipped" in m for m in messages)


def test_a_new_similarity_mask_rebudgets_with_new_transferability(tmp_path):
    """The rankings still serve (same clusters, same kernel width), but transferability
    depends on the mask: it is recomputed from the centroids, not taken from the summary."""
    emb_uri, vectors, _, accepted, _ = write_corpus(str(tmp_path), n=300)
    config = base_config(str(tmp_path), emb_uri, fraction=0.25)
    run(config)
    manifest, messages = run(dataclasses.replace(config, select=SelectConfig(fraction=0.25, similarity_mask=0.2)))
    assert not started_workers(messages) and any("re-budgeted" in m for m in messages)
    _, core = core_selection(vectors[accepted], 6, 0.25, similarity_mask=0.2)
    _, before = core_selection(vectors[accepted], 6, 0.25)
    assert not np.array_equal(core.clusters.transferability, before.clusters.transferability)
    summary = io.read_parquet(io.join(config.output, schema.SUMMARY_PATH)).column("transferability").to_numpy()
    assert np.allclose(summary, core.clusters.transferability)
    assert selected_rows(config.output) == list(core.selected)


def test_warm_start_falls_back_to_the_seeded_draw_when_the_centroids_do_not_fit(tmp_path):
    emb_uri, vectors, _, accepted, _ = write_corpus(str(tmp_path), n=300)
    first = base_config(str(tmp_path), emb_uri, fraction=0.25)
    run(first)
    cold = spherical_kmeans(vectors[accepted], 6, iterations=8, seed=1234).centroids
    warm = dataclasses.replace(first, previous=first.output,
                               cluster=dataclasses.replace(first.cluster, warm_start=True))
    io.write_npy(np.ones((6, 5), np.float32), io.join(first.output, schema.CENTROIDS_PATH))  # another dimension
    _, messages = run(dataclasses.replace(warm, output=str(tmp_path / "other-dimension")))
    assert any("previous centroids have dimension 5" in m for m in messages)
    assert np.array_equal(io.read_npy(str(tmp_path / "other-dimension" / schema.CENTROIDS_PATH)), cold)
    io.remove(io.join(first.output, schema.CENTROIDS_PATH))  # none at all
    _, messages = run(dataclasses.replace(warm, output=str(tmp_path / "no-centroids")))
    assert any("warm start skipped: no" in m for m in messages)
    assert np.array_equal(io.read_npy(str(tmp_path / "no-centroids" / schema.CENTROIDS_PATH)), cold)
