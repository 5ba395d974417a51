"""Teaching a tiny checkpoint its corpus (coincide_ray/toy/teach.py)."""

import numpy as np
import pytest
from transformers import AutoModelForImageTextToText, AutoProcessor

from coincide_ray.toy.corpus import GROUPS, long_tail_counts, write_grouped_corpus
from coincide_ray.toy.teach import IGNORE, choose_answers, encode, load_examples, train
from coincide_ray.toy.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("teach")
    records = write_grouped_corpus(str(root / "r.json"), str(root), long_tail_counts(120, seed=3), seed=3,
                                   image_size=32)
    folder = build_tiny_checkpoint(root / "model", "llava", hidden=32, layers=2, heads=2, image_size=32)
    return records, str(root), folder


def test_the_long_tail_has_every_group_and_a_few_large_ones():
    counts = long_tail_counts(2000, seed=0)
    sizes = sorted(counts.values(), reverse=True)
    assert set(counts) == set(GROUPS) and sum(sizes) == 2000 and min(sizes) >= 1
    assert sizes[0] > 20 * sizes[-1] and sum(sizes[:5]) > sum(sizes[-25:])
    with pytest.raises(ValueError, match="at least one record per group"):
        long_tail_counts(len(GROUPS) - 1)


def test_labels_are_the_answer_tokens_only(setup):
    records, root, folder = setup
    processor = AutoProcessor.from_pretrained(folder)
    examples = load_examples(records, root)
    for with_image in (True, False):
        rows = [e for e in examples if (e.image is not None) == with_image][:3]
        inputs = encode(processor, rows)
        for row, example in enumerate(rows):
            kept = inputs["labels"][row] != IGNORE
            text = processor.tokenizer.decode(inputs["input_ids"][row][kept])
            assert text.strip().startswith(example.turns[-1]["value"]), (text, example.turns)
            assert (inputs["labels"][row][kept] == inputs["input_ids"][row][kept]).all()


def test_training_lowers_the_answer_loss(setup):
    records, root, folder = setup
    processor = AutoProcessor.from_pretrained(folder)
    model = AutoModelForImageTextToText.from_pretrained(folder)
    examples = load_examples(records, root)
    colour = [e for e, r in zip(examples, records) if r["skill"] == "colour"][:4]
    options = [["They are red.", "They are green.", "They are blue.", "They are yellow."]] * len(colour)
    before = choose_answers(model, processor, colour, options)
    losses = train(model, processor, examples, steps=24, batch_size=16, lr=3e-3, seed=0)  # wording: fast to learn
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])
    assert all(0 <= c < 4 for c in choose_answers(model, processor, colour, options)) and len(before) == len(colour)
