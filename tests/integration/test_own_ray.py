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
