"""A miniature of the paper's table: every selection strategy at 20%, each subset used to
train the same tiny target model, scored on a balanced held-out test set.

    python jobs/reproduce.py --write    # the figures of record (BENCHMARKS.md), ~14 minutes on 2 cores
    python jobs/reproduce.py --quick    # toy sizes: checks the whole path (the tests run this)

1. A long-tailed training corpus (50 concept-skill groups of Zipf-like sizes, some rare,
   text-only arithmetic included) and a balanced test set (the same number of records per
   group), from different seeds.
2. The tiny reference model is trained on the training corpus (next-token loss on the answers),
   then `coincide-ray run` embeds, clusters and selects 20% with every strategy
   (select.strategies); `random` is drawn with three seeds.
3. For each subset, and for the full corpus, the same tiny target model (the same random
   start) is trained for the same number of optimiser steps (the same training compute: a
   model this small needs about a thousand steps to learn to look at the images, which one
   epoch of a 400-record subset does not give), and answers every test question by multiple
   choice (the candidate answer with the highest likelihood).
4. The table: accuracy per skill and on average, the average relative to full data (the
   paper's "Rel."), and how many of the rarest groups the subset holds at least one record of.
   It is printed and, with --write, put into BENCHMARKS.md between its reproduce markers.
What it measures is reported whichever way it comes out.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

from coincide_ray import io, schema
from coincide_ray.cli import main as cli_main
from coincide_ray.toy.corpus import COLOURS, GROUPS, SHAPES, WORDS, long_tail_counts, write_grouped_corpus
from coincide_ray.select.strategies import STRATEGIES, choose

HERE = Path(__file__).resolve().parent
SKILLS = ("colour", "shape", "count", "describe", "read", "text")
FULL = dict(train=2000, test_per_group=8, reference_epochs=6.0, target_steps=900, hidden=64, layers=8,
            clusters=50, iterations=20)
QUICK = dict(train=150, test_per_group=1, reference_epochs=0.5, target_steps=4, hidden=32, layers=4,
             clusters=6, iterations=3)
RANDOM_SEEDS = (1, 2, 3)
MARKERS = ("<!-- reproduce:begin -->", "<!-- reproduce:end -->")


def candidates(record: dict) -> tuple[list[str], int]:
    """The multiple-choice answers of a test record, and the index of the right one."""
    answer = record["conversations"][-1]["value"]
    concept, skill = record["group"].split("/")
    if skill == "colour":
        options = [f"They are {c}." for c in COLOURS]
    elif skill == "shape":
        options = [f"A {s}." for s in SHAPES]
    elif skill == "count":
        options = [f"There are {k}." for k in range(1, 5)]
    elif skill == "describe":
        count = answer.split()[0]
        options = [f"{count} {c} {s}(s) on a light background." for c in COLOURS for s in SHAPES]
    elif skill == "read":
        options = [f"It says {w}." for w in WORDS]
    else:
        options = [f"{k}." for k in range(2, 19)]
    return options, options.index(answer)


def train_and_score(subset: list[dict], test: list[dict], corpus: Path, steps: int,
                    start: Path) -> dict[str, float]:
    """Accuracy per test group of the target model trained on `subset` from the checkpoint `start`."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from coincide_ray.toy.teach import choose_answers, load_examples, train

    processor = AutoProcessor.from_pretrained(start)
    model = AutoModelForImageTextToText.from_pretrained(start)
    if subset:
        train(model, processor, load_examples(subset, str(corpus)), steps=steps, seed=0)
    options = [candidates(r) for r in test]
    picked = choose_answers(model, processor, load_examples(test, str(corpus)), [o for o, _ in options])
    right: dict[str, list[bool]] = {}
    for record, (_, truth), choice in zip(test, options, picked):
        right.setdefault(record["group"], []).append(choice == truth)
    return {group: float(np.mean(hits)) for group, hits in right.items()}


def per_skill(accuracy: dict[str, float]) -> dict[str, float]:
    """Mean accuracy of the groups of each skill, and their mean ("average")."""
    skills = {s: float(np.mean([a for g, a in accuracy.items() if g.split("/")[1] == s])) for s in SKILLS}
    return {**skills, "average": float(np.mean(list(accuracy.values())))}


def subsets(run: Path, train_records: list[dict]) -> dict[str, list[dict]]:
    """Every strategy's subset (random with each seed), from the finished run's outputs."""
    by_id = {r["id"]: r for r in train_records}
    out = {}
    for strategy in STRATEGIES:
        if strategy == "random":
            continue
        table = io.read_parquet(str(run / schema.strategy_paths(strategy)[0]))
        ids = table.filter(table.column(schema.SELECTED)).column(schema.SAMPLE_ID).to_pylist()
        out[strategy] = [by_id[i] for i in ids]
    selection = io.read_parquet(str(run / schema.SELECTION_PATH))
    summary = io.read_parquet(str(run / schema.SUMMARY_PATH))
    ids = selection.column(schema.SAMPLE_ID).to_pylist()
    rank = np.nan_to_num(selection.column(schema.RANK).to_numpy(zero_copy_only=False), nan=-1).astype(np.int64)
    for seed in RANDOM_SEEDS:
        chosen = choose("random", rank=rank, assignments=selection.column(schema.CLUSTER).to_numpy(),
                        transfer=summary.column("transferability").to_numpy(),
                        density=summary.column("density").to_numpy(), fraction=0.2, temperature=0.1, seed=seed)
        out[f"random (seed {seed})"] = [by_id[ids[i]] for i in chosen.selected]
    return out


