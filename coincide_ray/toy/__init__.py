"""What only the demo, the benchmarks and the tests use: generated corpora (`corpus`),
synthetic embeddings (`synthetic`), tiny random-weight checkpoints (`tiny`) and the demo
model's training (`teach`). No stage imports from here."""
