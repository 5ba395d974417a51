"""Loading an image-text-to-text checkpoint from a local folder or an s3:// prefix."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from coincide_ray import io
from coincide_ray.config import EmbedConfig


class ModelError(ValueError):
    """The checkpoint cannot be used (one line, for the user)."""


def model_files(uri: str) -> list[tuple[str, int]]:
    """(relative name, size) of every file of the checkpoint, sorted."""
    fs, root = io.resolve(uri)
    if not fs.exists(root) or not fs.isdir(root):
        raise ModelError(f"no checkpoint folder at {uri}")
    entries = []
    for path, info in sorted(fs.find(root, detail=True).items()):
        entries.append((path[len(root.rstrip("/")) + 1 :], int(info.get("size") or 0)))
    if not any(name.endswith(".safetensors") for name, _ in entries):
        raise ModelError(f"{uri} holds no .safetensors weights; pickled weights (.bin, .pt) are refused")
    if not any(name == "config.json" for name, _ in entries):
        raise ModelError(f"{uri} has no config.json: not a Hugging Face checkpoint folder")
    return entries


SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1, "I64": 8, "I32": 4,
                     "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1}
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit


def safetensors_tensors(uri: str) -> dict[str, tuple[str, tuple[int, ...]]]:
    """{tensor name: (dtype, shape)} from one .safetensors file's header, read without its
    data (a range read on S3). ModelError, in one line naming the file, when the header is
    not one: a length beyond the file, not JSON, an unknown dtype, offsets outside the data
    or not matching the shape."""
    size = io.size(uri)
    fs, path = io.resolve(uri)

    def head() -> tuple[int, bytes]:
        with fs.open(path, "rb") as f:
            first = f.read(8)
            length = int.from_bytes(first, "little") if len(first) == 8 else -1
            return length, (f.read(length) if 0 <= length <= min(MAX_HEADER_BYTES, size - 8) else b"")

    length, raw = io.retried(uri, "reading", head)
    if length < 0:
        raise ModelError(f"{uri}: not a safetensors file (shorter than its 8-byte header length)")
    if length > min(MAX_HEADER_BYTES, size - 8):
        raise ModelError(f"{uri}: corrupt safetensors header: it claims {length:,} bytes of header in a file of "
                         f"{size:,} bytes")
    try:
        header = json.loads(raw)
    except ValueError:
        raise ModelError(f"{uri}: corrupt safetensors header: not JSON") from None
    if not isinstance(header, dict):
        raise ModelError(f"{uri}: corrupt safetensors header: not a mapping of tensors")
    data = size - 8 - length
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            fits = (dtype in SAFETENSORS_BYTES and all(isinstance(n, int) and n >= 0 for n in shape)
                    and 0 <= start <= end <= data and end - start == math.prod(shape) * SAFETENSORS_BYTES[dtype])
        except (KeyError, TypeError, ValueError):
            fits = False
        if not fits:
            raise ModelError(f"{uri}: corrupt safetensors header: tensor {name[:100]!r} has an unknown dtype, a bad "
                             "shape or data outside the file")
        tensors[name] = (dtype, shape)
    return tensors


def check_weights(uri: str, trust_remote_code: bool = False) -> None:
    """Every .safetensors file of the checkpoint has a sound header, and every tensor the
    config's model has is stored with the shape the config gives it: a corrupt or mismatched
    checkpoint is one line naming the file, before Ray starts. Reads headers and config.json
    only. (Custom model code is not run here: with trust_remote_code only headers are checked.)"""
    stored: dict[str, tuple[str, tuple[int, ...]]] = {}
    for name, _ in model_files(uri):
        if name.endswith(".safetensors"):
            file = io.join(uri, name)
            stored.update({key: (file, shape) for key, (_, shape) in safetensors_tensors(file).items()})
    if trust_remote_code:
        return
    expected = SuffixIndex(config_shapes(uri))
    for key, (file, shape) in stored.items():
        match = expected.find(key)
        if match is not None and expected.shapes[match] != shape:
            raise ModelError(f"{file}: tensor {key} has shape {list(shape)} but config.json asks for "
                             f"{list(expected.shapes[match])} ({match})")


class SuffixIndex:
    """The model's parameter names, found by their dotted endings: checkpoints name the same
    tensor under other prefixes (`language_model.model.layers.0...` for
    `model.language_model.layers.0...`), so a stored name is matched to the one parameter
    that shares its shortest unambiguous ending of two or more parts, or to none."""

    LONGEST = 8

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes
        self.by_ending: dict[tuple[str, ...], list[str]] = {}
        for name in shapes:
            parts = tuple(name.split("."))
            for length in range(2, min(len(parts), self.LONGEST) + 1):
                self.by_ending.setdefault(parts[-length:], []).append(name)

    def find(self, stored: str) -> str | None:
        parts = tuple(stored.split("."))
        for length in range(2, min(len(parts), self.LONGEST) + 1):
            names = self.by_ending.get(parts[-length:], [])
            if len(names) <= 1:
                return names[0] if names else None
        return None


def config_shapes(uri: str) -> dict[str, tuple[int, ...]]:
    """{parameter name: shape} of the model config.json describes, built on the meta device
    (no memory, no weights)."""
    import tempfile

    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "config.json").write_bytes(io.read_bytes(io.join(uri, "config.json")))
        try:
            config = AutoConfig.from_pretrained(folder)
        except (ValueError, OSError) as error:
            raise ModelError(f"{io.join(uri, 'config.json')}: {str(error).splitlines()[0][:200]}") from None
    try:
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    except ValueError as error:
        raise ModelError(f"{uri} is not an image-text-to-text checkpoint ({type(config).__name__}): "
                         f"{str(error).splitlines()[0][:200]}") from None
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def fingerprint(uri: str) -> str:
    """sha256 over the checkpoint's file names and content digests (io.digest: the ETag on
    S3, a sha256 locally, remembered while the file is unchanged). A byte-identical copy
    has the same fingerprint; a file changed in place, even to the same size and time, not."""
    digest = hashlib.sha256()
    for name, _ in model_files(uri):
        digest.update(f"{name}\0{io.digest(io.join(uri, name))}\n".encode())
    return digest.hexdigest()


def local_copy(uri: str, cache: str) -> Path:
    """A local folder holding the checkpoint: the folder itself, or a per-node copy of an
    s3:// prefix made once (under a file lock) and reused by every actor on the node."""
    fs, root = io.resolve(uri)
    if fs.protocol in ("file", "local") or (isinstance(fs.protocol, tuple) and "file" in fs.protocol):
        model_files(uri)
        return Path(root)
    folder = Path(os.path.expanduser(cache)) / fingerprint(uri)[:24]
    done = folder / ".complete"
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(str(folder) + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not done.exists():
            partial = Path(str(folder) + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            for name, _ in model_files(uri):
                target = partial / name
                target.parent.mkdir(parents=True, exist_ok=True)
                fs.get_file(f"{root.rstrip('/')}/{name}", str(target))
            shutil.rmtree(folder, ignore_errors=True)
            partial.rename(folder)
            done.touch()
    return folder


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, name)


@dataclass
class LoadedModel:
    model: object
    processor: object
    device: str


def load_model(uri: str, config: EmbedConfig, device: str | None = None) -> LoadedModel:
    """The model (eval mode, on `device`) and its processor, from safetensors only."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    folder = local_copy(uri, config.model_cache)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    remote = config.trust_remote_code
    try:
        hf_config = AutoConfig.from_pretrained(folder, trust_remote_code=remote)
    except ValueError as error:
        raise ModelError(f"{uri}: {str(error).splitlines()[0]}") from None
    try:
        model = AutoModelForImageTextToText.from_pretrained(
            folder, config=hf_config, use_safetensors=True, trust_remote_code=remote,
            dtype=torch_dtype(config.dtype, device),
        )
    except ValueError as error:
        raise ModelError(f"{uri} is not an image-text-to-text checkpoint ({type(hf_config).__name__}): "
                         f"{str(error).splitlines()[0]}") from None
    return LoadedModel(model.to(device).eval(), load_processor(uri, config), device)


def load_processor(uri: str, config: EmbedConfig):
    """The checkpoint's processor (tokenizer + image processor + chat template); ModelError
    in one line when it cannot be loaded or cannot render a conversation with an image.
    The driver calls this before anything is written under the output."""
    from transformers import AutoProcessor

    folder = local_copy(uri, config.model_cache)
    try:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=config.trust_remote_code)
    except Exception as error:  # transformers raises OSError, ValueError or TypeError here
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise ModelError(f"{uri}: its processor cannot be loaded ({type(error).__name__}: {first}); a checkpoint "
                         "needs its tokenizer and image processor files beside the weights") from None
    missing = [part for part in ("tokenizer", "image_processor") if getattr(processor, part, None) is None]
    if missing:
        raise ModelError(f"{uri}: its processor has no {' or '.join(missing)}; a checkpoint needs its tokenizer "
                         "and image processor files beside the weights")
    if getattr(processor, "chat_template", None) is None:
        raise ModelError(f"{uri} has no chat template; the conversations cannot be rendered")
    return processor


RECIPE_FILE = "coincide_recipe.json"


def recipe(folder: str) -> dict:
    """What a converted checkpoint asks of the embed stage beside its processor (written by
    `coincide-ray convert`; {} for any other checkpoint): `image_records_drop_token_ids`,
    token ids removed from image records before the forward pass, as the source model's
    authors do, and `context_tokens`, the context they truncate at."""
    path = Path(folder, RECIPE_FILE)
    if not path.exists():
        return {}
    try:
        found = json.loads(path.read_text())
    except ValueError:
        raise ModelError(f"{path}: not JSON") from None
    if not isinstance(found, dict):
        raise ModelError(f"{path}: not a mapping")
    return found


def preprocessing(folder: str, trust_remote_code: bool = False) -> dict:
    """What the checkpoint asks of preparation beside its processor, as Preprocessor's
    keyword arguments: the context it is run with, and the token ids its recipe removes
    from image records."""
    return {"max_tokens": context_length(folder, trust_remote_code),
            "drop_in_image_rows": tuple(recipe(folder).get("image_records_drop_token_ids", ()))}


def context_length(folder: str, trust_remote_code: bool = False) -> int:
    """The context in tokens the checkpoint is run with: its recipe's, else the decoder's
    (0 when neither says)."""
    from transformers import AutoConfig

    given = recipe(folder).get("context_tokens")
    if given:
        return int(given)

    text = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).get_text_config()
    return int(getattr(text, "max_position_embeddings", 0) or 0)
