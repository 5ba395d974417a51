"""The embedding pool is planned from what the run asks for and what the cluster can reach:
model actors asking for GPUs autoscale up to one per GPU; a GPU run waits for its GPUs and
gives up in one line. Planned against Ray's multi-node simulator (ray.cluster_utils.Cluster: one
raylet per simulated node on this machine, GPUs declared on a node), in a process of its
own, since the test session's Ray is already running in this one."""

import json
import subprocess
import sys

PLAN = r"""
import json, ray
from ray.cluster_utils import Cluster
from coincide_ray.config import EmbedConfig
from coincide_ray.embed.stage import ResourcesUnavailable, plan_pool, wait_for

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
plans = {}
try:
    ray.init(address=cluster.address, configure_logging=False)
    plans["cpu only"] = plan_pool(EmbedConfig(), blocks=10).__dict__
    gpu_plan = plan_pool(EmbedConfig(device="gpu"), blocks=10)
    plans["gpu asked, none here"] = gpu_plan.__dict__
    said = []
    try:
        wait_for(gpu_plan.wanted(), 1.0, progress=said.append)
    except ResourcesUnavailable as error:
        plans["gave up"] = str(error)
    cluster.add_node(num_cpus=3, num_gpus=2)  # a GPU node: Ray schedules against its GPUs for real
    cluster.wait_for_nodes()
    plans["waited"] = wait_for(gpu_plan.wanted(), 1.0)
    plans["two gpus"] = plan_pool(EmbedConfig(), blocks=10).__dict__
    plans["two gpus, one block"] = plan_pool(EmbedConfig(), blocks=1).__dict__
    plans["two gpus, one actor asked"] = plan_pool(EmbedConfig(actors=1, prepare_workers=2), blocks=10).__dict__
    plans["half a gpu each"] = plan_pool(EmbedConfig(gpus_per_actor=0.5), blocks=10).__dict__
    plans["forced cpu"] = plan_pool(EmbedConfig(device="cpu"), blocks=10).__dict__
finally:
    ray.shutdown()
    cluster.shutdown()
print(json.dumps(plans))
"""


def test_model_actors_ask_for_gpus_and_a_gpu_run_waits_for_them():
    out = subprocess.run([sys.executable, "-c", PLAN], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    plans = json.loads(out.stdout.strip().splitlines()[-1])
    plan = lambda device, actors, gpus, threads, preparers: {  # noqa: E731
        "device": device, "actors": list(actors), "gpus": gpus, "threads": threads, "preparers": list(preparers)}
    assert plans["cpu only"] == plan("cpu", (1, 1), 0.0, 1, (1, 1))
    # GPUs asked for on a cluster that has none: planned for GPUs all the same, then the wait
    # ends in one line naming what could not be placed
    assert plans["gpu asked, none here"] == plan("gpu", (1, 1), 1.0, 0, (1, 1))
    assert plans["gave up"].startswith("waited 1 s for 1 model actor(s) of 1 GPU each")
    assert "\n" not in plans["gave up"] and "1 CPU" in plans["gave up"]
    assert plans["waited"] == 0.0  # the GPU node has joined: nothing to wait for
    # 4 CPUs, 2 GPUs: from one model actor up to one per GPU, holding no CPU; the CPUs prepare
    assert plans["two gpus"] == plan("gpu", (1, 2), 1.0, 0, (1, 4))
    assert plans["two gpus, one block"] == plan("gpu", (1, 1), 1.0, 0, (1, 1))
    assert plans["two gpus, one actor asked"] == plan("gpu", (1, 1), 1.0, 0, (2, 2))
    assert plans["half a gpu each"] == plan("gpu", (1, 4), 0.5, 0, (1, 4))
    assert plans["forced cpu"] == plan("cpu", (1, 1), 0.0, 4, (1, 3))
