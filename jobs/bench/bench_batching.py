"""Padding in the forward passes: batches cut by a token budget over length-sorted blocks
against fixed batches of 8 in record order.

Lengths are shaped like LLaVA-665K's: 576 image tokens plus text whose length is
log-normal with a median of 150 tokens and 1% over 1,500. The batches are the ones the
prepare stage forms (`coincide_ray.embed.preprocess.plan_batches`) with the default
`embed.block_records`, `batch_size` and `batch_tokens`. Padding is the share of the tokens
a forward pass computes that are padding. Target: at most 5%.

    python jobs/bench/bench_batching.py [--quick]
"""

from __future__ import annotations

import argparse

import numpy as np
from benchkit import machine, report

from coincide_ray.config import EmbedConfig
from coincide_ray.embed.preprocess import padding_share, plan_batches

IMAGE_TOKENS = 576
TEXT_MEDIAN = 150
TEXT_SIGMA = np.log(1500 / 150) / 2.326  # the 99th percentile at 1,500 tokens


def llava_like_lengths(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    text = np.maximum(1, np.rint(TEXT_MEDIAN * np.exp(TEXT_SIGMA * rng.standard_normal(n))))
    return IMAGE_TOKENS + text.astype(np.int64)


def batches_per_block(lengths: np.ndarray, block: int, cut) -> list[np.ndarray]:
    """Every batch of every block, as positions into `lengths`."""
    out = []
    for start in range(0, len(lengths), block):
        positions = np.arange(start, min(start + block, len(lengths)))
        out += [positions[batch] for batch in cut(lengths[positions])]
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    embed = EmbedConfig()
    n = 4 * embed.block_records if args.quick else 200 * embed.block_records
    lengths = llava_like_lengths(n)
    machine(records=int(n), block_records=embed.block_records, batch_size=embed.batch_size,
            batch_tokens=embed.batch_tokens, over_1500=float(np.mean(lengths - IMAGE_TOKENS > 1500)))

    fixed = padding_share(lengths, batches_per_block(lengths, 64, lambda b: np.array_split(
        np.arange(len(b)), np.arange(8, len(b), 8))))
    sorted_64 = padding_share(lengths, batches_per_block(lengths, 64, lambda b: np.array_split(
        np.argsort(b, kind="stable"), np.arange(8, len(b), 8))))
    ours = batches_per_block(lengths, embed.block_records,
                             lambda b: plan_batches(b, embed.batch_size, embed.batch_tokens))
    budget = padding_share(lengths, ours)
    report("padding_fixed_8_record_order", fixed, "share", fixed, 1.0, None, None, args.quick)
    report("padding_sorted_in_64_blocks_of_8", sorted_64, "share", fixed, sorted_64 / fixed, None, None, args.quick)
    report("padding_token_budget_default", budget, "share", fixed, budget / fixed, "<= 0.05", budget <= 0.05,
           args.quick)
    rows = np.array([len(b) for b in ours])
    tokens = np.array([int(lengths[b].max()) * len(b) for b in ours])
    report("token_budget_rows_per_batch_mean", float(rows.mean()), "rows", 8.0, rows.mean() / 8.0, None, None,
           args.quick)
    report("token_budget_padded_tokens_max", float(tokens.max()), "tokens", float(embed.batch_tokens),
           tokens.max() / embed.batch_tokens, None, None, args.quick)


if __name__ == "__main__":
    main()