def table(rows: dict[str, dict], rare: list[str], counts: dict[str, int]) -> str:
    full = rows["full data"]["scores"]["average"]
    head = "| subset | records | " + " | ".join(SKILLS) + " | average | Rel. (% of full) | rare groups held |"
    lines = [head, "|" + " --- |" * (len(SKILLS) + 5)]
    for name, row in rows.items():
        scores = row["scores"]
        held = len({r["group"] for r in row["subset"]} & set(rare))
        lines.append(f"| {name} | {len(row['subset'])} | " + " | ".join(f"{scores[s]:.3f}" for s in SKILLS)
                     + f" | {scores['average']:.3f} | {100 * scores['average'] / max(full, 1e-9):.1f} | "
                       f"{held} of {len(rare)} |")
    randoms = [rows[n]["scores"]["average"] for n in rows if n.startswith("random")]
    lines.append(f"\nrandom over {len(randoms)} seeds: average {np.mean(randoms):.3f} +- {np.std(randoms):.3f}; "
                 f"rare groups: the {len(rare)} smallest of {len(counts)} ({min(counts[g] for g in rare)}-"
                 f"{max(counts[g] for g in rare)} training records each)")
    return "\n".join(lines)


def write_benchmarks(text: str, command: str, seconds: float) -> None:
    path = HERE.parent / "BENCHMARKS.md"
    current = path.read_text()
    body = (f"{MARKERS[0]}\n`{command}` on {platform.machine()} with {os.cpu_count()} cores, "
            f"{date.today().isoformat()}, {seconds / 60:.1f} minutes:\n\n{text}\n{MARKERS[1]}")
    if MARKERS[0] in current:
        before, rest = current.split(MARKERS[0], 1)
        current = before + body + rest.split(MARKERS[1], 1)[1]
    else:
        current += f"\n## The paper's table in miniature (issue 16)\n\n{body}\n"
    path.write_text(current)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks the whole path")
    parser.add_argument("--output", help="folder for the corpora, models and runs (default: a new temporary one)")
    parser.add_argument("--write", action="store_true", help="put the table into BENCHMARKS.md")
    args = parser.parse_args()
    size = QUICK if args.quick else FULL
    began = time.perf_counter()
    root = Path(args.output or tempfile.mkdtemp(prefix="reproduce-")).resolve()
    corpus = root / "corpus"
    counts = long_tail_counts(size["train"], seed=0)
    train_records = write_grouped_corpus(str(corpus / "train.json"), str(corpus), counts, seed=0, prefix="train",
                                         image_size=32)
    test = write_grouped_corpus(str(corpus / "test.json"), str(corpus), {g: size["test_per_group"] for g in GROUPS},
                                seed=1, prefix="test", image_size=32)
    rare = sorted(counts, key=lambda g: (counts[g], g))[: len(GROUPS) // 5]

    from transformers import AutoModelForImageTextToText, AutoProcessor

    from coincide_ray.toy.teach import load_examples, save, train
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    shape = dict(hidden=size["hidden"], layers=size["layers"], heads=4, image_size=32)
    start = build_tiny_checkpoint(root / "target-start", "llava", seed=1, **shape)
    reference = build_tiny_checkpoint(root / "reference-start", "llava", seed=0, **shape)
    processor = AutoProcessor.from_pretrained(reference)
    model = AutoModelForImageTextToText.from_pretrained(reference)
    train(model, processor, load_examples(train_records, str(corpus)), epochs=size["reference_epochs"], seed=0)
    save(model, processor, root / "reference")
    print(f"reference model trained ({time.perf_counter() - began:.0f}s)", flush=True)

    run = root / "run"
    layers = ",".join(str(i) for i in range(1, size["layers"], 2))
    code = cli_main(["run", "--input", str(corpus / "train.json"), "--image-root", str(corpus),
                     "--model", str(root / "reference"), "--output", str(run), "--layers", layers,
                     "--clusters", str(size["clusters"]), "--iterations", str(size["iterations"]),
                     "--fraction", "0.2", "--label-field", "group",
                     "--strategy", ",".join(s for s in STRATEGIES if s != "random")])
    if code:
        return code
    rows = {name: {"subset": subset} for name, subset in subsets(run, train_records).items()}
    rows["full data"] = {"subset": train_records}
    for name, row in rows.items():
        row["scores"] = per_skill(train_and_score(row["subset"], test, corpus, size["target_steps"], start))
        print(f"{name}: average accuracy {row['scores']['average']:.3f} "
              f"({time.perf_counter() - began:.0f}s)", flush=True)
    text = table(rows, rare, counts)
    print(text)
    seconds = time.perf_counter() - began
    print(json.dumps({"seconds": round(seconds, 1), "output": str(root)}))
    if args.write:
        write_benchmarks(text, "python jobs/reproduce.py" + (" --quick" if args.quick else ""), seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
