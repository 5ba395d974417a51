"""A small concept-skill corpus made on the spot: real image files and LLaVA-style records.

Images show coloured shapes (one to four of them) or a rendered word; questions ask for a
skill: colour, shape, counting, reading (OCR-style) or a description. Some records are
text-only. `broken=True` adds records that must each be rejected with a reason: a
corrupt, truncated, empty or non-image file, a missing file, paths escaping the image
root, a decompression bomb (a PNG header claiming 200,000 x 200,000 pixels), an empty
conversation and a duplicate id. Every record carries its planted `concept` and `skill`.
"""

from __future__ import annotations

import io as _io
import json
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

from coincide_ray import io

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (230, 200, 40)}
SHAPES = ("square", "circle", "triangle")
WORDS = ("OPEN", "STOP", "EXIT", "SALE", "PUSH")
SKILLS = ("colour", "shape", "count", "read", "describe")


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], fill) -> None:
    x0, y0, x1, y1 = box
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([((x0 + x1) // 2, y0), (x1, y1), (x0, y1)], fill=fill)


def _canvas(rng: np.random.Generator, size: int) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    """A blank picture on a seeded light background."""
    image = Image.new("RGB", (size, size), tuple(int(v) for v in rng.integers(200, 256, size=3)))
    return image, ImageDraw.Draw(image)


def _sign(draw: ImageDraw.ImageDraw, size: int, word: str) -> str:
    draw.text((size // 6, size // 3), word, fill=(0, 0, 0))
    return word


def _shapes(draw: ImageDraw.ImageDraw, size: int, facts: dict) -> dict:
    """`facts["count"]` shapes of `facts["shape"]` in `facts["colour"]`, one per quarter."""
    cell = size // 2
    for k in range(facts["count"]):
        x, y = (k % 2) * cell, (k // 2) * cell
        _draw_shape(draw, facts["shape"], (x + 4, y + 4, x + cell - 4, y + cell - 4), COLOURS[facts["colour"]])
    return facts


def _picture(rng: np.random.Generator, size: int) -> tuple[Image.Image, dict]:
    image, draw = _canvas(rng, size)
    if rng.random() < 0.2:
        return image, {"word": _sign(draw, size, str(rng.choice(WORDS)))}
    return image, _shapes(draw, size, {"colour": str(rng.choice(list(COLOURS))), "shape": str(rng.choice(SHAPES)),
                                       "count": int(rng.integers(1, 5))})


def _conversation(facts: dict, rng: np.random.Generator, skill: str | None = None) -> tuple[str, str, list[dict]]:
    if "word" in facts:
        skill = "read"
        q, a = "What does the sign say?", f"It says {facts['word']}."
        concept = "text"
    else:
        skill = skill or str(rng.choice(["colour", "shape", "count", "describe"]))
        concept = f"{facts['colour']} {facts['shape']}"
        q, a = {
            "colour": ("What colour are the shapes?", f"They are {facts['colour']}."),
            "shape": ("What shape is shown?", f"A {facts['shape']}."),
            "count": (f"How many {facts['shape']}s are there?", f"There are {facts['count']}."),
            "describe": ("Describe the image.",
                         f"{facts['count']} {facts['colour']} {facts['shape']}(s) on a light background."),
        }[skill]
    turns = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
    return concept, skill, turns


def _text_only(rng: np.random.Generator) -> tuple[str, str, list[dict]]:
    a, b = (int(v) for v in rng.integers(1, 10, size=2))
    turns = [{"from": "human", "value": f"What is {a} plus {b}?"}, {"from": "gpt", "value": f"{a + b}."}]
    return "arithmetic", "text", turns


def bomb_png(width: int = 200_000, height: int = 200_000) -> bytes:
    """A tiny PNG whose header claims a huge image."""
    raw = Image.new("RGB", (1, 1))
    buffer = _io.BytesIO()
    raw.save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = 8 + 8  # signature, then length + type of the IHDR chunk
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[12 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    return bytes(data)


def write_corpus(records_uri: str, image_root: str, n: int, *, seed: int = 0, image_size: int = 64,
                 text_only_share: float = 0.1, broken: bool = True) -> list[dict]:
    """Write `n` good records (+ the broken ones) as a JSON list and their images; returns
    the records. Image files are PNGs under image_root/images/."""
    rng = np.random.default_rng(seed)
    records = []
    for i in range(n):
        sample_id = f"demo-{i:06d}"
        if rng.random() < text_only_share:
            concept, skill, turns = _text_only(rng)
            records.append({"id": sample_id, "conversations": turns, "concept": concept, "skill": skill})
            continue
        image, facts = _picture(rng, image_size)
        concept, skill, turns = _conversation(facts, rng)
        path = f"images/{sample_id}.png"
        buffer = _io.BytesIO()
        image.save(buffer, format="PNG")
        io.write_bytes(io.join(image_root, path), buffer.getvalue())
        records.append({"id": sample_id, "image": path, "conversations": turns, "concept": concept, "skill": skill})
    if broken:
        records += _broken_records(image_root, image_size)
    io.write_bytes(records_uri, json.dumps(records).encode())
    return records


# Concept-skill groups of the long-tailed corpus: every colour-shape concept with every
# visual skill, signs to read, and text-only arithmetic.
GROUPS = tuple(f"{c} {s}/{k}" for c in COLOURS for s in SHAPES for k in ("colour", "shape", "count", "describe")) \
    + ("text/read", "arithmetic/text")


def long_tail_counts(n: int, *, exponent: float = 1.1, seed: int = 0) -> dict[str, int]:
    """Records per group for `n` records: Zipf-like sizes (the k-th largest group ~ 1/k^exponent)
    over the groups in a seeded order, every group given at least one record, so a few groups
    are large and many are rare."""
    if n < len(GROUPS):
        raise ValueError(f"a long-tailed corpus needs at least one record per group: n >= {len(GROUPS)}, got {n}")
    order = np.random.default_rng(seed).permutation(len(GROUPS))
    weights = 1.0 / np.arange(1, len(GROUPS) + 1) ** exponent
    counts = 1 + np.floor(weights / weights.sum() * (n - len(GROUPS))).astype(int)
    counts[0] += n - counts.sum()  # the rounding remainder goes to the largest group
    return {GROUPS[g]: int(c) for g, c in zip(order, counts)}


def _group_record(group: str, rng: np.random.Generator, size: int) -> tuple[Image.Image | None, list[dict]]:
    """A picture (None for text-only) and a conversation of `group`."""
    concept, skill = group.split("/")
    if skill == "text":
        return None, _text_only(rng)[2]
    image, draw = _canvas(rng, size)
    if skill == "read":
        facts = {"word": _sign(draw, size, str(rng.choice(WORDS)))}
    else:
        colour, shape = concept.split()
        facts = _shapes(draw, size, {"colour": colour, "shape": shape, "count": int(rng.integers(1, 5))})
    return image, _conversation(facts, rng, skill)[2]


def write_grouped_corpus(records_uri: str, image_root: str, counts: dict[str, int], *, seed: int = 0,
                         image_size: int = 64, prefix: str = "rec", broken: bool = False) -> list[dict]:
    """Write `counts[group]` records of each concept-skill group (GROUPS) as a JSON list and
    their images, in a seeded shuffled order; each record carries `concept`, `skill` and
    `group`. With long_tail_counts this is the long-tailed corpus of the demo and of
    jobs/reproduce.py; with equal counts, a balanced test set. `broken` adds the records that
    must be rejected (see write_corpus)."""
    rng = np.random.default_rng(seed)
    groups = [g for g, c in counts.items() for _ in range(c)]
    records = []
    for i, position in enumerate(rng.permutation(len(groups))):
        group = groups[position]
        sample_id = f"{prefix}-{i:06d}"
        image, turns = _group_record(group, rng, image_size)
        concept, skill = group.split("/")
        record = {"id": sample_id, "conversations": turns, "concept": concept, "skill": skill, "group": group}
        if image is not None:
            record["image"] = f"images/{sample_id}.png"
            buffer = _io.BytesIO()
            image.save(buffer, format="PNG")
            io.write_bytes(io.join(image_root, record["image"]), buffer.getvalue())
        records.append(record)
    if broken:
        records += _broken_records(image_root, image_size, duplicate=records[0]["id"])
    io.write_bytes(records_uri, json.dumps(records).encode())
    return records


BROKEN_REASONS = {
    "bad-corrupt": "not an image",
    "bad-truncated": "truncated or corrupt image",
    "bad-empty": "empty image file",
    "bad-missing": "missing image file",
    "bad-escape": "image path outside the image root",
    "bad-absolute": "image path outside the image root",
    "bad-scheme": "image path outside the image root",
    "bad-bomb": "image over the pixel limit",
    "bad-noconv": "missing or empty conversations",
    "demo-000000": "duplicate id",
}


def _broken_records(image_root: str, image_size: int, duplicate: str = "demo-000000") -> list[dict]:
    turns = [{"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "Something."}]
    noise = np.random.default_rng(0).integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)
    good = _io.BytesIO()  # noise does not compress: half the file is half the pixel data
    Image.fromarray(noise).save(good, format="PNG")
    files = {
        "broken/corrupt.png": b"this is not a png at all",
        "broken/truncated.png": good.getvalue()[: len(good.getvalue()) // 2],
        "broken/empty.png": b"",
        "broken/bomb.png": bomb_png(),
    }
    for path, data in files.items():
        io.write_bytes(io.join(image_root, path), data)
    image_for = {
        "bad-corrupt": "broken/corrupt.png", "bad-truncated": "broken/truncated.png", "bad-empty": "broken/empty.png",
        "bad-missing": "broken/nowhere.png", "bad-escape": "../outside.png", "bad-absolute": "/etc/passwd",
        "bad-scheme": "s3://another-bucket/x.png", "bad-bomb": "broken/bomb.png",
    }
    records = [{"id": k, "image": v, "conversations": turns, "concept": "broken", "skill": "broken"}
               for k, v in image_for.items()]
    records.append({"id": "bad-noconv", "conversations": [], "concept": "broken", "skill": "broken"})
    records.append({"id": duplicate, "conversations": turns[:1] + [{"from": "gpt", "value": "again"}],
                    "concept": "broken", "skill": "broken"})
    return records

