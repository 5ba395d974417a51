import os
import uuid

import pytest


@pytest.fixture(scope="session")
def s3_proxy():
    """A real S3 endpoint on loopback (moto's server) behind a fault-injecting proxy
    (faulty_s3.py; no faults unless a test asks), found through AWS_ENDPOINT_URL exactly as
    a user's endpoint would be."""
    from faulty_s3 import FaultyProxy
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = FaultyProxy(*server.get_host_and_port()).start()
    host, port = "127.0.0.1", proxy.port
    saved = {k: os.environ.get(k) for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                                            "AWS_DEFAULT_REGION")}
    os.environ.update(AWS_ENDPOINT_URL=f"http://{host}:{port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3

    boto3.client("s3").create_bucket(Bucket="coincide-test")
    yield proxy
    proxy.stop()
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def s3_endpoint(s3_proxy):
    return f"http://127.0.0.1:{s3_proxy.port}"


@pytest.fixture
def faults(s3_proxy):
    """The proxy in front of S3, with faults switched off again after the test."""
    yield s3_proxy
    s3_proxy.fault_every, s3_proxy.always_fail = 0, None


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path):
    """A fresh base URI: a local folder or a unique s3:// prefix."""
    if request.param == "local":
        return str(tmp_path)
    request.getfixturevalue("s3_endpoint")
    return f"s3://coincide-test/{uuid.uuid4().hex}"


@pytest.fixture(scope="session", autouse=True)
def ray_session(s3_endpoint):
    """One local Ray for every integration test. It starts before any test can start one
    (the CLI joins a running Ray) and after the S3 endpoint, so that its workers inherit
    AWS_ENDPOINT_URL and the test credentials."""
    import shutil
    import tempfile

    import ray

    # address="local": a Ray of this session's own, in its own temp dir, even when another
    # Ray runs on the machine or RAY_ADDRESS names one (plain ray.init() would join it).
    saved_address = os.environ.pop("RAY_ADDRESS", None)
    temp_dir = tempfile.mkdtemp(prefix="ray-tests-")
    # Idle workers are kept, not stopped after a second: the next test's tasks run in a worker
    # that has started and imported already, as a long job's tasks do.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             _temp_dir=temp_dir,
             _system_config={"idle_worker_killing_time_threshold_ms": 3_600_000, "num_workers_soft_limit": 6})
    yield
    ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)
    if saved_address is not None:
        os.environ["RAY_ADDRESS"] = saved_address


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory):
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("model"), "llava", layers=6))
