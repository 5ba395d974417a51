"""kill -9 of the driver in the middle of a run, then the same command again: the run
completes, finished embedding blocks are not rewritten, and the outputs equal those of an
uninterrupted run. The driver is parked at a known point first (coincide_ray.holds), so
no timing decides where it dies."""

import os
import signal
import subprocess
import sys
import time

import pytest
import ray
from embeddings_corpus import write_corpus as write_embeddings
from test_embed_stage import job_yaml

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.toy.corpus import write_corpus
from coincide_ray.holds import VARIABLE

CONTRACT = [schema.CENTROIDS_PATH, schema.ASSIGNMENTS_PATH, schema.SUMMARY_PATH, schema.SELECTION_PATH,
            schema.REJECTED_PATH]


def start_driver(argv: list[str], log, hold: str) -> subprocess.Popen:
    """`coincide-ray ...` in its own process group, joined to the test session's Ray, held
    at `hold` (coincide_ray.holds)."""
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address, VARIABLE: hold}
    return subprocess.Popen([sys.executable, "-m", "coincide_ray.cli", *argv], env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)


def kill_when(process: subprocess.Popen, ready, timeout: float = 600) -> None:
    """Wait (the deadline only guards a hang) until `ready()`, then kill -9 the driver's
    process group. The run is held, so nothing moves on while the test waits."""
    deadline = time.monotonic() + timeout
    while not ready():
        assert process.poll() is None, "the driver ended before it could be killed"
        assert time.monotonic() < deadline, "the driver never reached the point to kill it at"
        time.sleep(0.2)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()


def contract_bytes(output: str) -> dict[str, bytes]:
    return {path: io.read_bytes(io.join(output, path)) for path in CONTRACT}


@pytest.mark.slow
def test_driver_killed_mid_embedding(tmp_path, tiny_model):
    base = str(tmp_path)
    write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 60, seed=7)
    argv = ["run", "--input", io.join(base, "corpus", "records.json"), "--image-root", io.join(base, "corpus"),
            "--model", tiny_model, "--layers", "1,3,4", "--clusters", "3", "--iterations", "5",
            "--config", job_yaml(tmp_path, "job", block_records=4, batch_size=2)]
    killed = io.join(base, "killed")
    parts = os.path.join(killed, "embeddings")

    def written() -> list[str]:
        return sorted(p for p in os.listdir(parts) if p.endswith(".parquet")) if os.path.isdir(parts) else []

    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log:  # blocks 0-2 are published, every later one is held
        kill_when(start_driver([*argv, "--output", killed], log, "embed-block:3"),
                  lambda: len(written()) == 3 and b"test hold: block" in log_path.read_bytes())
    survivors = {p: (os.stat(os.path.join(parts, p)).st_mtime_ns, open(os.path.join(parts, p), "rb").read())
                 for p in written()}
    assert sorted(survivors) == [f"part-{i:06d}.parquet" for i in range(3)]
    assert not io.exists(io.join(killed, schema.MANIFEST_PATH))

    assert main([*argv, "--output", killed]) == 0
    for name, (mtime, data) in survivors.items():  # reused unchanged, not rewritten
        path = os.path.join(parts, name)
        assert os.stat(path).st_mtime_ns == mtime and open(path, "rb").read() == data
    manifest = io.read_json(io.join(killed, schema.MANIFEST_PATH))
    assert manifest["counts"]["embedded"] < manifest["counts"]["records"] - manifest["counts"]["rejected"]

    clean = io.join(base, "clean")
    assert main([*argv, "--output", clean]) == 0
    assert contract_bytes(killed) == contract_bytes(clean)
    assert io.read_bytes(io.join(killed, schema.SELECTED_RECORDS_PATH)) == \
        io.read_bytes(io.join(clean, schema.SELECTED_RECORDS_PATH))


