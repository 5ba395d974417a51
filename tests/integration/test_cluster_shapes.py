"""The job on the cluster shapes it ships for, on Ray's own multi-node simulator
(ray.cluster_utils.Cluster: one raylet per simulated node on this machine; a node can
declare GPUs that torch cannot see, so Ray schedules against them for real while the model
runs on CPU). Each scenario runs in a process of its own, since this test session's Ray is
already running in this one, and is compared with an uninterrupted run on that Ray.

Nodes are removed at known places: the run is held (coincide_ray.holds) until the test,
having removed the node, creates the release file; the same invocation then finishes."""

import json
import os
import subprocess
import sys

import pyarrow as pa
import pytest
from embeddings_corpus import write_corpus as write_embeddings

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.toy.corpus import write_corpus

COMMON = r"""
import json, os, sys, threading, time
import ray
from ray.cluster_utils import Cluster

def wait_until(condition, what, timeout=240):
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.2)

def actors(class_part):
    # (state, required resources, node) of every actor whose class name holds class_part, from
    # Ray's own actor table
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    found = []
    for raw in state._connect_and_get_accessor().get_actor_table(None, None):
        data = gcs_pb2.ActorTableData.FromString(raw)
        if class_part in data.class_name:
            found.append((gcs_pb2.ActorTableData.ActorState.Name(data.state), dict(data.required_resources),
                          data.address.node_id.hex()))
    return found
"""

LATE_GPUS = COMMON + r"""
from coincide_ray.config import JobConfig
from coincide_ray.embed.stage import run_embed
from coincide_ray.pipeline import EmbedStats, run_select

args = json.loads(sys.argv[1])
os.environ["COINCIDE_RAY_TEST_HOLD"] = f"embed-model:2:{args['release']}"
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
cluster.add_node(num_cpus=2)  # CPUs for preparing; no GPU anywhere yet
ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
said, done = [], {}
config = JobConfig.from_dict({"input": args["records"], "image_root": args["image_root"], "model": args["model"],
                              "output": args["output"], "embeddings": args["output"] + "/embeddings",
                              "layers": [1, 3], "cluster": {"clusters": 3, "iterations": 5},
                              "select": {"fraction": 0.3},
                              "embed": {"device": "gpu", "max_actors": 2, "block_records": 4, "batch_size": 2,
                                        "wait_for_resources_s": 240, "model_cache": args["cache"]}})

def job():  # the run, in a thread: Ray's simulator adds nodes only from the main thread
    try:
        result = run_embed(config, progress=said.append)
        done["embedded_at"] = time.monotonic()
        done["manifest"] = run_select(config, progress=said.append, embed=EmbedStats(
            result.embedded, result.seconds, result.truncated, result.resources))
    except BaseException as error:
        done["error"] = repr(error)

thread = threading.Thread(target=job, daemon=True)
thread.start()
# the GPU nodes join only once the run has planned its pool and is waiting for them
wait_until(lambda: any("embed: model on GPU" in line for line in said), "the GPU plan")
time.sleep(2.0)
gpu_nodes = [cluster.add_node(num_cpus=1, num_gpus=1) for _ in range(2)]
# then one of them is lost while its model actor is busy: blocks 0 and 1 are out, the
# model actors hold the others until the release file appears
parts = os.path.join(args["output"], "embeddings")
wait_until(lambda: os.path.isdir(parts) and len([n for n in os.listdir(parts) if n.endswith(".parquet")]) >= 2,
           "two published blocks")
wait_until(lambda: sum(state == "ALIVE" for state, _, _ in actors("ModelWorker")) >= 2, "two model actors")
before_loss = actors("ModelWorker")
removed_at = time.monotonic()
cluster.remove_node(gpu_nodes[1])
open(args["release"], "w").close()
thread.join(timeout=int(args.get("finish_s", 400)))
if "manifest" not in done:
    raise SystemExit(f"the run did not finish: {done.get('error', 'still running')}")
manifest = done["manifest"]
print(json.dumps({"said": said, "resources": manifest["resources"], "actors": actors("ModelWorker"),
                  "before_loss": before_loss, "loss_to_end_s": done["embedded_at"] - removed_at}))
ray.shutdown()
cluster.shutdown()
"""

