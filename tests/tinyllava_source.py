"""A tiny checkpoint in TinyLLaVA-2.0B's own format, for the converter's tests: its config
keys, the original LLaVA key names, an arcade100k-style tiktoken file, float16 weights and a
SigLIP tower stored without its last layer (729 patch tokens at 384 px)."""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import torch

# What the authors' code fixes, written here independently of coincide_ray.embed.convert.
SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
           r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
DECODER = dict(vocab_size=100352, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4, rope_pct=0.25, rope_theta=10000, norm_eps=1e-5, use_qkv_bias=True,
               max_position_embeddings=4096, hidden_act="silu")
TOWER = dict(hidden=24, intermediate=48, stored_layers=2, heads=2, image=384, patch=14)
MM_HIDDEN = TOWER["hidden"]
LAYERS = [1, 3]
CORPUS = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
          "detailed, and polite answers to the user's questions. USER: ASSISTANT: What colour is the square? "
          "The square is red. How many triangles are there? There are three. Describe the image in detail.")


def train_ranks(merges: int = 120) -> dict[bytes, int]:
    """A byte-level BPE table trained naively on CORPUS: bytes first, then merges in order."""
    ranks = {bytes([b]): b for b in range(256)}
    words = [list(w.encode()) for w in CORPUS.replace(" ", "\0 ").split("\0")]
    words = [[bytes([b]) for b in w] for w in words]
    for _ in range(merges):
        pairs = Counter((a, b) for w in words for a, b in zip(w, w[1:]))
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        ranks[a + b] = len(ranks)
        merged = []
        for w in words:
            out, i = [], 0
            while i < len(w):
                if i + 1 < len(w) and (w[i], w[i + 1]) == (a, b):
                    out.append(a + b)
                    i += 2
                else:
                    out.append(w[i])
                    i += 1
            merged.append(out)
        words = merged
    return ranks


def all_specials() -> dict[str, int]:
    names = (["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<gh_stars>",
              "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>", "<jupyter_text>",
              "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
              "<commit_after>", "<reponame>", "<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>"]
             + [f"<|reg{i}|>" for i in range(8)] + ["<|extra0|>"])
    return {name: 100257 + i for i, name in enumerate(names)}


