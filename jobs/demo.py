"""`make demo`: the whole job on an embedded default, on this machine.

Makes a small concept-skill corpus (real PNG images of coloured shapes and signs, questions
of five skills, text-only records and deliberately broken ones) and a tiny random-weight
LLaVA-family checkpoint, then runs `coincide-ray run` on a local Ray: embed, cluster, select.
Random weights make the clusters follow surface features of the images and text; point
--model at a real checkpoint (README) for clusters that mean something.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

from coincide_ray import io, schema
from coincide_ray.cli import main as cli_main
from coincide_ray.corpus import write_corpus
from coincide_ray.embed.tiny import build_tiny_checkpoint


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="demo-output", help="folder for the run (default demo-output)")
    parser.add_argument("--records", type=int, default=2000, help="good records in the corpus (default 2000)")
    args = parser.parse_args()
    root = Path(args.output).resolve()
    start = time.perf_counter()
    corpus = root / "corpus"
    records_file = corpus / "records.json"
    if not records_file.exists():
        print(f"making {args.records} records with images under {corpus} ...", flush=True)
        write_corpus(str(records_file), str(corpus), args.records, seed=0)
    model = root / "model"
    if not (model / "config.json").exists():
        print(f"making a tiny random-weight LLaVA checkpoint under {model} ...", flush=True)
        build_tiny_checkpoint(model, "llava", hidden=64, layers=8, heads=4, image_size=64)
    code = cli_main(["run", "--input", str(records_file), "--image-root", str(corpus), "--model", str(model),
                     "--output", str(root), "--layers", "1,3,5,7", "--clusters", "40", "--iterations", "20",
                     "--fraction", "0.2", "--label-field", "concept,skill"])
    if code:
        return code
    manifest = io.read_json(str(root / schema.MANIFEST_PATH))
    counts = manifest["counts"]
    print(f"\ncoincide-ray demo finished in {time.perf_counter() - start:.0f}s")
    print(f"  records {counts['records']}: selected {counts['selected']}, rejected {counts['rejected']}, "
          f"embedded {counts['embedded']}, reused {counts['reused']}")
    print(f"  rejected by reason: {manifest['health']['rejected_by_reason']}")
    print(f"  seconds per stage: {manifest['timings_s']}")
    labels = manifest["labels"]
    print(f"  planted concept/skill groups: cluster purity {labels['purity']:.2f}; the selection covers "
          f"{labels['groups_covered_by_selection']} of {labels['groups']} groups, a random subset of the same "
          f"size {labels['groups_covered_by_random']}")
    print(f"  report: {manifest['paths']['report']}")
    selected = io.read_json(str(root / schema.SELECTED_RECORDS_PATH))
    print(f"  selected skills: {dict(sorted(Counter(r['skill'] for r in selected).items()))}")
    print(f"  outputs under {root}:")
    for name, path in manifest["paths"].items():
        print(f"    {name:17s} {path}")
    print(f"    {'manifest':17s} {root / schema.MANIFEST_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
