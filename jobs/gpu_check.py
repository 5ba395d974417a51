"""One command for any CUDA machine: the GPU figures of record, one line each.

    python jobs/gpu_check.py                      # on a CUDA machine: TinyLLaVA-2B shape, full sizes
    python jobs/gpu_check.py --device cpu --quick # the same code at toy sizes (the tests run this)

It builds a random-weight checkpoint shaped like TinyLLaVA-2.0B (a StableLM-2-1.6B-sized
decoder, hidden 2,048 x 24 layers; a SigLIP-so400m-sized tower, 729 image tokens) and prints:

- embedding samples/s and model-FLOP utilisation, through the real pipeline (Ray Data, the
  model actor on the GPU) and through a bare loop of the same model on the same batches;
- k-means seconds per Lloyd iteration at N = 200,000, D = 20,480, K = 10,000, the rows
  held on the GPU as float16 (the shard worker's code: `unit`, `CentroidIndex`, `Sums`);
- the GPU's vectors and selection against the CPU float32 path on the same records;
- projected H100-hours for all of LLaVA-665K (embedding + 50 k-means iterations).

Peak FLOP/s for the utilisation: H100/H200 SXM dense bf16, 989 TFLOP/s (`--peak-tflops`
for another GPU); on the CPU no utilisation is claimed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent / "bench"))  # benchkit.py
from benchkit import report  # noqa: E402

LLAVA_665K = 665_298
PAPER = dict(layers=(3, 7, 11, 15, 19), clusters=10_000, iterations=50)


def forward_flops(shape: dict, tokens: float) -> float:
    """FLOPs of one forward pass: 2 per weight per token in the decoder (attention scores
    included, at the mean length) and in the tower over its patches, plus the projector."""
    h, layers, inter = shape["hidden"], shape["layers"], shape["intermediate"]
    decoder = layers * (4 * h * h + 3 * h * inter) * 2 * tokens + layers * 2 * 2 * tokens * tokens * h
    v, vl, vi = shape["vision_hidden"], shape["vision_layers"], shape["vision_intermediate"]
    patches = (shape["image_size"] // shape["patch"]) ** 2
    tower = vl * (4 * v * v + 2 * v * vi) * 2 * patches + vl * 2 * 2 * patches * patches * v
    projector = 2 * (v * h + h * h) * patches
    return decoder + tower + projector


def kmeans_seconds_per_iteration(n: int, d: int, k: int, device: str) -> float:
    """One Lloyd step of a shard holding n float16 rows on `device`, chunk by chunk as the
    shard worker runs it (assignment, float32 products, exact int64 sums)."""
    import torch

    from coincide_ray.cluster.kmeans import CentroidIndex, Sums, unit
    from coincide_ray.cluster.stage import chunk_rows

    generator = torch.Generator(device=device).manual_seed(0)
    rows = torch.empty((n, d), dtype=torch.float16, device=device)
    for start in range(0, n, 8192):  # generated in pieces: no float32 copy of the whole
        part = rows[start : start + 8192]
        part.copy_(torch.randn(part.shape, generator=generator, device=device))
    centroids = unit(rows[torch.randperm(n, generator=generator, device=device)[:k]]).cpu().numpy()
    step = chunk_rows(d)

    def iteration():
        index, sums = CentroidIndex(centroids, device), Sums(k, d, device)
        for start in range(0, n, step):
            x_unit = unit(rows[start : start + step])
            cluster, _ = index.assign(x_unit)
            sums.add(x_unit, cluster)
        return sums.result()

    iteration()  # warm
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    began = time.perf_counter()
    iteration()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter() - began


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the path, claims nothing")
    parser.add_argument("--records", type=int, default=None)
    parser.add_argument("--peak-tflops", type=float, default=None)
    args = parser.parse_args()

    import ray
    import torch

    from coincide_ray.cluster.kmeans import spherical_kmeans
    from coincide_ray.config import EmbedConfig, JobConfig
    from coincide_ray.toy.corpus import write_corpus
    from coincide_ray.embed.model import load_model
    from coincide_ray.embed.msa import extract_msa_embeddings
    from coincide_ray.embed.preprocess import Preprocessor
    from coincide_ray.embed.stage import plan_blocks, run_embed
    from coincide_ray.toy.tiny import TINYLLAVA_2B, TINYLLAVA_QUICK, build_tinyllava_shaped
    from coincide_ray.select import select_from_clusters

    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: torch sees no CUDA device here; run with --device cpu --quick to check the path",
              file=sys.stderr)
        return 2
    quick = args.quick
    shape = TINYLLAVA_QUICK if quick else TINYLLAVA_2B
    records = args.records or (24 if quick else 1024)
    layers = (0, 1, 2, 3) if quick else PAPER["layers"]
    n, d, k = (2_000, 2 * len(layers) * shape["hidden"], 20) if quick else (200_000, 20_480, 10_000)
    name = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    peak = args.peak_tflops or (989.0 if any(g in name for g in ("H100", "H200")) else None)

    base = tempfile.mkdtemp(prefix="gpu-check-")
    model = str(build_tinyllava_shaped(f"{base}/model", shape, dtype="bfloat16" if args.device == "cuda"
                                       else "float32"))
    write_corpus(f"{base}/corpus/records.json", f"{base}/corpus", records, seed=0, image_size=shape["image_size"],
                 text_only_share=0.0, broken=False)
    embed = EmbedConfig(device="gpu" if args.device == "cuda" else "cpu", vector_dtype="float16",
                        block_records=8 if quick else 256)
    config = JobConfig(output=f"{base}/out", input=f"{base}/corpus/records.json", image_root=f"{base}/corpus",
                       model=model, layers=layers, embed=embed)
    print(json.dumps({"device": name, "torch": torch.__version__, "records": records, "quick": quick,
                      "decoder": [shape["hidden"], shape["layers"]], "image_tokens":
                      (shape["image_size"] // shape["patch"]) ** 2, "kmeans": [n, d, k]}), flush=True)

    # The bare loop: the model in this process on the device, over batches prepared beforehand.
    loaded = load_model(model, embed, device=args.device)
    pre = Preprocessor(loaded.processor, image_root=config.image_root, batch_size=embed.batch_size,
                       batch_tokens=embed.batch_tokens, max_image_pixels=embed.max_image_pixels)
    prepared = [pre.prepare(i, block) for i, block in enumerate(plan_blocks(config.input, embed.block_records))]
    batches = [(block.ids, b) for block in prepared for b in block.batches]
    tokens = float(np.mean([int(b.inputs["attention_mask"].sum(axis=1).mean()) for _, b in batches]))
    extract_msa_embeddings(loaded.model, batches[0][1].inputs, layers)  # warm
    began = time.perf_counter()
    gpu_vectors = {}  # sample id -> vector
    for ids, batch in batches:
        out = extract_msa_embeddings(loaded.model, batch.inputs, layers)
        for position, vector in zip(batch.positions, out):
            gpu_vectors[ids[position]] = vector
    bare = records / (time.perf_counter() - began)
    del loaded
    if args.device == "cuda":
        torch.cuda.empty_cache()
    flops = forward_flops(shape, tokens)

    # The pipeline: Ray Data, the model actor on the device, files written.
    ray.init(address="local", num_gpus=1 if args.device == "cuda" else 0, include_dashboard=False, log_to_driver=False,
             configure_logging=False)
    written: list[float] = []
    run_embed(config, progress=lambda message: written.append(time.perf_counter()) if "written" in message else None)
    ray.shutdown()
    steady = ((len(written) - 1) * embed.block_records / (written[-1] - written[0])
              if len(written) > 1 else float("nan"))
    for label, rate in (("gpu_check_embed_bare", bare), ("gpu_check_embed_pipeline", steady)):
        report(f"{label}_samples_per_s", rate, "samples/s", bare, rate / bare, None, None, quick)
        if peak:
            mfu = rate * flops / (peak * 1e12)
            report(f"{label}_mfu", mfu, "share", 0.45, mfu / 0.45, ">= 0.45 (plan)", mfu >= 0.45, quick)

    # The same records on the CPU in float32: vectors and selection compared.
    compare = set(sorted(gpu_vectors)[: (records if quick else 16)])  # a 2B model in float32 on CPU is slow
    cpu_loaded = load_model(model, EmbedConfig(dtype="float32"), device="cpu")
    cpu_pre = Preprocessor(cpu_loaded.processor, image_root=config.image_root, batch_size=8,
                           max_image_pixels=embed.max_image_pixels)
    items = [item for block in plan_blocks(config.input, records) for item in block if item.id in compare]
    cpu_vectors = {}
    for batch in cpu_pre.prepare(0, items).batches:
        for position, vector in zip(batch.positions, extract_msa_embeddings(cpu_loaded.model, batch.inputs, layers)):
            cpu_vectors[items[position].id] = vector
    a = np.stack([gpu_vectors[i].astype(np.float16).astype(np.float32) for i in sorted(compare)])
    b = np.stack([cpu_vectors[i] for i in sorted(compare)])
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-30)
    report("gpu_check_vectors_min_cosine_vs_cpu_fp32", float(cosine.min()), "cosine", 1.0, float(cosine.min()),
           ">= 0.99", bool(cosine.min() >= 0.99), quick)
    chosen = []
    for x in (a, b):
        km = spherical_kmeans(x, max(2, len(x) // 8), iterations=10, seed=1234)
        chosen.append(set(select_from_clusters(x, km.assignments, km.centroids, num_layers=len(layers),
                                               fraction=0.25).selected.tolist()))
    overlap = len(chosen[0] & chosen[1]) / max(len(chosen[1]), 1)
    report("gpu_check_selection_overlap_vs_cpu_fp32", overlap, "share", 1.0, overlap, None, None, quick)

    # k-means on the device at the paper's size, and the projection for LLaVA-665K.
    per_iteration = kmeans_seconds_per_iteration(n, d, k, args.device)
    report("gpu_check_kmeans_s_per_iteration", per_iteration, "s", per_iteration, 1.0, None, None, quick)
    hours = LLAVA_665K / steady / 3600 + PAPER["iterations"] * per_iteration * (LLAVA_665K / n) / 3600
    report("gpu_check_projected_hours_llava_665k", hours, "GPU-h", 2.5, hours / 2.5, "<= 2.5 H100-h",
           hours <= 2.5, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
