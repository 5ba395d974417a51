"""The whole job at the scale it is for: driver memory, the record path, the first part file, reruns.

    python jobs/bench/bench_scale.py            # 665,000 records (one JSON list) and 5,000,000 (10 JSONL files)
    python jobs/bench/bench_scale.py --quick    # 3,000 and 6,000: checks the script works

Its own child process first writes LLaVA-shaped corpora (1-6 turn pairs, answers log-normal
around 150 characters, 6% text-only) whose images are drawn from a pool of real JPEG files.
Then, each figure against a baseline measured in the same run:

- the driver's peak RSS through `--dry-run`, and through planning and the first part files
  of `embed` with a tiny model (the run is stopped with SIGTERM once they exist): at the
  first size against a process that holds every parsed record, as the driver did before
  record shards; at the second against the first size's own figure (flat in N: ratio ~1);
- the largest Ray worker's peak RSS in the same embed run (shown);
- records/s of the record path (stream, parse, judge, key every record into shards) in one
  process, against json.loads over the same bytes in one process;
- seconds from the start of `embed` to its first part file, against one block's
  preparation and model time in this process;
- an unchanged rerun's embed-stage seconds against the first run's on the demo corpus.

Peak memory comes from /proc (VmHWM of the driver; VmRSS of every Ray worker, sampled).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchkit import report

HERE = Path(__file__).resolve()
# VmHWM, not ru_maxrss: Linux carries ru_maxrss across exec, so a child would report its parent's peak
PEAK = "print('PEAK_KB', [l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')][0], flush=True)\n"
DRIVER = "import sys\nfrom coincide_ray.cli import main\ncode = main(sys.argv[1:])\n" + PEAK + "sys.exit(code)\n"
HOLD_ALL = ("import sys\nfrom coincide_ray.records import accepted_records\n"
            "items = [item for _, _, item in accepted_records(sys.argv[1])]\n" + PEAK)
DRIVER_TARGET_MB = 1024


def write_pool(folder: Path, count: int) -> list[str]:
    """`count` real JPEG files of varied content and size."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for i in range(count):
        side = int(rng.integers(48, 160))
        base = rng.integers(0, 255, 3)
        pixels = np.clip(base + rng.normal(0, 40, (side, side, 3)), 0, 255).astype(np.uint8)
        name = f"coco/{i:012d}.jpg"
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / name, quality=85)
        names.append(name)
    return names


