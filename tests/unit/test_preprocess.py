import io as _io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image
from transformers import AutoProcessor

from coincide_ray.toy.corpus import bomb_png
from coincide_ray.embed.preprocess import (
    Preprocessor,
    decode_image,
    template_prefix_tokens,
)
from coincide_ray.toy.tiny import build_tiny_checkpoint
from coincide_ray.records import REASONS, Record, Rejection


def png(size=(20, 10), noise=False):
    buffer = _io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8) if noise else None
    image = Image.fromarray(pixels) if noise else Image.new("RGB", size, (9, 9, 9))
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def truncated_png():
    """Noise does not compress, so cutting the file in half cuts the pixel data."""
    data = png((64, 64), noise=True)
    return data[: len(data) // 2]


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_with_chunk(kind: bytes, body: bytes) -> bytes:
    """A valid 4 x 4 PNG with one more chunk after its header."""
    data = png((4, 4))
    return data[:33] + chunk(kind, body) + data[33:]


def text_bomb():
    return png_with_chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"A" * (64 * 2**20), 9))


def icc_bomb():
    return png_with_chunk(b"iCCP", b"icc\0\0" + zlib.compress(b"\0" * (64 * 2**20), 9))


def truncated_jpeg(cut: int) -> bytes:
    buffer = _io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()[:cut]


UNUSABLE = [
    (b"", "empty image file"),
    (b"GIF89a-not-really", "not an image"),
    (truncated_png(), "truncated or corrupt image"),
    (bomb_png(), "image over the pixel limit"),
    (truncated_jpeg(200), "truncated or corrupt image"),  # cut in its header: Image.open itself fails
    (truncated_jpeg(1500), "truncated or corrupt image"),
    (text_bomb(), "image metadata too large"),
    (icc_bomb(), "image metadata too large"),
]


@pytest.mark.parametrize("data, reason", UNUSABLE)
def test_unusable_images_say_why(data, reason):
    with pytest.raises(ValueError, match=reason):
        decode_image(data, max_pixels=10_000_000)


def test_every_rejection_reason_is_a_documented_category_with_the_raw_text_in_detail(processor, tmp_path):
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A thing."}]
    items = []
    for i, (data, _) in enumerate(UNUSABLE):
        (tmp_path / f"{i}.img").write_bytes(data)
        items.append(Record(f"r{i}", f"{i}.img", turns, f"p#{i}"))
    block = Preprocessor(processor, image_root=str(tmp_path), batch_size=4, max_image_pixels=10**7).prepare(0, items)
    assert {p: r.reason for p, r in block.rejected.items()} == {i: reason for i, (_, reason) in enumerate(UNUSABLE)}
    assert all(r.reason in REASONS for r in block.rejected.values())
    assert "Truncated File Read" in block.rejected[4].detail and block.rejected[4].detail.startswith("p#4: ")
    assert "MAX_TEXT_CHUNK" in block.rejected[6].detail


def test_pixel_limit_and_good_images():
    with pytest.raises(ValueError, match="pixel limit"):
        decode_image(png((100, 100)), max_pixels=9_999)
    image = decode_image(png(), max_pixels=10_000)
    assert image.mode == "RGB" and image.size == (20, 10)


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    return AutoProcessor.from_pretrained(build_tiny_checkpoint(tmp_path_factory.mktemp("m"), "llava", layers=2))