def source_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def w(*shape, scale=0.2):
        return (torch.randn(*shape, generator=g) * scale).to(torch.float16)

    def norm(n):
        return 1 + w(n, scale=0.05), w(n, scale=0.05)

    h, inter, vh, vi = DECODER["hidden_size"], DECODER["intermediate_size"], TOWER["hidden"], TOWER["intermediate"]
    out = {"model.embed_tokens.weight": w(DECODER["vocab_size"], h, scale=0.5), "lm_head.weight": w(DECODER["vocab_size"], h)}
    for i in range(DECODER["num_hidden_layers"]):
        p = f"model.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj"):
            out[p + f"self_attn.{name}.weight"], out[p + f"self_attn.{name}.bias"] = w(h, h), w(h, scale=0.05)
        out[p + "self_attn.o_proj.weight"] = w(h, h)
        out[p + "mlp.gate_proj.weight"], out[p + "mlp.up_proj.weight"] = w(inter, h), w(inter, h)
        out[p + "mlp.down_proj.weight"] = w(h, inter)
        for ln in ("input_layernorm", "post_attention_layernorm"):
            out[p + ln + ".weight"], out[p + ln + ".bias"] = norm(h)
    out["model.norm.weight"], out["model.norm.bias"] = norm(h)
    t = "model.vision_tower.vision_tower.vision_model."
    out[t + "embeddings.patch_embedding.weight"] = w(vh, 3, TOWER["patch"], TOWER["patch"], scale=0.05)
    out[t + "embeddings.patch_embedding.bias"] = w(vh, scale=0.05)
    out[t + "embeddings.position_embedding.weight"] = w((TOWER["image"] // TOWER["patch"]) ** 2, vh)
    for i in range(TOWER["stored_layers"]):
        p = t + f"encoder.layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "out_proj"):
            out[p + f"self_attn.{name}.weight"], out[p + f"self_attn.{name}.bias"] = w(vh, vh), w(vh, scale=0.05)
        out[p + "layer_norm1.weight"], out[p + "layer_norm1.bias"] = norm(vh)
        out[p + "layer_norm2.weight"], out[p + "layer_norm2.bias"] = norm(vh)
        out[p + "mlp.fc1.weight"], out[p + "mlp.fc1.bias"] = w(vi, vh), w(vi, scale=0.05)
        out[p + "mlp.fc2.weight"], out[p + "mlp.fc2.bias"] = w(vh, vi), w(vh, scale=0.05)
    out[t + "post_layernorm.weight"], out[t + "post_layernorm.bias"] = norm(vh)
    out[t + "head.probe"] = w(1, 1, vh)
    out[t + "head.attention.in_proj_weight"], out[t + "head.attention.in_proj_bias"] = w(3 * vh, vh), w(3 * vh)
    out[t + "head.attention.out_proj.weight"], out[t + "head.attention.out_proj.bias"] = w(vh, vh), w(vh)
    out[t + "head.layernorm.weight"], out[t + "head.layernorm.bias"] = norm(vh)
    out[t + "head.mlp.fc1.weight"], out[t + "head.mlp.fc1.bias"] = w(vi, vh), w(vi)
    out[t + "head.mlp.fc2.weight"], out[t + "head.mlp.fc2.bias"] = w(vh, vi), w(vh)
    out["model.mm_projector.0.weight"], out["model.mm_projector.0.bias"] = w(h, MM_HIDDEN), w(h, scale=0.05)
    out["model.mm_projector.2.weight"], out["model.mm_projector.2.bias"] = w(h, h), w(h, scale=0.05)
    return out


def write_source(folder: Path, weights: dict[str, torch.Tensor], **config_changes) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = dict(DECODER, model_type="tiny_llava_stablelm", architectures=["TinyLlavaStablelmForCausalLM"],
                  mm_vision_tower="bczhou/TinyLLaVA-2.0B-SigLIP", mm_hidden_size=MM_HIDDEN,
                  mm_projector_type="mlp2x_gelu", mm_vision_select_layer=-2, mm_vision_select_feature="patch",
                  image_aspect_ratio="pad", mm_use_im_start_end=False, tokenizer_padding_side="right",
                  tie_word_embeddings=False, torch_dtype="float16", transformers_version="4.37.2",
                  tokenizer_model_max_length=3072)
    config.update(config_changes)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Arcade100kTokenizer", "model_max_length": 2048, "padding_side": "right",
        "auto_map": {"AutoTokenizer": ["tokenization_arcade100k.Arcade100kTokenizer", None]},
        "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    lines = [base64.b64encode(token).decode() + f" {rank}" for token, rank in train_ranks().items()]
    (folder / "arcade100k.tiktoken").write_text("\n".join(lines) + "\n")
    save_file(weights, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder


def write_tower_config(folder: Path) -> Path:
    """The tower repository's config: the uncut tower, one layer more than the weights hold."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps({
        "model_type": "siglip_vision_model", "hidden_size": TOWER["hidden"], "intermediate_size": TOWER["intermediate"],
        "num_hidden_layers": TOWER["stored_layers"] + 1, "num_attention_heads": TOWER["heads"],
        "image_size": TOWER["image"], "patch_size": TOWER["patch"], "layer_norm_eps": 1e-6,
        "hidden_act": "gelu_pytorch_tanh"}))
    return folder


TOWER_SOURCE = "model.vision_tower.vision_tower.vision_model."


def write_tower_weights(folder: Path, weights: dict[str, torch.Tensor], changed: str | None = None) -> Path:
    """The published tower folder as a SiglipVisionModel saves it (`vision_model.*`): the
    source's tower tensors and one layer more (the uncut tower), optionally with `changed`
    (a name after `vision_model.`) nudged."""
    from safetensors.torch import save_file

    write_tower_config(folder)
    tower = {"vision_model." + k[len(TOWER_SOURCE):]: v.clone() for k, v in weights.items() if k.startswith(TOWER_SOURCE)}
    last = TOWER["stored_layers"]
    for name in [n for n in tower if n.startswith("vision_model.encoder.layers.0.")]:
        tower[name.replace("layers.0.", f"layers.{last}.")] = tower[name].clone()
    if changed:
        tower["vision_model." + changed] = tower["vision_model." + changed] + 0.5
    save_file(tower, str(folder / "model.safetensors"), metadata={"format": "pt"})
    return folder
