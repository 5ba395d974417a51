"""The prepare stage (fetch, decode, template, tokenise) with images in S3 that answers
every request 40 ms late, against the same stage with no added delay.

A real S3 endpoint on loopback (moto's server) sits behind the tests' proxy
(tests/integration/faulty_s3.py), which adds `delay_s` to every request. The figure of
record is the prepare stage's images/s with the delay over its images/s without it, both
with the default number of requests in flight. Target: at least 0.7. The same ratio with
one request at a time (how images were fetched before) is shown beside it.

    python jobs/bench/bench_fetch.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from benchkit import machine, report

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests" / "integration"))

DELAY_S = 0.040


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    records = 64 if args.quick else 256

    import logging

    from faulty_s3 import FaultyProxy
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs every request

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    proxy = FaultyProxy(*server.get_host_and_port()).start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{proxy.port}", AWS_ACCESS_KEY_ID="testing",
                      AWS_SECRET_ACCESS_KEY="testing", AWS_DEFAULT_REGION="us-east-1")
    import boto3
    from transformers import AutoProcessor

    from coincide_ray import io
    from coincide_ray.config import EmbedConfig
    from coincide_ray.toy.corpus import write_corpus
    from coincide_ray.embed.preprocess import FETCH_IN_FLIGHT, Preprocessor
    from coincide_ray.embed.stage import plan_blocks
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    boto3.client("s3").create_bucket(Bucket="bench")
    local = tempfile.mkdtemp(prefix="bench-fetch-")
    write_corpus(f"{local}/corpus/records.json", f"{local}/corpus", records, seed=0, image_size=64,
                 text_only_share=0.0, broken=False)
    for path in sorted(Path(local, "corpus").rglob("*")):
        if path.is_file():
            io.write_bytes(f"s3://bench/corpus/{path.relative_to(Path(local, 'corpus'))}", path.read_bytes())
    model = str(build_tiny_checkpoint(f"{local}/model", "llava", layers=2, image_size=64))
    embed = EmbedConfig()
    [block] = plan_blocks(f"{local}/corpus/records.json", records)
    machine(records=records, delay_ms=DELAY_S * 1000, in_flight=FETCH_IN_FLIGHT, block_records=records)

    def images_per_s(delay: float, in_flight: int) -> float:
        proxy.delay_s = delay
        pre = Preprocessor(AutoProcessor.from_pretrained(model), image_root="s3://bench/corpus",
                           batch_size=embed.batch_size, batch_tokens=embed.batch_tokens,
                           max_image_pixels=embed.max_image_pixels, fetch_in_flight=in_flight)
        pre.prepare(0, block[:4])  # warm: connections, the processor's first call
        began = time.perf_counter()
        prepared = pre.prepare(0, block)
        seconds = time.perf_counter() - began
        assert not prepared.rejected, prepared.rejected
        return len(block) / seconds

    try:
        fast = images_per_s(0.0, FETCH_IN_FLIGHT)
        slow = images_per_s(DELAY_S, FETCH_IN_FLIGHT)
        fast_one = images_per_s(0.0, 1)
        slow_one = images_per_s(DELAY_S, 1)
    finally:
        proxy.stop()
        server.stop()
    report("prepare_images_per_s_no_delay", fast, "img/s", fast, 1.0, None, None, args.quick)
    report("prepare_images_per_s_40ms", slow, "img/s", fast, slow / fast, ">= 0.7", slow / fast >= 0.7, args.quick)
    report("prepare_images_per_s_40ms_one_at_a_time", slow_one, "img/s", fast_one, slow_one / fast_one, None, None,
           args.quick)


if __name__ == "__main__":
    main()