@pytest.mark.slow
def test_driver_killed_mid_kmeans(tmp_path):
    emb_uri, *_ = write_embeddings(str(tmp_path), n=3000)
    # 40 iterations, held before the 20th: the hold, not the run's length, puts the kill mid-k-means
    argv = ["select", "--embeddings", emb_uri, "--layers", "3,7", "--clusters", "40", "--iterations", "40"]
    killed = str(tmp_path / "killed")
    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log:
        driver = start_driver([*argv, "--output", killed], log, "kmeans-iteration:20")
        kill_when(driver, lambda: b"test hold: k-means before iteration 20" in log_path.read_bytes())
    assert not io.exists(io.join(killed, schema.ASSIGNMENTS_PATH))

    assert main([*argv, "--output", killed]) == 0
    clean = str(tmp_path / "clean")
    assert main([*argv, "--output", clean]) == 0
    assert contract_bytes(killed) == contract_bytes(clean)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_mid_embed_ends_in_one_line(tmp_path, tiny_model, signum):
    # Ctrl-C or a scheduler's SIGTERM while the model actor works: one line, exit 128 + signal,
    # no Python traceback and no C++ stack dump; a rerun then resumes
    base = str(tmp_path)
    write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 8, seed=5, broken=False)
    argv = ["embed", "--input", io.join(base, "corpus", "records.json"), "--image-root", io.join(base, "corpus"),
            "--model", tiny_model, "--layers", "1", "--output", io.join(base, "out"),
            "--config", job_yaml(tmp_path, "job", block_records=4, batch_size=2)]
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log:
        driver = start_driver(argv, log, "embed-model:1")
        deadline = time.monotonic() + 300
        while "test hold: model actor holds block 1" not in log_path.read_text():
            assert driver.poll() is None and time.monotonic() < deadline, log_path.read_text()[-2000:]
            time.sleep(0.2)
        os.kill(driver.pid, signum)
        code = driver.wait(timeout=120)
    text = log_path.read_text()
    assert code == 128 + signum, text[-2000:]
    assert "Traceback" not in text and "SIGTERM received" not in text and "KeyboardInterrupt" not in text, text[-3000:]
    last = text.strip().splitlines()[-1]
    assert last.startswith(f"coincide-ray: stopped by {signal.Signals(signum).name}"), text[-2000:]
    assert io.exists(io.join(base, "out", schema.IN_PROGRESS_PATH))  # what a stopped run leaves says so


@pytest.mark.slow
def test_part_files_appear_while_preparation_runs_and_survive_a_kill(tmp_path, tiny_model, capsys):
    """A preparer holds block 3 and every later one: blocks 0-2 must reach storage while
    preparation is still running (before, the writer waited for a CPU the pools held until
    every block was prepared, and a kill then lost all the work). kill -9, then the same
    command embeds only the blocks that were missing."""
    base = str(tmp_path)
    write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 40, seed=8, broken=False)
    argv = ["embed", "--input", io.join(base, "corpus", "records.json"), "--image-root", io.join(base, "corpus"),
            "--model", tiny_model, "--layers", "1,3", "--output", io.join(base, "out"),
            "--config", job_yaml(tmp_path, "job", block_records=4, batch_size=2)]
    parts = os.path.join(base, "out", "embeddings")

    def written() -> list[str]:
        return sorted(p for p in os.listdir(parts) if p.endswith(".parquet")) if os.path.isdir(parts) else []

    log_path = tmp_path / "driver.log"
    with open(log_path, "wb") as log:
        kill_when(start_driver(argv, log, "embed-prepare:3"),
                  lambda: len(written()) == 3 and b"test hold: preparer holds block 3" in log_path.read_bytes(),
                  timeout=300)
    survivors = {p: os.stat(os.path.join(parts, p)).st_mtime_ns for p in written()}
    assert sorted(survivors) == [f"part-{i:06d}.parquet" for i in range(3)]
    capsys.readouterr()
    assert main(argv) == 0
    assert "40 records in 10 blocks; 3 finished and unchanged, 7 to embed" in capsys.readouterr().err
    for name, mtime in survivors.items():  # kept, not rewritten
        assert os.stat(os.path.join(parts, name)).st_mtime_ns == mtime
    assert len(written()) == 10