NODE_LOST_IN_KMEANS = COMMON + r"""
from coincide_ray.config import JobConfig
from coincide_ray.pipeline import run_select

args = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
workers = [cluster.add_node(num_cpus=1) for _ in range(2)]  # three nodes with a CPU each
ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)

def select(output, progress):
    return run_select(JobConfig.from_dict({"embeddings": args["embeddings"], "output": output, "layers": [3, 7],
                                           "cluster": {"clusters": 6, "iterations": 8},
                                           "select": {"fraction": 0.25}}), progress=progress)

whole = select(args["output_whole"], lambda line: None)
os.environ["COINCIDE_RAY_TEST_HOLD"] = f"kmeans-iteration:3:{args['release']}"
said, events = [], {}

def operator():
    # the shards are on every node and k-means is running (it cannot pass iteration 3 before
    # the release): lose a node that holds a shard
    wait_until(lambda: any(" onto " in line for line in said), "the shards")
    events["removed_at"] = time.monotonic()
    cluster.remove_node(workers[0])
    open(args["release"], "w").close()

thread = threading.Thread(target=operator, daemon=True)
thread.start()
began = time.monotonic()
interrupted = select(args["output_lost"], said.append)
thread.join(timeout=5)
print(json.dumps({"said": said, "whole": whole["resources"], "lost": interrupted["resources"],
                  "seconds": time.monotonic() - began, "whole_seconds": sum(whole["timings_s"].values())}))
ray.shutdown()
cluster.shutdown()
"""

NODE_PREEMPTED_IN_KMEANS = COMMON + r"""
from coincide_ray.config import JobConfig
from coincide_ray.pipeline import run_select

args = json.loads(sys.argv[1])
# a head with no CPU (the driver's) and worker nodes of one CPU each, one shard worker on each
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
workers = [cluster.add_node(num_cpus=1) for _ in range(args["nodes"])]
ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
os.environ["COINCIDE_RAY_TEST_HOLD"] = f"kmeans-iteration:3:{args['release']}"
said = []

def operator():
    # a spot preemption: the node goes without warning, and Ray's node table lists it alive
    # until its heartbeats time out
    wait_until(lambda: any(" onto " in line for line in said), "the shards")
    cluster.remove_node(workers[0], allow_graceful=False)
    open(args["release"], "w").close()

threading.Thread(target=operator, daemon=True).start()
began = time.monotonic()
lost = run_select(JobConfig.from_dict({"embeddings": args["embeddings"], "output": args["output"], "layers": [3, 7],
                                       "cluster": {"clusters": 6, "iterations": 8}, "select": {"fraction": 0.25}}),
                  progress=said.append)
print(json.dumps({"said": said, "lost": lost["resources"], "seconds": time.monotonic() - began}))
ray.shutdown()
cluster.shutdown()
"""


def run_script(script: str, args: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", script, json.dumps(args)], capture_output=True, text=True,
                         timeout=600, env={**os.environ, "RAY_ADDRESS": ""})
    assert out.returncode == 0, "\n".join(line for line in out.stderr.splitlines()
                                          if "Warning" not in line)[-5000:]
    return json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])  # Ray logs too


def selection_of(output: str) -> list[tuple]:
    table = io.read_parquet(io.join(output, schema.SELECTION_PATH)).to_pydict()
    return sorted(zip(table[schema.SAMPLE_ID], table[schema.CLUSTER], table[schema.RANK], table[schema.SELECTED]))


