"""What the README tells a user to do, for real: a head started with `ray start --head` on
loopback, the job and the nightly refresh sent with `ray job submit --working-dir .` from
the repository root over a corpus in S3 (moto on loopback), their status and logs read
with `ray job status` / `ray job logs`, a failing job, and the counters on the head's
Prometheus endpoint."""

import json
import re
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
from ray_head import RAY, RayHead

from coincide_ray import io, schema
from coincide_ray.holds import VARIABLE
from coincide_ray.toy.corpus import write_corpus

ROOT = Path(__file__).resolve().parents[2]


def ray_job(head: RayHead, command: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """`ray job <command> --address <dashboard> <args>` (the address before any `--`)."""
    return subprocess.run([RAY, "job", command, "--address", head.dashboard, *args], cwd=ROOT, env=head.env,
                          capture_output=True, text=True, timeout=timeout)


def submit(head: RayHead, entrypoint: list[str], *options: str) -> tuple[str, subprocess.CompletedProcess]:
    """`ray job submit --working-dir . <options> -- <entrypoint>`, waiting for the end unless
    `--no-wait` is among the options; (job id, result). Right after `ray start` the head's
    job agent may not be up yet; it says so, and the submission is tried again."""
    for _ in range(30):
        out = ray_job(head, "submit", "--working-dir", ".", *options, "--", *entrypoint)
        if "No available agent to submit job" not in out.stderr:
            break
        time.sleep(2)
    found = re.search(r"Job '([^']+)' submitted", out.stdout + out.stderr)
    assert found, out.stdout[-3000:] + out.stderr[-3000:]
    return found.group(1), out


def status(head: RayHead, job: str) -> str:
    """What `ray job status` prints, without its colours."""
    out = ray_job(head, "status", job)
    text = re.sub(r"\x1b\[[0-9;]*m", "", out.stdout + out.stderr)
    print(text)  # the status lines, for the record
    return text


def metric_values(port: int, names: list[str]) -> dict[str, list[float]]:
    """Each metric's values, one per label set (worker, job, reason), from the head's
    Prometheus endpoint."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    values: dict[str, list[float]] = {}
    for line in text.splitlines():
        for name in names:
            if re.match(rf"^(ray_)?{name}(_total)?[{{ ]", line):
                values.setdefault(name, []).append(float(line.rsplit(" ", 1)[1]))
    return values


@pytest.mark.slow
def test_ray_job_submit_from_the_repository_root(s3_endpoint, tmp_path, tiny_model):
    base = f"s3://coincide-test/jobs-{uuid.uuid4().hex[:8]}"
    records = write_corpus(io.join(base, "corpus", "records.json"), io.join(base, "corpus"), 16, seed=6)
    flags = ["--input", io.join(base, "corpus", "records.json"), "--image-root", io.join(base, "corpus"),
             "--model", tiny_model, "--layers", "1,3", "--clusters", "2", "--iterations", "3", "--fraction", "0.5"]
    with RayHead() as head:
        job, out = submit(head, ["python", "jobs/select_job.py", *flags, "--output", io.join(base, "run")])
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
        assert f"Job '{job}' succeeded" in status(head, job)
        logs = ray_job(head, "logs", job).stdout
        assert "k-means: K=2" in logs and "outputs under" in logs
        manifest = io.read_json(io.join(base, "run", schema.MANIFEST_PATH))
        assert manifest["counts"]["records"] == len(records) and manifest["counts"]["selected"] > 0

        # the refresh is held before its 4th k-means iteration (coincide_ray.holds, through the job's
        # runtime env): a gauge is exported only while its process lives (Ray 2.60 drops a finished
        # driver's gauges), so it is read from the head while the run is there
        release = tmp_path / "release"
        hold = json.dumps({"env_vars": {VARIABLE: f"kmeans-iteration:3:{release}"}})
        nightly, out = submit(head, ["python", "jobs/refresh.py", "--root", io.join(base, "nightly"),
                                     "--date", "2026-11-24", *flags, "--iterations", "4"],
                              "--no-wait", "--runtime-env-json", hold)
        deadline, gauge = time.monotonic() + 300, {}
        while time.monotonic() < deadline and not gauge.get("coincide_kmeans_iterations_done"):
            gauge = metric_values(head.metrics_port, ["coincide_kmeans_iterations_done"])  # one HTTP GET
            time.sleep(1)
        release.touch()
        ray_job(head, "logs", "--follow", nightly)  # returns when the job ends (one process, no polling)
        assert f"Job '{nightly}' succeeded" in status(head, nightly), ray_job(head, "logs", nightly).stdout[-3000:]
        assert io.read_json(io.join(base, "nightly", "latest.json"))["run"].endswith("runs/2026-11-24")

        failing, out = submit(head, ["python", "jobs/select_job.py", *flags, "--fraction", "2",
                                     "--output", io.join(base, "bad")])
        assert out.returncode != 0 and f"Job '{failing}' failed" in status(head, failing)
        last = ray_job(head, "logs", failing).stdout.strip().splitlines()[-1]
        assert last == "coincide-ray: error: select.fraction must lie in [0, 1], got 2.0"

        # the counters of the two runs that embedded (the refresh embedded the same records again)
        names = ["coincide_records_read", "coincide_records_embedded", "coincide_records_rejected"]
        deadline, values = time.monotonic() + 90, {}
        while time.monotonic() < deadline and len(values) < len(names):
            values = metric_values(head.metrics_port, names)
            time.sleep(3)
    print("metrics:", values)  # for the record
    accepted = manifest["counts"]["records"] - manifest["counts"]["rejected"]
    assert sum(values.get("coincide_records_read", [])) == 2 * len(records), values  # counters add up
    assert sum(values.get("coincide_records_embedded", [])) == 2 * accepted, values
    assert sum(values.get("coincide_records_rejected", [])) == 2 * manifest["counts"]["rejected"], values
    assert max(gauge.get("coincide_kmeans_iterations_done", [0])) == 3, gauge  # the held driver's, 3 done
