"""`make demo`: the whole job on an embedded default, on this machine.

Makes a long-tailed concept-skill corpus (real PNG images of coloured shapes and signs,
questions of five skills, text-only arithmetic; 50 groups of very different sizes, a few of
them rare; plus deliberately broken records) and a tiny LLaVA-family reference model. The
model is first trained on the corpus (next-token loss on the answers, seeded, on the CPU):
COINCIDE's premise is that a trained model's attention outputs group samples by
concept-skill composition, which a random-weight model cannot show. Then `coincide-ray run`
embeds, clusters and selects twice on a local Ray, with the random-weight model and with the
trained one, and prints their cluster purity, collapsed centroid pairs and label coverage
side by side; the trained run's report shows the same comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

from coincide_ray import io, schema
from coincide_ray.cli import main as cli_main
from coincide_ray.toy.corpus import long_tail_counts, write_grouped_corpus
from coincide_ray.toy.tiny import build_tiny_checkpoint

SHAPE = dict(hidden=64, layers=8, heads=4, image_size=32)  # the model sees the 64 px images at 32 px


def reference_models(root: Path, records: list[dict], corpus: Path, epochs: float) -> tuple[Path, Path, float]:
    """(random-weight model, the same model trained on the corpus, training seconds)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from coincide_ray.toy.teach import load_examples, save, train

    random_model, trained_model = root / "model-random", root / "model"
    if not (random_model / "config.json").exists():
        print(f"making a tiny random-weight LLaVA checkpoint under {random_model} ...", flush=True)
        build_tiny_checkpoint(random_model, "llava", **SHAPE)
    if (trained_model / "config.json").exists():
        return random_model, trained_model, 0.0
    good = [r for r in records if "group" in r]
    print(f"training it on the {len(good)} good records ({epochs} epochs, next-token loss on the answers) ...",
          flush=True)
    began = time.perf_counter()
    processor = AutoProcessor.from_pretrained(random_model)
    model = AutoModelForImageTextToText.from_pretrained(random_model)
    losses = train(model, processor, load_examples(good, str(corpus)), epochs=epochs, seed=0)
    save(model, processor, trained_model)
    seconds = time.perf_counter() - began
    print(f"  answer loss {losses[0]:.2f} -> {sum(losses[-10:]) / len(losses[-10:]):.2f} in {len(losses)} steps, "
          f"{seconds:.0f}s", flush=True)
    return random_model, trained_model, seconds


def run(records_file: Path, corpus: Path, model: Path, output: Path, compare_with: Path | None = None) -> int:
    args = ["run", "--input", str(records_file), "--image-root", str(corpus), "--model", str(model),
            "--output", str(output), "--layers", "1,3,5,7", "--clusters", "50", "--iterations", "20",
            "--fraction", "0.2", "--label-field", "group"]
    return cli_main(args + (["--compare-with", str(compare_with)] if compare_with else []))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="folder for the run (default demo-output)")
    parser.add_argument("--records", type=int, default=2000, help="good records in the corpus (default 2000)")
    parser.add_argument("--train-epochs", type=float, default=6.0,
                        help="epochs of training for the reference model (default 6: about a minute on 2 cores)")
    args = parser.parse_args()
    root = Path(args.output).resolve()
    start = time.perf_counter()
    corpus = root / "corpus"
    records_file = corpus / "records.json"
    if not records_file.exists():
        print(f"making {args.records} long-tailed records with images under {corpus} ...", flush=True)
        write_grouped_corpus(str(records_file), str(corpus), long_tail_counts(args.records), seed=0, broken=True)
    records = json.loads(records_file.read_text())
    random_model, trained_model, _ = reference_models(root, records, corpus, args.train_epochs)
    print("\nthe random-weight model:", flush=True)
    if code := run(records_file, corpus, random_model, root / "random-weights"):
        return code
    print("\nthe trained model:", flush=True)
    if code := run(records_file, corpus, trained_model, root, compare_with=root / "random-weights"):
        return code
    manifest = io.read_json(str(root / schema.MANIFEST_PATH))
    counts = manifest["counts"]
    print(f"\ncoincide-ray demo finished in {time.perf_counter() - start:.0f}s")
    print(f"  records {counts['records']}: selected {counts['selected']}, rejected {counts['rejected']}, "
          f"embedded {counts['embedded']}, reused {counts['reused']}")
    print(f"  rejected by reason: {manifest['health']['rejected_by_reason']}")
    print(f"  seconds per stage: {manifest['timings_s']}")
    compared = manifest["compared_with"]
    print(f"  {'concept-skill groups':40s} {'trained':>10s} {'random weights':>15s}")
    for name, value in compared["this run"].items():
        if name not in ("model", "records", "clusters"):
            print(f"  {name:40s} {value!s:>10s} {compared['that run'][name]!s:>15s}")
    print(f"  report: {root / manifest['paths']['report']}")
    selected = io.read_json(str(root / schema.SELECTED_RECORDS_PATH))
    print(f"  selected skills: {dict(sorted(Counter(r['skill'] for r in selected).items()))}")
    print(f"  outputs under {root}:")
    for name, path in manifest["paths"].items():
        print(f"    {name:17s} {root / path}")
    print(f"    {'manifest':17s} {root / schema.MANIFEST_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
