"""CPU-side preparation of one input block: fetch and decode images, render the chat
template, tokenise. Everything that can go wrong with one record becomes a Rejection;
the model actors only ever receive ready tensors."""

from __future__ import annotations

import io as _io
import json
import re
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from coincide_ray import io
from coincide_ray.schema import LANGUAGE_START
from coincide_ray.embed.reuse import PreviousVectors, record_fingerprint
from coincide_ray.records import Record, RecordProblem, Rejection, chat_messages

STAGE = "embed"


@dataclass
class Batch:
    """Model inputs for some records of a block, and their positions in the block."""

    positions: list[int]
    inputs: dict[str, np.ndarray]


class ContextError(ValueError):
    """A record the model's context cannot hold even when cut (its image tokens do not fit)."""


def fit_context(inputs: dict[str, np.ndarray], max_tokens: int, image_token_id: int | None) -> list[int]:
    """Cut rows longer than the model's context to their first `max_tokens` tokens, in place
    (padding moved to the right first, so every row keeps its beginning); returns the rows
    cut. A row whose image tokens would be cut raises ValueError: the model cannot take it."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    if not max_tokens or ids.shape[1] <= max_tokens:
        return []
    lengths = mask.sum(axis=1)
    leading = np.argmax(mask > 0, axis=1)  # pads before the first real token
    shape = ids.shape
    index = (np.arange(shape[1])[None, :] + leading[:, None]) % shape[1]
    for key, value in list(inputs.items()):
        if isinstance(value, np.ndarray) and value.shape[:2] == shape:
            inputs[key] = np.take_along_axis(value, index.reshape(index.shape + (1,) * (value.ndim - 2)), axis=1)
    if image_token_id is not None:
        before = (inputs["input_ids"] == image_token_id).sum(axis=1)
        after = (inputs["input_ids"][:, :max_tokens] == image_token_id).sum(axis=1)
        if (after < before).any():
            raise ContextError(f"the image tokens do not fit in the model's context of {max_tokens} tokens")
    for key, value in list(inputs.items()):
        if isinstance(value, np.ndarray) and value.shape[:2] == shape:
            inputs[key] = value[:, :max_tokens]
    return [int(row) for row in np.flatnonzero(lengths > max_tokens)]


def drop_tokens(inputs: dict[str, np.ndarray], drop_ids: tuple[int, ...]) -> dict[str, np.ndarray]:
    """Remove every attended token whose id is in `drop_ids` from each row, closing the gap,
    with padding after the last kept token; every per-token array is cut the same way. This
    is the authors' TinyLLaVA collator: its attention mask is `input_ids != pad_token_id`,
    and `prepare_inputs_labels_for_multimodal` deletes every masked token before the forward
    pass, so their model never sees the pad-id token (for arcade100k also the turn separator)."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    keep = mask.astype(bool) & ~np.isin(ids, np.asarray(drop_ids, dtype=ids.dtype))
    width = int(keep.sum(axis=1).max(initial=0))
    order = np.argsort(~keep, axis=1, kind="stable")[:, :width]  # kept tokens first, in their order
    kept = np.take_along_axis(keep, order, axis=1)
    out = dict(inputs)
    for key, value in inputs.items():
        if isinstance(value, np.ndarray) and value.shape[:2] == ids.shape:
            moved = np.take_along_axis(value, order.reshape(order.shape + (1,) * (value.ndim - 2)), axis=1)
            out[key] = np.where(kept.reshape(kept.shape + (1,) * (value.ndim - 2)), moved, np.zeros_like(moved))
    out["attention_mask"] = kept.astype(mask.dtype)
    return out


def plan_batches(lengths, max_rows: int, max_tokens: int) -> list[np.ndarray]:
    """Positions (into `lengths`) of each batch: the records sorted by token count, cut when
    a batch would hold more than `max_rows` records or its padded size (rows x its longest)
    would pass `max_tokens`. Neighbours in length share a batch, so a long conversation pads
    only other long ones; a record longer than `max_tokens` is a batch of its own."""
    lengths = np.asarray(lengths, dtype=np.int64)
    batches, current = [], []
    for position in np.argsort(lengths, kind="stable"):
        if current and (len(current) == max_rows or lengths[position] * (len(current) + 1) > max_tokens):
            batches.append(np.array(current))
            current = []
        current.append(position)
    if current:
        batches.append(np.array(current))
    return batches


def padding_share(lengths, batches: list[np.ndarray]) -> float:
    """The share of the tokens the forward passes compute that are padding."""
    lengths = np.asarray(lengths, dtype=np.int64)
    padded = sum(int(lengths[batch].max()) * len(batch) for batch in batches if len(batch))
    return 1.0 - int(lengths.sum()) / max(padded, 1)


