"""Embedding-stage throughput: the Ray pipeline against a bare loop of the same model.

    python jobs/bench/bench_embed.py            # the figure of record (BENCHMARKS.md)
    python jobs/bench/bench_embed.py --quick    # small sizes: checks the script works

The bare loop runs the model in this process, with every core, over batches prepared
beforehand (no decoding, no tokenising, no I/O): the limit the pipeline can approach.
The pipeline runs on a local Ray; its steady-state rate is measured from the first block
written to the last, and its end-to-end rate (actor start, model load included) is shown too.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time

import torch
from benchkit import report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--records", type=int, default=None)
    args = parser.parse_args()
    records = args.records or (48 if args.quick else 480)
    hidden, layers, image = (64, 4, 32) if args.quick else (512, 8, 64)

    import ray

    from coincide_ray.config import EmbedConfig, JobConfig
    from coincide_ray.toy.corpus import write_corpus
    from coincide_ray.embed.model import load_model
    from coincide_ray.embed.msa import extract_msa_embeddings
    from coincide_ray.embed.preprocess import Preprocessor
    from coincide_ray.embed.stage import plan_blocks, run_embed
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    base = tempfile.mkdtemp(prefix="bench-embed-")
    write_corpus(f"{base}/corpus/records.json", f"{base}/corpus", records, seed=0, image_size=image,
                 text_only_share=0.0, broken=False)
    model_dir = str(build_tiny_checkpoint(f"{base}/model", "llava", hidden=hidden, layers=layers,
                                          heads=8 if hidden >= 256 else 2, image_size=image))
    chosen = tuple(range(1, layers, 2))
    embed = EmbedConfig(block_records=16, batch_size=8)
    config = JobConfig(output=f"{base}/out", input=f"{base}/corpus/records.json", image_root=f"{base}/corpus",
                       model=model_dir, layers=chosen, embed=embed)
    print(json.dumps({"machine": platform.machine(), "cpus": os.cpu_count(), "torch": torch.__version__,
                      "records": records, "hidden": hidden, "decoder_layers": layers, "image": image,
                      "layers_pooled": list(chosen), "block_records": embed.block_records,
                      "batch_size": embed.batch_size}), flush=True)

    # Bare loop: same model, same batches, prepared beforehand.
    loaded = load_model(model_dir, embed)
    from transformers import AutoProcessor

    pre = Preprocessor(AutoProcessor.from_pretrained(model_dir), image_root=config.image_root,
                       batch_size=embed.batch_size, max_image_pixels=embed.max_image_pixels)
    batches = [b for i, block in enumerate(plan_blocks(config.input, embed.block_records))
               for b in pre.prepare(i, block).batches]
    extract_msa_embeddings(loaded.model, batches[0].inputs, chosen)  # warm-up
    start = time.perf_counter()
    for batch in batches:
        extract_msa_embeddings(loaded.model, batch.inputs, chosen)
    bare = records / (time.perf_counter() - start)

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False)
    written: list[float] = []  # when each block's file was published

    def progress(message: str) -> None:
        if "written" in message:
            written.append(time.perf_counter())

    start = time.perf_counter()
    run_embed(config, progress=progress)
    total = time.perf_counter() - start
    ray.shutdown()
    blocks = len(written)
    steady = (blocks - 1) * embed.block_records / (written[-1] - written[0]) if blocks > 1 else float("nan")
    end_to_end = records / total
    for name, value, target in [("embed_pipeline_steady_vs_bare", steady, 0.8),
                                ("embed_pipeline_end_to_end_vs_bare", end_to_end, None)]:
        ratio = value / bare
        report(name, value, "samples/s", bare, ratio, f">= {target}" if target else None,
               target is None or ratio >= target, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
