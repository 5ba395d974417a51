"""Loading an image-text-to-text checkpoint from a local folder or an s3:// prefix."""

from __future__ import annotations

import fcntl
import hashlib
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


def context_length(folder: str, trust_remote_code: bool = False) -> int:
    """The decoder's context in tokens (0 when the config does not say)."""
    from transformers import AutoConfig

    text = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code).get_text_config()
    return int(getattr(text, "max_position_embeddings", 0) or 0)