@dataclass
class PreparedBlock:
    block: int
    ids: list[str]  # every record of the block, in block order
    batches: list[Batch] = field(default_factory=list)
    rejected: dict[int, Rejection] = field(default_factory=dict)  # position -> why
    fingerprints: dict[int, str] = field(default_factory=dict)  # position -> fingerprint (coincide_ray.embed.reuse)
    reused: dict[int, tuple[str, int]] = field(default_factory=dict)  # position -> (earlier part file, row)
    truncated: list[int] = field(default_factory=list)  # positions cut to the model's context

    def to_bytes(self) -> bytes:
        """The block as one binary value Ray Data carries in an Arrow column: the tensors as
        .npy entries (dtype and shape kept, no pickle), the rest as JSON beside them."""
        meta = {"block": self.block, "ids": self.ids, "truncated": self.truncated,
                "rejected": [[p, *(getattr(r, f) for f in ("id", "stage", "reason", "detail"))]
                             for p, r in self.rejected.items()],
                "fingerprints": [[p, f] for p, f in self.fingerprints.items()],
                "reused": [[p, uri, row] for p, (uri, row) in self.reused.items()],
                "batches": [{"positions": b.positions, "inputs": list(b.inputs)} for b in self.batches]}
        arrays = {f"{k}/{name}": np.asarray(value) for k, b in enumerate(self.batches) for name, value in b.inputs.items()}
        buffer = _io.BytesIO()
        np.savez(buffer, allow_pickle=False, **{"meta": np.frombuffer(json.dumps(meta).encode(), np.uint8)}, **arrays)
        return buffer.getvalue()

    @classmethod
    def from_bytes(cls, data: bytes) -> "PreparedBlock":
        with np.load(_io.BytesIO(data), allow_pickle=False) as arrays:
            meta = json.loads(arrays["meta"].tobytes())
            batches = [Batch(b["positions"], {name: arrays[f"{k}/{name}"] for name in b["inputs"]})
                       for k, b in enumerate(meta["batches"])]
        return cls(meta["block"], meta["ids"], batches,
                   rejected={p: Rejection(*rest) for p, *rest in meta["rejected"]},
                   fingerprints={p: f for p, f in meta["fingerprints"]},
                   reused={p: (uri, row) for p, uri, row in meta["reused"]}, truncated=meta["truncated"])


def template_prefix_tokens(processor) -> int:
    """Tokens of the chat template that come before any conversation text: the common
    token prefix of two text-only conversations that differ from their first character."""
    def ids(text: str) -> list[int]:
        messages = [{"role": "user", "content": [{"type": "text", "text": text}]}]
        prompt = processor.apply_chat_template(messages, tokenize=False)
        return processor.tokenizer(prompt, add_special_tokens=False)["input_ids"]

    a, b = ids("alpha"), ids("1 2 3")
    common = 0
    while common < min(len(a), len(b)) and a[common] == b[common]:
        common += 1
    return common


def decode_image(data: bytes, max_pixels: int) -> Image.Image:
    """An RGB image; RecordProblem with one of the image reasons for anything unusable, the
    decoder's own words in its detail."""
    if not data:
        raise RecordProblem("empty image file")
    try:
        image = Image.open(_io.BytesIO(data))
        width, height = image.size
        if width * height > max_pixels:
            raise RecordProblem("image over the pixel limit", f"{width} x {height}")
        image.load()
        image = ImageOps.exif_transpose(image)  # shown as the camera meant it, as viewers do
        return eight_bit(image).convert("RGB")
    except RecordProblem:
        raise
    except UnidentifiedImageError as error:
        raise RecordProblem("not an image", one_line(error)) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RecordProblem("image over the pixel limit", one_line(error)) from None
    except ValueError as error:  # Pillow's own limits on text and ICC chunks (PNG text bombs)
        if "too large" in str(error).lower():
            raise RecordProblem("image metadata too large", one_line(error)) from None
        raise RecordProblem("truncated or corrupt image", one_line(error)) from None
    except (OSError, SyntaxError, EOFError, struct.error, IndexError, TypeError, ZeroDivisionError) as error:
        # what Pillow's plug-ins raise on cut-short or malformed files, from open() or load()
        raise RecordProblem("truncated or corrupt image", one_line(error)) from None


