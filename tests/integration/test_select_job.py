import numpy as np
import pyarrow as pa
import pytest
from embeddings_corpus import write_corpus

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.cluster import spherical_kmeans
from coincide_ray.select import select_from_clusters

LAYERS = "3,7"


def test_select_writes_the_contract(storage):
    emb_uri, vectors, ids, accepted_rows, bad = write_corpus(storage)
    out = io.join(storage, "run")
    assert main(["select", "--embeddings", emb_uri, "--output", out, "--fraction", "0.25",
                 "--clusters", "6", "--layers", LAYERS, "--iterations", "10"]) == 0

    selection = io.read_parquet(io.join(out, schema.SELECTION_PATH)).to_pydict()
    rejected = io.read_parquet(io.join(out, schema.REJECTED_PATH)).to_pydict()
    assignments = io.read_parquet(io.join(out, schema.ASSIGNMENTS_PATH)).to_pydict()
    summary = io.read_parquet(io.join(out, schema.SUMMARY_PATH)).to_pydict()
    centroids = io.read_npy(io.join(out, schema.CENTROIDS_PATH))
    manifest = io.read_json(io.join(out, schema.MANIFEST_PATH))

    # canonical order: files sorted by name, then rows; every record accounted for once
    assert selection[schema.SAMPLE_ID] == [ids[r] for r in accepted_rows]
    assert assignments[schema.SAMPLE_ID] == selection[schema.SAMPLE_ID]
    assert sorted(rejected[schema.REASON]) == sorted(reason for reason, _ in bad.values())
    assert len(selection[schema.SAMPLE_ID]) + len(rejected[schema.SAMPLE_ID]) == len(ids)
    assert len(set(selection[schema.SAMPLE_ID])) == len(selection[schema.SAMPLE_ID])

    # the outputs are exactly what the in-memory core gives on the accepted rows
    x = vectors[accepted_rows]
    km = spherical_kmeans(x, 6, iterations=10, seed=1234)
    core = select_from_clusters(x, km.assignments, km.centroids, num_layers=2, fraction=0.25)
    assert np.array_equal(centroids, km.centroids) and centroids.dtype == np.float32
    assert assignments[schema.CLUSTER] == list(km.assignments)
    assert list(np.flatnonzero(selection[schema.SELECTED])) == list(core.selected)
    assert summary["quota"] == list(core.clusters.quota)
    assert sum(selection[schema.SELECTED]) == int(0.25 * len(accepted_rows)) == manifest["health"]["budget"]
    assert manifest["counts"] == {"records": len(ids), "rejected": 3, "selected": len(core.selected),
                                  "embedded": 0, "reused": 0, "reused_from_this_output": 0,
                                  "reused_from_previous": 0, "truncated": 0}
    assert manifest["health"]["rejected_by_reason"]["duplicate sample_id"] == 1


def test_yaml_config_and_flag_override(storage, tmp_path):
    emb_uri, vectors, _, accepted_rows, _ = write_corpus(storage, n=120)
    config = tmp_path / "job.yaml"
    config.write_text("layers: [3, 7]\ncluster:\n  clusters: 3\n  iterations: 5\nselect:\n  fraction: 0.5\n")
    out = io.join(storage, "yaml-run")
    assert main(["select", "--embeddings", emb_uri, "--output", out, "--config", str(config),
                 "--fraction", "0.1"]) == 0
    manifest = io.read_json(io.join(out, schema.MANIFEST_PATH))
    assert manifest["config"]["select"]["fraction"] == 0.1
    assert manifest["config"]["cluster"]["clusters"] == 3
    x = vectors[accepted_rows]  # the flag's fraction (0.1), the file's K and iterations
    km = spherical_kmeans(x, 3, iterations=5, seed=1234)
    core = select_from_clusters(x, km.assignments, km.centroids, num_layers=2, fraction=0.1)
    assert len(core.selected) > 0 and manifest["counts"]["selected"] == len(core.selected)
    selection = io.read_parquet(io.join(out, schema.SELECTION_PATH)).column(schema.SELECTED).to_pylist()
    assert list(np.flatnonzero(selection)) == list(core.selected)