def llava_records(n: int, pool: int, seed: int, start: int = 0):
    """LLaVA-665K-shaped records, one at a time."""
    import numpy as np

    rng = np.random.default_rng(seed)
    words = "the a of red blue what is in on how many two large small left right picture shows".split()
    for i in range(start, start + n):
        turns = []
        for pair in range(int(rng.integers(1, 7))):
            question = " ".join(rng.choice(words, int(rng.integers(5, 15)))) + "?"
            answer_chars = int(min(2000, rng.lognormal(math.log(150), 0.7)))
            answer = " ".join(rng.choice(words, max(1, answer_chars // 5)))
            turns += [{"from": "human", "value": ("<image>\n" if pair == 0 else "") + question},
                      {"from": "gpt", "value": answer}]
        record = {"id": f"{i:012d}", "conversations": turns}
        if rng.random() >= 0.06:
            record["image"] = f"coco/{int(rng.integers(0, pool)):012d}.jpg"
        else:
            turns[0]["value"] = turns[0]["value"].replace("<image>\n", "")
        yield record


def generate(kind: str, n: int, target: str, pool: int) -> None:
    """Runs in a child process: the corpus is never in the benchmark's own memory."""
    if kind == "list":
        with open(target, "w") as f:
            f.write("[\n")
            for k, record in enumerate(llava_records(n, pool, seed=1)):
                f.write((",\n" if k else "") + json.dumps(record))
            f.write("\n]\n")
    else:
        files = 10
        os.makedirs(target, exist_ok=True)
        per = -(-n // files)
        for part in range(files):
            count = min(per, n - part * per)
            with open(os.path.join(target, f"part-{part:02d}.jsonl"), "w") as f:
                for record in llava_records(count, pool, seed=2 + part, start=part * per):
                    f.write(json.dumps(record) + "\n")


def status_kb(pid: int, field: str) -> int:
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def ray_workers(root: int) -> list[int]:
    """The Ray worker processes under `root`, whose local Ray starts the raylet that starts
    them: not those of another Ray on the machine."""
    import psutil

    found = []
    try:
        children = psutil.Process(root).children(recursive=True)
    except psutil.Error:
        return found
    for process in children:
        try:
            command = process.cmdline()
        except psutil.Error:
            continue
        if any("default_worker.py" in part for part in command) or (command and command[0].startswith("ray::")):
            found.append(process.pid)
    return found


def peak_of(output: str) -> float:
    """The PEAK_KB line a child printed, in MB."""
    line = next(line for line in output.splitlines() if line.startswith("PEAK_KB"))
    return int(line.split()[1]) / 1024


def embed_first_parts(args: list[str], out: Path, parts: int, env: dict) -> dict:
    """Start `coincide-ray embed`, watch for `parts` part files, then SIGTERM it: seconds to
    the first part file, the driver's peak RSS, the largest Ray worker's sampled RSS."""
    start = time.perf_counter()
    child = subprocess.Popen([sys.executable, "-c", DRIVER, "embed", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, env=env)
    first, worker_kb, driver_kb, stopped = None, 0, 0, False
    folder = out / "embeddings"
    while child.poll() is None:
        done = sorted(folder.glob("part-*.parquet")) if folder.exists() else []
        if done and first is None:
            first = time.perf_counter() - start
        worker_kb = max([worker_kb] + [status_kb(pid, "VmRSS") for pid in ray_workers(child.pid)])
        driver_kb = max(driver_kb, status_kb(child.pid, "VmHWM"))
        if len(done) >= parts and not stopped:
            child.send_signal(signal.SIGTERM)
            stopped = True
        time.sleep(0.2)
    output = child.stdout.read()
    if first is None:
        raise RuntimeError(f"embed wrote no part file (exit {child.returncode}): {output[-2000:]}")
    printed = [line for line in output.splitlines() if line.startswith("PEAK_KB")]
    driver_mb = peak_of(output) if printed else driver_kb / 1024  # the last sample when it could not say
    return {"first_part_s": first, "driver_mb": driver_mb, "worker_mb": worker_kb / 1024,
            "log_lines": len(output.splitlines())}


def one_block_seconds(records: str, image_root: str, model: str, block_records: int) -> float:
    """One block prepared and embedded in this process: the least a first part file can take."""
    import itertools

    from coincide_ray.config import EmbedConfig
    from coincide_ray.embed.model import load_model, local_copy, preprocessing
    from coincide_ray.embed.msa import extract_msa_embeddings
    from coincide_ray.embed.preprocess import Preprocessor
    from coincide_ray.records import accepted_records

    embed = EmbedConfig(device="cpu")
    loaded = load_model(model, embed)
    pre = Preprocessor(loaded.processor, image_root=image_root, batch_size=embed.batch_size,
                       max_image_pixels=embed.max_image_pixels, **preprocessing(local_copy(model, None)))
    items = [item for _, _, item in itertools.islice(accepted_records(records), block_records)]
    start = time.perf_counter()
    for batch in pre.prepare(0, items).batches:
        extract_msa_embeddings(loaded.model, batch.inputs, (1, 3))
    return time.perf_counter() - start


def record_path(records: str, work: Path) -> tuple[float, float, int]:
    """(records/s of the record path in one process, records/s of json.loads, records)."""
    from coincide_ray.corpus import shards
    from coincide_ray.records import RECORD_SUFFIXES
    from coincide_ray import io

    start = time.perf_counter()
    shutil.rmtree(work, ignore_errors=True)
    corpus = shards.prepare(records, str(work), 256, progress=lambda line: None)
    ours = time.perf_counter() - start
    start = time.perf_counter()
    count = 0
    for path in io.list_files(records, RECORD_SUFFIXES):
        with open(path, "rb") as f:
            if path.endswith(".jsonl"):
                count += sum(1 for line in f if line.strip() and json.loads(line) is not None)
            else:
                count += len(json.loads(f.read()))
    plain = time.perf_counter() - start
    assert count == corpus.records, (count, corpus.records)
    return corpus.records / ours, count / plain, count


DEMO_SHAPE = dict(hidden=64, layers=8, heads=4, image_size=32)  # jobs/demo.py's model


def rerun_ratio(work: Path, quick: bool) -> tuple[float, float]:
    """(unchanged rerun's embed seconds, first run's) on the demo corpus with a model of the
    demo's shape and layers, one local Ray."""
    import ray

    from coincide_ray.cli import show_ray_data_progress
    from coincide_ray.config import EmbedConfig, JobConfig
    from coincide_ray.embed.stage import run_embed
    from coincide_ray.toy.corpus import write_corpus

    records = 64 if quick else 2000
    corpus = work / "demo-corpus"
    write_corpus(str(corpus / "records.json"), str(corpus), records, seed=0)
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    model = str(build_tiny_checkpoint(work / "demo-model", "llava", **DEMO_SHAPE))
    config = JobConfig(input=str(corpus / "records.json"), image_root=str(corpus), model=model,
                       output=str(work / "demo-out"), embed=EmbedConfig(device="cpu"))
    shutil.rmtree(work / "demo-out", ignore_errors=True)
    ray.init(address="local", include_dashboard=False, logging_level="ERROR")
    show_ray_data_progress(False)
    try:
        first = run_embed(config, progress=lambda line: None).seconds
        again = run_embed(config, progress=lambda line: None).seconds
    finally:
        ray.shutdown()
    return again, first


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--generate", nargs=4, metavar=("KIND", "N", "TARGET", "POOL"), help=argparse.SUPPRESS)
    parser.add_argument("--work", help="folder for the corpora and outputs (default: a new temporary one)")
    parser.add_argument("--sizes", help="KIND:N,... instead of the default sizes (KIND: list or jsonl)")
    parser.add_argument("--no-rerun", action="store_true", help="leave out the unchanged-rerun figure")
    args = parser.parse_args()
    if args.generate:
        kind, n, target, pool = args.generate
        generate(kind, int(n), target, int(pool))
        return 0
    quick = args.quick
    sizes = [("list", 3_000), ("jsonl", 6_000)] if quick else [("list", 665_000), ("jsonl", 5_000_000)]
    if args.sizes:
        sizes = [(kind, int(n)) for kind, n in (size.split(":") for size in args.sizes.split(","))]
    pool = 40 if quick else 3000
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    images = work / "images"
    if not images.exists():
        write_pool(images, pool)
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    model = str(build_tiny_checkpoint(work / "model", "llava", layers=4))
    env = {**os.environ, "PYTHONPATH": str(HERE.parents[2]) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    # quick: blocks of 16 records, so that the 3 part files the embed run waits for come after
    # a sixteenth of the model work (the default, 256, is what the figures of record use)
    block_records = 16 if quick else 256
    config = work / "job.yaml"
    config.write_text(f"embed:\n  block_records: {block_records}\n")
    smallest: dict[str, float] = {}  # the first size's driver and worker peaks
    for kind, n in sizes:
        name = f"{n // 1000}k_{'list' if kind == 'list' else 'jsonl10'}"
        records = work / (f"records-{n}.json" if kind == "list" else f"records-{n}")
        if not records.exists():
            began = time.perf_counter()
            subprocess.run([sys.executable, str(HERE), "--generate", kind, str(n), str(records), str(pool)],
                           check=True, env=env)
            print(json.dumps({"generated": str(records), "records": n, "seconds": round(time.perf_counter() - began, 1)}),
                  flush=True)
        if not smallest:  # holding 5 million records would take some 20 GB: the larger size is
            # measured against the smaller one's own figures instead, which shows whether memory is flat in N
            held = subprocess.run([sys.executable, "-c", HOLD_ALL, str(records)], capture_output=True, text=True,
                                  env=env, check=True)
            holding = peak_of(held.stdout)
        common = ["--input", str(records), "--image-root", str(images), "--model", model, "--layers", "1,3",
                  "--config", str(config)]
        dry = subprocess.run([sys.executable, "-c", DRIVER, "run", *common, "--output", str(work / f"dry-{n}"),
                              "--dry-run"], capture_output=True, text=True, env=env, check=True)
        dry_mb = peak_of(dry.stdout)
        base = smallest.get("dry", holding)
        report(f"scale_{name}_dry_run_driver_peak", dry_mb, "MB", base, dry_mb / base,
               f"<={DRIVER_TARGET_MB}MB", dry_mb <= DRIVER_TARGET_MB, quick)
        out = work / f"embed-{n}"
        shutil.rmtree(out, ignore_errors=True)
        run = embed_first_parts([*common, "--output", str(out), "--device", "cpu"], out, 3, env)
        base = smallest.get("embed", holding)
        report(f"scale_{name}_embed_driver_peak", run["driver_mb"], "MB", base, run["driver_mb"] / base,
               f"<={DRIVER_TARGET_MB}MB", run["driver_mb"] <= DRIVER_TARGET_MB, quick)
        base = smallest.get("worker", holding)
        report(f"scale_{name}_embed_largest_worker", run["worker_mb"], "MB", base, run["worker_mb"] / base,
               None, None, quick)
        smallest = smallest or {"dry": dry_mb, "embed": run["driver_mb"], "worker": run["worker_mb"]}
        block = one_block_seconds(str(records), str(images), model, block_records)
        report(f"scale_{name}_first_part_file", run["first_part_s"], "s", block, run["first_part_s"] / block,
               None, None, quick)
        ours, plain, count = record_path(str(records), work / f"path-{n}")
        report(f"scale_{name}_record_path", ours, "rec/s", plain, ours / plain, None, None, quick)
        print(json.dumps({"size": name, "records": count, "baseline_mb": round(base),
                          "embed_log_lines_to_3_parts": run["log_lines"]}), flush=True)
    if args.no_rerun:
        return 0
    again, first = rerun_ratio(work, quick)
    report("scale_unchanged_rerun_embed", again, "s", first, again / first, "<=0.2x", again / first <= 0.2, quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