def one_line(error: BaseException) -> str:
    """The error as one short line, without object addresses (`<_io.BytesIO object at
    0x7f...>`): a rejection's detail must be the same on every run."""
    text = ADDRESS.sub("", " ".join(str(error).split()))
    return f"{type(error).__name__}: {text[:300]}"


ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def eight_bit(image: Image.Image) -> Image.Image:
    """Pillow's convert("RGB") clips wide pixel values to 255, so a 16-bit or float image
    would come out white. Integer images are scaled from the range their bit depth gives
    (16 bits: 0..65535; wider: their own maximum), float images from 0..1 when they lie in
    it, else from their own maximum."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        return image
    pixels = np.asarray(image, dtype=np.float64)
    pixels = np.where(np.isfinite(pixels), pixels, 0.0)
    top = float(pixels.max()) if pixels.size else 0.0
    if image.mode == "F":
        full = 1.0 if top <= 1.0 else top
    else:
        full = 65535.0 if top <= 65535 else top
        full = 255.0 if image.mode == "I" and top <= 255 else full  # an 8-bit image stored wide
    scaled = np.clip(pixels / max(full, 1e-12) * 255.0, 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8), mode="L")


def fetch_image(image_root: str | None, record: Record, read: bool = True) -> tuple[bytes | None, str]:
    """The record's image bytes (None unless `read`) and content digest (io.digest: an
    unchanged image's digest needs no read); RecordProblem with the reason when it cannot
    be had."""
    if image_root is None:
        raise RecordProblem("record names an image but no --image-root was given")
    try:
        uri = io.under(image_root, record.image)
        return io.read_with_digest(uri) if read else (None, io.digest(uri))
    except io.OutsideRootError as error:
        raise RecordProblem("image path outside the image root", str(error)) from None
    except FileNotFoundError:
        raise RecordProblem("missing image file") from None
    except (PermissionError, OSError) as error:
        raise RecordProblem("image not readable", one_line(error)) from None


@dataclass
class Fingerprinted:
    """A block's records with their images fetched (or only their digests): what decides
    whether a finished block can be reused, and what preparation continues from."""

    rejected: dict[int, Rejection] = field(default_factory=dict)  # position -> why (before the model saw it)
    fingerprints: dict[int, str] = field(default_factory=dict)  # position -> record fingerprint
    images: dict[int, bytes | None] = field(default_factory=dict)  # position -> image bytes (None: text-only or not read)


FETCH_IN_FLIGHT = 16  # image requests a preparer keeps open at once (S3 answers each in tens of ms)


def fingerprint_block(items: list[Record | Rejection], image_root: str | None, salt: str,
                      in_flight: int = FETCH_IN_FLIGHT, read: bool = True) -> Fingerprinted:
    """Fingerprint every record of the block (coincide_ray.embed.reuse), `in_flight` image
    requests at a time, reading the images too when `read` (else only their digests: a
    reuse check never reads an unchanged image). Each fetch keeps its own retries and reason."""
    def fetched(position: int) -> tuple[bytes | None, str | None] | ValueError:
        item = items[position]
        try:
            return fetch_image(image_root, item, read) if item.image is not None else (None, None)
        except ValueError as error:
            return error

    records = [p for p, item in enumerate(items) if not isinstance(item, Rejection)]
    with ThreadPoolExecutor(max_workers=max(1, min(in_flight, len(records)))) as pool:
        results = dict(zip(records, pool.map(fetched, records)))
    done = Fingerprinted()
    for position, item in enumerate(items):
        if isinstance(item, Rejection):
            done.rejected[position] = item
        elif isinstance(results[position], ValueError):
            done.rejected[position] = rejection(item, results[position])
        else:
            data, digest = results[position]
            done.fingerprints[position] = record_fingerprint(salt, item, digest)
            done.images[position] = data
    return done


def rejection(item: Record, error: BaseException) -> Rejection:
    """The record's rejection: a RecordProblem's reason, else "processor failed" (the chat
    template or the tokenizer refused it); raw text only in the detail."""
    if isinstance(error, RecordProblem):
        reason, raw = error.reason, error.detail
    else:
        reason, raw = "processor failed", one_line(error)
    return Rejection(item.id, STAGE, reason, f"{item.position}: {raw}" if raw else item.position)


def block_signature(ids: list[str], fingerprints: dict, rejected: dict) -> list[tuple]:
    """Per position: (id, fingerprint) for a fingerprinted record, whose outcome the
    fingerprint decides (model, layers, content, image bytes and limits); (id, reason) for
    one rejected before it had a fingerprint. Never the detail: it names the input file as
    the path was spelled, which must not decide whether a block is redone."""
    return [(ids[p], fingerprints[p]) if p in fingerprints else (ids[p], rejected[p].reason) for p in range(len(ids))]


class Preprocessor:
    """Turns the records of one block into model-ready batches (runs in CPU workers)."""

    def __init__(self, processor, *, image_root: str | None, batch_size: int, max_image_pixels: int,
                 salt: str = "", previous: PreviousVectors | None = None, max_tokens: int = 0,
                 batch_tokens: int = 0, fetch_in_flight: int = FETCH_IN_FLIGHT,
                 drop_in_image_rows: tuple[int, ...] = ()):
        self.processor = processor
        self.drop_in_image_rows = tuple(drop_in_image_rows)  # token ids removed from image records (a recipe)
        self.max_tokens = max_tokens  # the model's context; longer rows are cut (0: no limit)
        self.salt = salt  # run_salt(model, layers): part of every record fingerprint
        self.previous = previous  # an earlier run's vectors, reused by fingerprint
        self.image_root = image_root
        self.fetch_in_flight = fetch_in_flight
        self.batch_size = batch_size  # records per forward pass at most
        self.batch_tokens = batch_tokens or 2**62  # padded tokens per forward pass at most (0: no limit)
        self.max_image_pixels = max_image_pixels
        self.language_start = template_prefix_tokens(processor)
        self.image_tokens: int | None = None  # per image, as the processor expands a small one

    def encode(self, prompts: list[str], images: list[Image.Image] | None) -> dict[str, np.ndarray]:
        kwargs: dict[str, Any] = {"text": prompts, "return_tensors": "np", "padding": True}
        if images is not None:
            kwargs["images"] = [[image] for image in images]
        out = dict(self.processor(**kwargs))
        out[LANGUAGE_START] = np.full(len(prompts), self.language_start, dtype=np.int64)
        return out

    def prepare(self, block: int, items: list[Record | Rejection]) -> PreparedBlock:
        fetched = fingerprint_block(items, self.image_root, self.salt, self.fetch_in_flight)
        prepared = PreparedBlock(block, [item.id for item in items], rejected=fetched.rejected,
                                 fingerprints=fetched.fingerprints)
        ready: dict[bool, list[tuple[int, str, Image.Image | None]]] = {True: [], False: []}
        for position, fingerprint in fetched.fingerprints.items():
            item, data = items[position], fetched.images[position]
            try:
                earlier = self.previous.find(fingerprint, item.id) if self.previous else None
                if earlier:
                    prepared.reused[position] = earlier
                    continue
                image = decode_image(data, self.max_image_pixels) if data is not None else None
                prompt = self.processor.apply_chat_template(chat_messages(item), tokenize=False)
            except Exception as error:  # one bad record never takes its block down
                prepared.rejected[position] = rejection(item, error)
                continue
            ready[image is not None].append((position, prompt, image))
        # Records with and without images are batched apart: some processors cannot mix them.
        for with_image, rows in ready.items():
            if not rows:
                continue
            lengths = self.token_estimate([prompt for _, prompt, _ in rows], with_image)
            for batch in plan_batches(lengths, self.batch_size, self.batch_tokens):
                self._add_batch(prepared, [rows[i] for i in batch], with_image, items)
        return prepared

    def token_estimate(self, prompts: list[str], with_image: bool) -> np.ndarray:
        """Tokens each prompt will take: its text tokens, plus the image's tokens as the
        processor expands them for a small image (exact where every image gets the same
        count, as LLaVA's; a lower bound where large images get more tiles)."""
        text = self.processor.tokenizer(prompts, add_special_tokens=False)["input_ids"]
        lengths = np.array([len(ids) for ids in text], dtype=np.int64)
        if with_image:
            if self.image_tokens is None:
                probe = self.processor.apply_chat_template(
                    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}], tokenize=False)
                token = getattr(self.processor, "image_token_id", None)
                ids = self.encode([probe], [Image.new("RGB", (32, 32))])["input_ids"][0]
                self.image_tokens = int((ids == token).sum()) if token is not None else 0
            lengths += self.image_tokens
        return lengths

    def _add_batch(self, prepared: PreparedBlock, rows, with_image: bool, items) -> None:
        try:
            inputs = self.encode([p for _, p, _ in rows], [i for _, _, i in rows] if with_image else None)
            if with_image and self.drop_in_image_rows:
                inputs = drop_tokens(inputs, self.drop_in_image_rows)
            cut = fit_context(inputs, self.max_tokens, getattr(self.processor, "image_token_id", None))
            prepared.truncated += [rows[row][0] for row in cut]
            prepared.batches.append(Batch([position for position, _, _ in rows], inputs))
            return
        except Exception as error:
            if len(rows) == 1:
                item = items[rows[0][0]]
                detail = f"{item.position}: {type(error).__name__}: {str(error)[:300]}"
                reason = "longer than the model's context" if isinstance(error, ContextError) else "processor failed"
                prepared.rejected[rows[0][0]] = Rejection(item.id, STAGE, reason, detail)
                return
        for row in rows:  # find the record that broke the batch; keep the others
            self._add_batch(prepared, [row], with_image, items)
