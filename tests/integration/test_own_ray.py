"""The command line starts a Ray of its own unless told which cluster to join: it never
joins whatever Ray happens to run on the machine (another user's, a test's)."""

import json
import subprocess
import sys

import pytest
from embeddings_corpus import write_corpus
from ray_head import RayHead

from coincide_ray import io, schema

DRIVERS = "import json, ray; ray.init(configure_logging=False); " \
          "print(json.dumps([j['DriverPid'] for j in ray._private.state.jobs()]))"


@pytest.mark.slow
def test_the_cli_does_not_join_a_ray_it_was_not_pointed_at(tmp_path):
    emb, *_ = write_corpus(str(tmp_path), n=60)
    out = str(tmp_path / "out")
    with RayHead() as head:
        driver = subprocess.Popen([sys.executable, "-m", "coincide_ray.cli", "select", "--embeddings", emb,
                                   "--output", out, "--layers", "3,7", "--clusters", "2", "--iterations", "2"],
                                  env=head.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        log, _ = driver.communicate(timeout=300)
        assert driver.returncode == 0, log[-3000:]
        joined = subprocess.run([sys.executable, "-c", DRIVERS], env={**head.env, "RAY_ADDRESS": head.address},
                                capture_output=True, text=True, timeout=120)
        drivers = json.loads(joined.stdout.strip().splitlines()[-1])
    assert driver.pid not in drivers, "the CLI ran its job on a Ray it was not pointed at"
    assert io.exists(io.join(out, schema.MANIFEST_PATH))


OWN_RAY = """
import json, os, psutil
os.environ.pop("RAY_ADDRESS", None)
from coincide_ray.cli import start_ray
started = start_ray(None)
print(json.dumps([started, [" ".join(p.cmdline()) for p in psutil.Process().children(recursive=True)]]))
"""


def test_the_cli_starts_its_own_ray_without_the_dashboard():
    # A Ray of the run's own ends with the run: a dashboard there would cost every run its start
    # (about 3 CPU-seconds) for a page gone when the run ends. Watching a run is what a head is for.
    out = subprocess.run([sys.executable, "-c", OWN_RAY], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    started, processes = json.loads(out.stdout.strip().splitlines()[-1])
    assert started and any("raylet" in command for command in processes), processes
    # the dashboard's pages are served by module processes (ray-dashboard-JobHead-0, ...); without
    # the dashboard Ray keeps only its usage-stats module, inside its own process
    assert not any(command.startswith("ray-dashboard-") for command in processes), processes