def test_template_prefix_is_the_system_part_and_user_header(processor):
    n = template_prefix_tokens(processor)
    messages = [{"role": "user", "content": [{"type": "text", "text": "What colour?"}]}]
    ids = processor.tokenizer(processor.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
    prefix = processor.tokenizer.decode(ids["input_ids"][:n])
    assert prefix.startswith("A chat between") and prefix.rstrip().endswith("USER:")


def test_a_bad_record_never_takes_its_block_down(processor, tmp_path):
    (tmp_path / "ok.png").write_bytes(png((40, 40)))
    (tmp_path / "bad.png").write_bytes(b"nope")
    turns = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A thing."}]
    items = [Record("a", "ok.png", turns, "p#0"), Record("b", "bad.png", turns, "p#1"),
             Rejection("c", "read", "missing id", "p#2"), Record("d", None, turns, "p#3"),
             Record("e", "missing.png", turns, "p#4")]
    pre = Preprocessor(processor, image_root=str(tmp_path), batch_size=4, max_image_pixels=10**6)
    block = pre.prepare(7, items)
    assert block.block == 7 and block.ids == ["a", "b", "c", "d", "e"]
    assert {p: r.reason for p, r in block.rejected.items()} == {1: "not an image", 2: "missing id",
                                                                 4: "missing image file"}
    assert sorted(p for b in block.batches for p in b.positions) == [0, 3]
    for batch in block.batches:  # image and text-only records are never mixed in a batch
        has_image = [bool((ids == processor.image_token_id).any()) for ids in batch.inputs["input_ids"]]
        assert len(set(has_image)) == 1
        assert (batch.inputs["language_start"] == template_prefix_tokens(processor)).all()
    no_root = Preprocessor(processor, image_root=None, batch_size=4, max_image_pixels=10**6).prepare(0, items[:1])
    assert no_root.rejected[0].reason == "record names an image but no --image-root was given"


def test_rows_longer_than_the_context_are_cut_and_counted(processor, tmp_path):
    (tmp_path / "ok.png").write_bytes(png((40, 40)))
    short = [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A thing."}]
    long = [{"from": "human", "value": "<image>\n" + "and more words " * 200}, {"from": "gpt", "value": "Yes."}]
    items = [Record("short", "ok.png", short, "p#0"), Record("long", "ok.png", long, "p#1")]
    alone = Preprocessor(processor, image_root=str(tmp_path), batch_size=4, max_image_pixels=10**6)
    reference = alone.prepare(0, items[:1]).batches[0].inputs
    limit = int(reference["attention_mask"].sum()) + 40  # the short row fits, the long one does not
    pre = Preprocessor(processor, image_root=str(tmp_path), batch_size=4, max_image_pixels=10**6, max_tokens=limit)
    block = pre.prepare(0, items)
    assert block.truncated == [1] and not block.rejected
    inputs = block.batches[0].inputs
    assert inputs["input_ids"].shape[1] == limit and inputs["attention_mask"][1].sum() == limit
    image = processor.image_token_id
    assert (inputs["input_ids"][1] == image).sum() == (reference["input_ids"][0] == image).sum()
    kept = inputs["attention_mask"][0].astype(bool)  # the short row: the same tokens as alone
    assert list(inputs["input_ids"][0][kept]) == list(reference["input_ids"][0][reference["attention_mask"][0] > 0])

    tiny = Preprocessor(processor, image_root=str(tmp_path), batch_size=4, max_image_pixels=10**6, max_tokens=8)
    block = tiny.prepare(0, items[:1])  # not even the image fits
    assert block.rejected[0].reason == "longer than the model's context" and not block.batches


def test_batches_are_cut_by_a_token_budget_over_sorted_lengths():
    from coincide_ray.embed.preprocess import padding_share, plan_batches

    rng = np.random.default_rng(3)
    lengths = rng.integers(1, 400, 97)
    lengths[10] = 5000  # longer than the budget: a batch of its own
    batches = plan_batches(lengths, max_rows=16, max_tokens=1024)
    assert sorted(np.concatenate(batches).tolist()) == list(range(97))  # every record once
    flat = np.concatenate(batches)
    assert np.all(np.diff(lengths[flat]) >= 0)  # in length order
    for batch in batches:
        assert len(batch) <= 16
        assert len(batch) == 1 or lengths[batch].max() * len(batch) <= 1024
    assert [10] in [b.tolist() for b in batches]
    # the greedy cut: a batch ends only when the next record would break a limit
    for batch, after in zip(batches, batches[1:]):
        assert len(batch) == 16 or lengths[after[0]] * (len(batch) + 1) > 1024
    # padding: the share of computed tokens that are padding
    assert padding_share([2, 4], [np.array([0, 1])]) == 1 - 6 / 8
    assert padding_share(lengths, batches) < padding_share(lengths, np.array_split(np.arange(97), 13))
