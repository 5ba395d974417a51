"""Teaching a tiny checkpoint a corpus, and scoring its answers (the demo and jobs/reproduce.py).

COINCIDE's premise is that a *trained* small model's attention outputs group samples by
concept-skill composition. A random-weight model cannot show that, so the demo first trains
its tiny reference model: next-token loss on the answers only, seeded, on the CPU. The same
code trains the tiny target models of jobs/reproduce.py, whose answers are scored by
multiple choice: the candidate answer with the highest log-likelihood is the model's answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from coincide_ray.records import Record, chat_messages

IGNORE = -100  # label of a position the loss skips


@dataclass(frozen=True)
class Example:
    """One record ready for the model: its image (None for text-only) and its conversation."""

    image: Image.Image | None
    turns: list[dict]


def load_examples(records: list[dict], image_root: str, max_pixels: int = 50_000_000) -> list[Example]:
    """The records' images fetched and decoded once, as the embed stage decodes them."""
    from coincide_ray import io
    from coincide_ray.embed.preprocess import decode_image

    return [Example(decode_image(io.read_under(image_root, raw["image"]), max_pixels) if raw.get("image") else None,
                    raw["conversations"]) for raw in records]


def encode(processor, examples: list[Example], answers: list[str] | None = None) -> dict[str, torch.Tensor]:
    """Model inputs with `labels` on the last answer's tokens (and what follows it in the
    template), everything else IGNORE. `answers` replaces each example's last answer."""
    texts, answer_starts = [], []
    for i, example in enumerate(examples):
        turns = [dict(turn) for turn in example.turns]
        if answers is not None:
            turns[-1]["value"] = answers[i]
        record = Record(f"row-{i}", "x" if example.image is not None else None, turns, "")
        text = processor.apply_chat_template(chat_messages(record), tokenize=False)
        texts.append(text)
        answer_starts.append(text.rindex(turns[-1]["value"].strip()))
    images = [[e.image] for e in examples if e.image is not None]
    if images and len(images) != len(examples):
        raise ValueError("a batch mixes records with and without images")
    processor.tokenizer.padding_side = "right"
    inputs = processor(text=texts, images=images or None, return_tensors="pt", padding=True)
    labels = torch.full_like(inputs["input_ids"], IGNORE)
    for row, (text, start) in enumerate(zip(texts, answer_starts)):
        offsets = processor.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        tail = sum(1 for _, end in offsets if end > start)  # the answer's tokens, at the end of the row
        length = int(inputs["attention_mask"][row].sum())
        labels[row, length - tail : length] = inputs["input_ids"][row, length - tail : length]
    inputs["labels"] = labels
    return dict(inputs)


def batches(examples: list[Example], size: int, rng: np.random.Generator):
    """Shuffled batches that never mix records with and without images."""
    for with_image in (True, False):
        rows = [i for i, e in enumerate(examples) if (e.image is not None) == with_image]
        rng.shuffle(rows)
        for start in range(0, len(rows), size):
            yield [examples[i] for i in rows[start : start + size]]


def train(model, processor, examples: list[Example], *, epochs: float = 1.0, steps: int | None = None,
          batch_size: int = 16, lr: float = 3e-4, seed: int = 0) -> list[float]:
    """Next-token loss on the answers for `steps` optimiser steps (else `epochs` passes), AdamW
    with a cosine schedule; returns the loss per step. (At 1e-3 and above the tiny models
    learn the answers' wording but never learn to look at the image.)"""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    steps = steps or max(1, math.ceil(epochs * len(examples) / batch_size))
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda s: 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.train()
    losses: list[float] = []
    while len(losses) < steps:
        plan = list(batches(examples, batch_size, rng))
        for i in rng.permutation(len(plan)):
            if len(losses) == steps:
                break
            loss = model(**encode(processor, plan[i])).loss
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
            losses.append(loss.item())
    model.eval()
    return losses


@torch.inference_mode()
def answer_log_likelihood(model, processor, examples: list[Example], answers: list[str]) -> np.ndarray:
    """Summed log-probability of each example's answer (replacing its last turn)."""
    inputs = encode(processor, examples, answers)
    labels = inputs.pop("labels")
    logits = model(**inputs).logits[:, :-1].float()
    targets = labels[:, 1:]
    picked = torch.log_softmax(logits, dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0]
    return (picked * (targets != IGNORE)).sum(dim=1).numpy()


def choose_answers(model, processor, examples: list[Example], candidates: list[list[str]]) -> list[int]:
    """For each example, the index of its most likely candidate answer."""
    chosen = []
    for example, options in zip(examples, candidates):
        scores = answer_log_likelihood(model, processor, [example] * len(options), options)
        chosen.append(int(np.argmax(scores)))
    return chosen


def save(model, processor, folder: str | Path) -> Path:
    """An ordinary safetensors checkpoint that --model loads, written beside `folder` and
    renamed into place: a folder that exists is whole."""
    import shutil

    folder = Path(folder)
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    processor.save_pretrained(partial)
    model.save_pretrained(partial, safe_serialization=True)
    partial.rename(folder)
    return folder
