"""The cluster manifests, the launcher config and the image definition: they parse, name
what they must, and stay in step with the project (Ray version, entrypoints, package)."""

import re
import shlex
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
INFRA = ROOT / "infra"


def load(name):
    return yaml.safe_load((INFRA / name).read_text())


def installed_ray_version():
    from importlib import metadata

    return metadata.version("ray")


def pods(spec):
    yield spec["headGroupSpec"]["template"]["spec"]
    for group in spec["workerGroupSpecs"]:
        yield group["template"]["spec"]


def check_cluster_spec(spec):
    image_tags = set()
    for pod in pods(spec):
        assert pod["serviceAccountName"] == "coincide-ray"  # S3 through the service account
        for container in pod["containers"]:
            image_tags.add(container["image"].rsplit(":", 1)[1])
            env = {e["name"] for e in container.get("env", [])}
            assert not env & {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}  # no keys in pods
    gpu_groups = [g for g in spec["workerGroupSpecs"]
                  if g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu")]
    assert gpu_groups, "a GPU worker group"
    assert spec["rayVersion"] == installed_ray_version()
    assert image_tags == {"0.1.0"}


def test_rayjob():
    job = load("kuberay/rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    words = shlex.split(job["spec"]["entrypoint"])
    assert words[0] == "python" and Path(words[1]).name == "select_job.py"
    assert (ROOT / "jobs" / "select_job.py").exists()
    flags = {w for w in words if w.startswith("--")}
    assert {"--input", "--image-root", "--model", "--output"} <= flags
    from coincide_ray.cli import build_parser

    args = build_parser().parse_args(["run", *words[2:]])  # exits on a flag the CLI does not have
    assert args.clusters == 10000 and args.output.startswith("s3://")
    assert args.device == "gpu" and Path(args.config).name == "gpu-plan.yaml"  # the GPU plan is stated
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    check_cluster_spec(job["spec"]["rayClusterSpec"])


def test_raycluster_and_service_account():
    cluster = load("kuberay/raycluster.yaml")
    assert cluster["apiVersion"] == "ray.io/v1" and cluster["kind"] == "RayCluster"
    check_cluster_spec(cluster["spec"])
    account = load("kuberay/serviceaccount.yaml")
    assert account["kind"] == "ServiceAccount" and account["metadata"]["name"] == "coincide-ray"
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]


def test_the_gpu_plan_asks_for_what_the_gpu_nodes_have():
    from coincide_ray.config import JobConfig

    plan = JobConfig.from_dict({"output": "s3://b/o", **load("gpu-plan.yaml")})
    launcher = load("aws/cluster.yaml")["available_node_types"]["gpu_worker"]
    assert plan.embed.device == "gpu" and plan.embed.gpus_per_actor == launcher["resources"]["GPU"]
    assert plan.embed.max_actors == launcher["max_workers"] and plan.embed.wait_for_resources_s >= 600
    assert plan.cluster.workers == 0  # one shard worker per node


def test_cluster_launcher():
    config = load("aws/cluster.yaml")
    assert config["provider"]["type"] == "aws"
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    assert any(t["resources"].get("GPU", 0) >= 1 for t in types.values())
    assert all("IamInstanceProfile" in t["node_config"] for t in types.values())  # S3 without keys
    assert config["docker"]["image"].endswith(":0.1.0")
    assert any("coincide-ray" in command for command in config["setup_commands"])


def test_image_installs_this_package():
    lines = (INFRA / "image" / "Dockerfile").read_text().splitlines()
    base = next(line.split()[1] for line in lines if line.startswith("FROM "))
    assert base.startswith(f"rayproject/ray:{installed_ray_version()}-")  # the cluster's Ray version
    copied = {line.split()[-2] for line in lines if line.startswith("COPY ")} | {
        word for line in lines if line.startswith("COPY ") for word in line.split()[2:-1]}
    assert {"pyproject.toml", "coincide_ray", "jobs"} <= copied
    run = " ".join(line for line in lines if line.startswith(("RUN", "    ")))
    assert re.search(r'pip install [^&]*"\.\[gpu\]"', run)  # this package, from the copied sources
    assert "import coincide_ray" in run  # and the build checks that it imports