@pytest.mark.slow
def test_gpu_nodes_that_join_late_and_one_lost_mid_embedding(tmp_path, tiny_model):
    records = str(tmp_path / "corpus" / "records.json")
    write_corpus(records, str(tmp_path / "corpus"), 24, seed=4)
    job = tmp_path / "job.yaml"
    job.write_text(f"embed:\n  block_records: 4\n  batch_size: 2\n  model_cache: {tmp_path / 'cache'}\n")
    reference = str(tmp_path / "reference")
    assert main(["run", "--input", records, "--image-root", str(tmp_path / "corpus"), "--model", tiny_model,
                 "--output", reference, "--layers", "1,3", "--clusters", "3", "--iterations", "5",
                 "--fraction", "0.3", "--config", str(job)]) == 0

    output = str(tmp_path / "cluster")
    seen = run_script(LATE_GPUS, {"records": records, "image_root": str(tmp_path / "corpus"), "model": tiny_model,
                                  "output": output, "cache": str(tmp_path / "cache"),
                                  "release": str(tmp_path / "release")})
    said = "\n".join(seen["said"])
    # planned for GPUs before any had joined, then waited for them
    assert "embed: model on GPU: 1 to 2 model actor(s), 1 GPU each" in said
    assert seen["resources"]["embed"]["device"] == "gpu" and seen["resources"]["embed"]["waited_s"] > 0
    # every model actor Ray was asked for wanted one GPU (Ray's own actor table)
    assert seen["before_loss"] and all(required.get("GPU") == 1.0 for _, required, _ in seen["actors"])
    alive = [node for state, _, node in seen["before_loss"] if state == "ALIVE"]
    assert len(alive) == 2 and len(set(alive)) == 2  # the pool grew to one actor per GPU node
    # the same invocation finished after the node loss, with the uninterrupted run's selection
    assert selection_of(output) == selection_of(reference)
    parts = sorted(os.listdir(os.path.join(output, "embeddings")))
    assert parts == sorted(os.listdir(os.path.join(reference, "embeddings")))  # no half-written file
    print(f"node lost mid-embedding: {seen['loss_to_end_s']:.1f} s from the loss to the end of embedding")


@pytest.mark.slow
def test_three_nodes_select_as_one_and_survive_losing_one_during_kmeans(tmp_path):
    written, *_ = write_embeddings(str(tmp_path), n=240)
    whole_table = pa.concat_tables([io.read_parquet(f) for f in io.list_files(written, (".parquet",))])
    embeddings = str(tmp_path / "four-files")  # as many files as shards, and one over
    for part in range(4):
        io.write_parquet(whole_table.slice(part * 60, 60), f"{embeddings}/part-{part:05d}.parquet")
    reference = str(tmp_path / "one-node")
    assert main(["select", "--embeddings", embeddings, "--output", reference, "--layers", "3,7", "--clusters", "6",
                 "--iterations", "8", "--fraction", "0.25"]) == 0

    seen = run_script(NODE_LOST_IN_KMEANS, {"embeddings": embeddings, "output_whole": str(tmp_path / "three"),
                                            "output_lost": str(tmp_path / "lost"),
                                            "release": str(tmp_path / "release")})
    whole, lost = seen["whole"]["select"], seen["lost"]["select"]
    assert whole["shard_workers"] == 3 and len(whole["nodes"]) == 3  # one shard worker per node
    assert selection_of(str(tmp_path / "three")) == selection_of(reference)
    # the driver receives one (K, D) int64 matrix and the counts per iteration, not one per worker
    k, d = 6, 2 * 2 * 8
    assert whole["driver_bytes_per_iteration"] == k * d * 8 + k * 8
    # a node lost during k-means: its shard rebuilt on a surviving node, the same selection
    assert len(lost["shards_replaced"]) == 1 and "k-means" in lost["shards_replaced"][0]
    assert selection_of(str(tmp_path / "lost")) == selection_of(reference)
    print(f"node lost in k-means: run took {seen['seconds']:.1f} s; {lost['shards_replaced'][0]}")


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [2, 3])
def test_a_node_preempted_without_warning_during_kmeans(tmp_path, nodes):
    written, *_ = write_embeddings(str(tmp_path), n=240)
    whole_table = pa.concat_tables([io.read_parquet(f) for f in io.list_files(written, (".parquet",))])
    embeddings = str(tmp_path / "files")
    for part in range(nodes):
        io.write_parquet(whole_table.slice(part * (240 // nodes), 240 // nodes), f"{embeddings}/part-{part:05d}.parquet")
    reference = str(tmp_path / "one-node")
    assert main(["select", "--embeddings", embeddings, "--output", reference, "--layers", "3,7", "--clusters", "6",
                 "--iterations", "8", "--fraction", "0.25"]) == 0
    seen = run_script(NODE_PREEMPTED_IN_KMEANS, {"embeddings": embeddings, "output": str(tmp_path / "lost"),
                                                 "nodes": nodes, "release": str(tmp_path / "release")})
    lost = seen["lost"]["select"]
    assert lost["shard_workers"] == nodes
    assert len(lost["shards_replaced"]) == 1 and "k-means" in lost["shards_replaced"][0]
    assert selection_of(str(tmp_path / "lost")) == selection_of(reference)
    print(f"node preempted in k-means ({nodes} nodes): run took {seen['seconds']:.1f} s; {lost['shards_replaced'][0]}")
