"""The embedding pool is planned from what the cluster has: one model actor per GPU where
there are GPUs. Planned against Ray's multi-node simulator (ray.cluster_utils.Cluster: one
raylet per simulated node on this machine, GPUs declared on a node), in a process of its
own, since the test session's Ray is already running in this one."""

import json
import subprocess
import sys

PLAN = r"""
import json, ray
from ray.cluster_utils import Cluster
from coincide_ray.config import EmbedConfig
from coincide_ray.embed.stage import plan_pool

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
plans = {}
try:
    ray.init(address=cluster.address, configure_logging=False)
    plans["cpu only"] = plan_pool(EmbedConfig()).__dict__
    cluster.add_node(num_cpus=3, num_gpus=2)  # a GPU node: Ray schedules against its GPUs for real
    cluster.wait_for_nodes()
    plans["two gpus"] = plan_pool(EmbedConfig()).__dict__
    plans["two gpus, one actor asked"] = plan_pool(EmbedConfig(actors=1, prepare_workers=2)).__dict__
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps(plans))
"""


def test_one_model_actor_per_gpu_and_the_cpus_prepare():
    out = subprocess.run([sys.executable, "-c", PLAN], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plans = json.loads(out.stdout.strip().splitlines()[-1])
    assert plans["cpu only"] == {"actors": 1, "gpus": 0.0, "threads": 1, "preparers": 1}
    # 4 CPUs, 2 GPUs: a model actor per GPU holding no CPU, the CPUs left (but one) prepare
    assert plans["two gpus"] == {"actors": 2, "gpus": 1.0, "threads": 0, "preparers": 3}
    assert plans["two gpus, one actor asked"] == {"actors": 1, "gpus": 1.0, "threads": 0, "preparers": 2}
