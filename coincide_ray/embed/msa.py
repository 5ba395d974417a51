"""Multi-head self-attention embeddings (DESIGN.md step 1), pure torch.

For each chosen decoder layer, the output of `self_attn.o_proj` (B, T, H) is pooled inside
a forward hook, so only (B, 2, H) per layer is kept: the vision part is the mean over
image-token positions, the language part the mean over attended tokens after the last
image token (text-only rows: from `language_start` attended tokens on, i.e. after the
chat template's fixed prefix). Each part goes through tanh and L2 normalisation; the
vector is concat_l [v_l, t_l] / sqrt(2L). The forward stops with an exception right after
the last chosen layer's o_proj, so later layers and the LM head are never computed.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from coincide_ray.schema import LANGUAGE_START  # an optional input: attended tokens to skip


@dataclass(frozen=True)
class DecoderInfo:
    layers: nn.ModuleList  # the decoder's layers, each with self_attn.o_proj
    image_token_id: int
    hidden: int  # o_proj output width


def _has_o_proj(module: nn.Module) -> bool:
    return isinstance(getattr(getattr(module, "self_attn", None), "o_proj", None), nn.Module)


def decoder_info(model: nn.Module) -> DecoderInfo:
    """Find the language decoder's layers and the image token without per-model paths.

    The decoder layers are the longest ModuleList whose items all have `self_attn.o_proj`
    (vision towers name theirs `out_proj` or `proj`); the image token id comes from the
    config (`image_token_id`, or the older `image_token_index`).
    """
    config = getattr(model, "config", None)
    token = getattr(config, "image_token_id", None)
    if token is None:
        token = getattr(config, "image_token_index", None)
    if token is None:
        raise ValueError(f"{type(model).__name__} has no image token in its config: not an image-text-to-text model")
    roots = [model.get_decoder()] if hasattr(model, "get_decoder") else []
    for root in [*roots, model]:
        lists = [m for m in root.modules() if isinstance(m, nn.ModuleList) and len(m) and all(map(_has_o_proj, m))]
        if lists:
            layers = max(lists, key=len)
            return DecoderInfo(layers, int(token), int(layers[0].self_attn.o_proj.out_features))
    raise ValueError(f"{type(model).__name__} has no decoder layers with self_attn.o_proj")


class _StopForward(Exception):
    """Raised after the last chosen layer: nothing past it needs computing."""


def _token_aligned(value: object, shape: torch.Size) -> bool:
    return isinstance(value, torch.Tensor) and value.shape == shape


def to_right_padding(inputs: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Move each row's padding to the end, in every (B, T) tensor.

    Causal decoders number positions from the first token; with right padding a row's real
    tokens get positions 0..n-1 whatever the padding side was.
    """
    mask = inputs["attention_mask"]
    out = dict(inputs)
    leading = (mask.cumsum(dim=1) == 0).sum(dim=1)  # pads before the first real token
    if not bool(leading.any()):
        return out
    t = mask.shape[1]
    index = (torch.arange(t, device=mask.device)[None, :] + leading[:, None]) % t
    for key, value in inputs.items():
        if _token_aligned(value, mask.shape):
            out[key] = torch.gather(value, 1, index)
    return out


def pooling_masks(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, language_start: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float (B, T) masks of the positions averaged into the vision and language parts."""
    attended = attention_mask.bool()
    image = (input_ids == image_token_id) & attended
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]
    last_image = torch.where(image, positions, -1).max(dim=1).values
    if language_start is None:
        language_start = torch.zeros(len(input_ids), dtype=torch.long, device=input_ids.device)
    rank = attended.long().cumsum(dim=1) - 1  # position among attended tokens
    has_image = last_image >= 0
    after_image = positions > last_image[:, None]
    after_prefix = rank >= language_start.to(input_ids.device)[:, None]
    language = attended & torch.where(has_image[:, None], after_image, after_prefix)
    return image.float(), language.float()


def _pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """tanh(mean of the masked rows), L2-normalised; zero when the mask is empty."""
    counts = mask.sum(dim=1, keepdim=True)
    mean = torch.bmm(mask[:, None, :], hidden.float()).squeeze(1) / counts.clamp(min=1)
    squashed = torch.tanh(mean)
    norms = squashed.norm(dim=1, keepdim=True)
    return torch.where(norms > 0, squashed / norms.clamp(min=torch.finfo(torch.float32).tiny), 0.0)


@torch.inference_mode()
def extract_msa_embeddings(
    model: nn.Module, inputs: Mapping[str, torch.Tensor | np.ndarray], layers: Sequence[int]
) -> np.ndarray:
    """(B, 2 * L * H) float32 sample vectors, layer-major [v_0, t_0, v_1, t_1, ...].

    `inputs` is a processor output (`input_ids`, `attention_mask`, `pixel_values`, ...),
    optionally with `language_start` (B,). Padding may be on either side.
    """
    info = decoder_info(model)
    layers = [int(layer) for layer in layers]
    if not layers or len(set(layers)) != len(layers):
        raise ValueError(f"layers must be distinct decoder layer indices, got {layers}")
    if min(layers) < 0 or max(layers) >= len(info.layers):
        raise ValueError(f"layers {layers} out of range: the decoder has {len(info.layers)} layers (0-based)")
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    tensors = {k: torch.as_tensor(v) for k, v in inputs.items()}
    language_start = tensors.pop(LANGUAGE_START, None)
    if "attention_mask" not in tensors:
        tensors["attention_mask"] = torch.ones_like(tensors["input_ids"])
    tensors = to_right_padding(tensors)
    tensors = {k: v.to(device=device, dtype=dtype if v.is_floating_point() else v.dtype) for k, v in tensors.items()}
    image_mask, language_mask = pooling_masks(
        tensors["input_ids"], tensors["attention_mask"], info.image_token_id, language_start
    )

    pooled: dict[int, torch.Tensor] = {}
    last = max(layers)

    def hook_for(layer: int):
        def hook(_module, _args, output):
            pooled[layer] = torch.cat([_pool(output, image_mask), _pool(output, language_mask)], dim=1)
            if layer == last:
                raise _StopForward

        return hook

    handles = [info.layers[layer].self_attn.o_proj.register_forward_hook(hook_for(layer)) for layer in layers]
    try:
        model(**tensors, use_cache=False)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    vectors = torch.cat([pooled[layer] for layer in sorted(layers)], dim=1) / math.sqrt(2 * len(layers))
    return vectors.cpu().numpy().astype(np.float32, copy=False)


def default_layers(num_layers: int) -> tuple[int, ...]:
    """The paper's choice for a 24-layer decoder is 3, 7, 11, 15, 19: every fourth layer from
    the fourth, stopping before the last quarter. For another depth the same five relative
    depths are used: round(depth * f) - 1 for f = 4/24, 8/24, ..., 20/24, made distinct."""
    picks: list[int] = []
    for step in range(1, 6):
        layer = max(0, round(num_layers * 4 * step / 24) - 1)
        if layer not in picks:
            picks.append(layer)
    return tuple(picks)