@pytest.mark.parametrize("argv, message", [
    (["--fraction", "2"], "select.fraction must lie in [0, 1], got 2.0"),
    (["--clusters", "0"], "cluster.clusters must be at least 1"),
    (["--layers", "3,x"], "layers must be comma-separated integers"),
    (["--layers", "3,7,11"], "not a multiple of 2 * 3 layers"),
])
def test_bad_configuration_is_one_line(storage, capsys, argv, message):
    emb_uri, *_ = write_corpus(storage, n=60)
    code = main(["select", "--embeddings", emb_uri, "--output", io.join(storage, "bad"), "--layers", LAYERS,
                 "--clusters", "2", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert err[-1].startswith("coincide-ray: error:") and message in err[-1]
    assert not any("Traceback" in line for line in err)
    assert not io.exists(io.join(storage, "bad", schema.MANIFEST_PATH))


def test_missing_input_and_bad_yaml(storage, tmp_path, capsys):
    assert main(["select", "--embeddings", io.join(storage, "nowhere"), "--output", io.join(storage, "o")]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    config = tmp_path / "job.yaml"
    config.write_text("select:\n  fractoin: 0.3\n")
    assert main(["select", "--embeddings", "x", "--output", "y", "--config", str(config)]) == 2
    assert "unknown configuration key(s): select.fractoin" in capsys.readouterr().err


def test_input_without_embedding_column(storage, capsys):
    io.write_parquet(pa.table({"sample_id": ["a"]}), io.join(storage, "e", "part-0.parquet"))
    assert main(["select", "--embeddings", io.join(storage, "e"), "--output", io.join(storage, "o"),
                 "--layers", LAYERS]) == 2
    assert "lacks column(s) embedding" in capsys.readouterr().err


def test_all_rows_bad_is_one_clear_line(storage, capsys):
    table = pa.table({"sample_id": ["a", "b"], "embedding": pa.array([None, [float("nan")] * 4],
                                                                      pa.list_(pa.float32()))})
    io.write_parquet(table, io.join(storage, "e", "part-0.parquet"))
    assert main(["select", "--embeddings", io.join(storage, "e"), "--output", io.join(storage, "o"),
                 "--layers", "1"]) == 2
    assert "no usable embeddings" in capsys.readouterr().err


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit):
        main(["select", "--help"])
    assert "examples:" in capsys.readouterr().out


def test_centroids_load_without_pickle(tmp_path):
    io.write_npy(np.eye(3, dtype=np.float32), str(tmp_path / "c.npy"))
    raw = (tmp_path / "c.npy").read_bytes()
    assert b"pickle" not in raw and np.array_equal(io.read_npy(str(tmp_path / "c.npy")), np.eye(3))


def test_strategies_share_the_clusters_and_stale_ones_are_removed(storage, capsys):
    from coincide_ray.select.strategies import choose

    emb_uri, vectors, ids, accepted_rows, _ = write_corpus(storage, n=160)
    out = io.join(storage, "strategies")
    base = ["select", "--embeddings", emb_uri, "--output", out, "--fraction", "0.25", "--clusters", "5",
            "--layers", LAYERS, "--iterations", "6"]
    assert main(base) == 0
    alone = io.read_parquet(io.join(out, schema.SELECTION_PATH))
    assert main(base + ["--strategy", "coincide,random,no-density,coincide-random-within"]) == 0
    assert "re-budgeted from the rankings" in capsys.readouterr().err  # no worker ranked anything again
    manifest = io.read_json(io.join(out, schema.MANIFEST_PATH))
    main_selection = io.read_parquet(io.join(out, schema.SELECTION_PATH))
    assert main_selection.equals(alone)  # selection/selection.parquet stays COINCIDE's
    summary = io.read_parquet(io.join(out, schema.SUMMARY_PATH))
    rank = main_selection.column(schema.RANK).to_numpy(zero_copy_only=False)
    assignments = main_selection.column(schema.CLUSTER).to_numpy()
    for strategy in ("coincide", "random", "no-density", "coincide-random-within"):
        table = io.read_parquet(io.join(out, schema.strategy_paths(strategy)[0]))
        assert table.column(schema.SAMPLE_ID).equals(main_selection.column(schema.SAMPLE_ID))
        expected = choose(strategy, rank=np.nan_to_num(rank, nan=-1).astype(np.int64), assignments=assignments,
                          transfer=summary.column("transferability").to_numpy(),
                          density=summary.column("density").to_numpy(), fraction=0.25, temperature=0.1, seed=1234)
        got = np.flatnonzero(table.column(schema.SELECTED).to_numpy(zero_copy_only=False))
        assert got.tolist() == expected.selected.tolist(), strategy
        assert manifest["strategies"][strategy]["selected"] == len(got)
        assert manifest["paths"][f"{strategy}/selection"] == schema.strategy_paths(strategy)[0]  # within the output
    coincide = io.read_parquet(io.join(out, schema.strategy_paths("coincide")[0])).column(schema.SELECTED)
    assert coincide.equals(main_selection.column(schema.SELECTED))
    assert "<h2>Strategies</h2>" in io.read_bytes(io.join(out, schema.REPORT_PATH)).decode()

    assert main(base + ["--strategy", "uniform"]) == 0  # the others are no longer asked for: gone
    for strategy in ("coincide", "random", "no-density", "coincide-random-within"):
        assert not io.exists(io.join(out, schema.strategy_paths(strategy)[0]))
    assert io.exists(io.join(out, schema.strategy_paths("uniform")[0]))
    assert list(io.read_json(io.join(out, schema.MANIFEST_PATH))["strategies"]) == ["uniform"]
    assert main(base + ["--strategy", "best"]) == 2
    assert "unknown strategy 'best'" in capsys.readouterr().err


def test_a_second_run_into_an_output_another_live_run_holds_is_refused(tmp_path, capsys):
    import socket
    import subprocess
    import sys

    emb_uri, *_ = write_corpus(str(tmp_path), n=120)
    out = str(tmp_path / "out")
    argv = ["select", "--embeddings", emb_uri, "--output", out, "--layers", "3,7", "--clusters", "4",
            "--iterations", "3", "--fraction", "0.2"]
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    try:  # a live run of another process on this host holds the lease
        io.write_json({"run_id": "someone-else", "host": socket.gethostname(), "pid": holder.pid,
                       "started": "2026-12-02T00:00:00+00:00", "heartbeat": 0}, io.join(out, schema.IN_PROGRESS_PATH))
        capsys.readouterr()
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) >= 1 and "being written by another run" in err[-1] and "Traceback" not in "\n".join(err)
        assert not io.exists(io.join(out, schema.MANIFEST_PATH))
    finally:
        holder.kill()
        holder.wait()
    # its process is gone (a killed run): the lease is taken over and the run completes
    assert main(argv) == 0
    assert not io.exists(io.join(out, schema.IN_PROGRESS_PATH))
    # another host's lease with a fresh heartbeat is live too; an old heartbeat is not
    import time

    lease = {"run_id": "elsewhere", "host": "another-host", "pid": 1, "started": "x"}
    io.write_json({**lease, "heartbeat": time.time()}, io.join(out, schema.IN_PROGRESS_PATH))
    assert main(argv) == 2
    io.write_json({**lease, "heartbeat": time.time() - 3600}, io.join(out, schema.IN_PROGRESS_PATH))
    assert main(argv) == 0
