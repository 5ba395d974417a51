"""`coincide-ray convert tinyllava`: a tiny checkpoint in TinyLLaVA-2.0B's own format (its
config keys, LLaVA key names, an arcade100k-style tiktoken file, float16 weights, a SigLIP
tower stored without its last layer, 729 patch tokens) is converted, and the converted
model's vectors through the embed stage's own code are compared with the authors' recipe
written out here from scratch on the source weights: tiktoken for the tokens, their `phi`
prompt, their square padding, a plain-torch SigLIP, projector and StableLM, the image
features spliced in at `<image>`."""

from __future__ import annotations

import base64
import io as _io
import json
import math
import unicodedata
from pathlib import Path

import numpy as np
import pytest
import tiktoken
import torch
import torch.nn.functional as F
from PIL import Image

from coincide_ray.cli import main
from coincide_ray.config import EmbedConfig
from coincide_ray.embed.convert import ConvertError, convert_tinyllava
from coincide_ray.embed.model import load_model
from coincide_ray.embed.msa import extract_msa_embeddings
from coincide_ray.embed.preprocess import Preprocessor
from coincide_ray.records import Record
from tinyllava_source import (DECODER, LAYERS, PATTERN, SYSTEM, TOWER, TOWER_SOURCE, all_specials, source_weights,
                              write_source, write_tower_config, write_tower_weights)



@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("tinyllava")
    weights = source_weights()
    source = write_source(root / "TinyLLaVA-2.0B", weights)
    tower = write_tower_config(root / "TinyLLaVA-2.0B-SigLIP")
    output = root / "converted"
    assert main(["convert", "tinyllava", "--source", str(source), "--output", str(output),
                 "--vision-config", str(tower)]) == 0
    return source, output, weights


# --- the authors' recipe, from scratch --------------------------------------------------------

def encoding(source: Path):
    ranks = {base64.b64decode(t): int(r) for t, r in
             (line.split() for line in (source / "arcade100k.tiktoken").read_text().splitlines() if line)}
    return tiktoken.Encoding("arcade-tiny", pat_str=PATTERN, mergeable_ranks=ranks, special_tokens=all_specials())


def phi_prompt(turns: list[dict]) -> str:
    text = SYSTEM + " "
    for i, turn in enumerate(turns):
        role, sep = ("USER", " ") if turn["from"] == "human" else ("ASSISTANT", "<|endoftext|>")
        value = turn["value"]
        if "<image>" in value:
            value = ("<image>\n" + value.replace("<image>", "").strip()).strip()
        text += f"{role}: {value}{sep}"
    return text


def square_pixels(image: Image.Image) -> torch.Tensor:
    """expand2square with the mean colour (0.5 -> 127), resize to 384 bicubic, scale, normalise."""
    w, h = image.size
    side = max(w, h)
    canvas = Image.new("RGB", (side, side), (127, 127, 127))
    canvas.paste(image, ((side - w) // 2, (side - h) // 2))
    canvas = canvas.resize((TOWER["image"], TOWER["image"]), Image.BICUBIC)
    x = np.asarray(canvas, dtype=np.float32) / 255.0
    return torch.from_numpy((x - 0.5) / 0.5).permute(2, 0, 1)


def layer_norm(x, weights, name, eps):
    return F.layer_norm(x, x.shape[-1:], weights[name + ".weight"].float(), weights[name + ".bias"].float(), eps)


def linear(x, weights, name, bias=True):
    return x @ weights[name + ".weight"].float().T + (weights[name + ".bias"].float() if bias else 0)


def siglip_features(pixels: torch.Tensor, weights) -> torch.Tensor:
    t = "model.vision_tower.vision_tower.vision_model."
    x = F.conv2d(pixels[None], weights[t + "embeddings.patch_embedding.weight"].float(),
                 weights[t + "embeddings.patch_embedding.bias"].float(), stride=TOWER["patch"])
    x = x.flatten(2).transpose(1, 2)[0] + weights[t + "embeddings.position_embedding.weight"].float()
    heads, d = TOWER["heads"], TOWER["hidden"] // TOWER["heads"]
    for i in range(TOWER["stored_layers"]):  # every stored layer; the output of the last, no post-layernorm
        p = t + f"encoder.layers.{i}."
        h = layer_norm(x, weights, p + "layer_norm1", 1e-6)
        q, k, v = (linear(h, weights, p + f"self_attn.{n}").view(-1, heads, d).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d), dim=-1) @ v
        x = x + linear(attention.transpose(0, 1).reshape(-1, TOWER["hidden"]), weights, p + "self_attn.out_proj")
        h = layer_norm(x, weights, p + "layer_norm2", 1e-6)
        x = x + linear(F.gelu(linear(h, weights, p + "mlp.fc1"), approximate="tanh"), weights, p + "mlp.fc2")
    return x


def stablelm_o_proj(embeddings: torch.Tensor, weights) -> dict[int, torch.Tensor]:
    """o_proj outputs (T, H) of every layer of a StableLM-epoch decoder, written out."""
    h, heads = DECODER["hidden_size"], DECODER["num_attention_heads"]
    d = h // heads
    rot = int(d * DECODER["rope_pct"])
    inv = 1.0 / (DECODER["rope_theta"] ** (torch.arange(0, rot, 2).float() / rot))
    angles = torch.arange(len(embeddings)).float()[:, None] * inv[None, :]
    cos, sin = torch.cat([angles.cos()] * 2, -1), torch.cat([angles.sin()] * 2, -1)

    def rotary(x):  # (heads, T, d): rotate the first `rot` dims of each head, as rotate_half does
        part, rest = x[..., :rot], x[..., rot:]
        half = torch.cat([-part[..., rot // 2:], part[..., : rot // 2]], -1)
        return torch.cat([part * cos + half * sin, rest], -1)

    x, outputs = embeddings, {}
    mask = torch.full((len(x), len(x)), float("-inf")).triu(1)
    for i in range(DECODER["num_hidden_layers"]):
        p = f"model.layers.{i}."
        a = layer_norm(x, weights, p + "input_layernorm", DECODER["norm_eps"])
        q, k, v = (linear(a, weights, p + f"self_attn.{n}").view(-1, heads, d).transpose(0, 1) for n in ("q_proj", "k_proj", "v_proj"))
        q, k = rotary(q), rotary(k)
        attention = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(d) + mask, dim=-1) @ v
        outputs[i] = linear(attention.transpose(0, 1).reshape(-1, h), weights, p + "self_attn.o_proj", bias=False)
        x = x + outputs[i]
        m = layer_norm(x, weights, p + "post_attention_layernorm", DECODER["norm_eps"])
        x = x + linear(F.silu(linear(m, weights, p + "mlp.gate_proj", False)) * linear(m, weights, p + "mlp.up_proj", False),
                       weights, p + "mlp.down_proj", False)
    return outputs


def pad_id(source: Path) -> int:
    """The id of the source tokenizer's pad token (arcade100k: `<|endoftext|>`, the turn
    separator of the `phi` prompt too), read from the source folder."""
    pad = json.loads((source / "tokenizer_config.json").read_text())["pad_token"]
    return all_specials()[pad]


def recipe_vector(turns, image: Image.Image | None, source: Path, weights, drop_pad: bool = True) -> np.ndarray:
    """The authors' vector for an image record; DESIGN.md's for a text-only one (vision half
    zero, the language half over the text after the system sentence and "USER:"). For an
    image record their collator masks every pad-id token (`input_ids != pad_token_id`) and
    `prepare_inputs_labels_for_multimodal` deletes the masked tokens before the forward pass:
    so the model never sees a turn separator, and every later token has another context."""
    enc = encoding(source)
    dropped = pad_id(source) if image is not None and drop_pad else None

    def tokens(text):
        return [t for t in enc.encode(unicodedata.normalize("NFC", text), allowed_special="all") if t != dropped]

    embed = weights["model.embed_tokens.weight"].float()
    prompt = phi_prompt(turns)
    if image is not None:
        before, after = prompt.split("<image>")
        features = siglip_features(square_pixels(image), weights)
        projected = linear(F.gelu(linear(features, weights, "model.mm_projector.0")), weights, "model.mm_projector.2")
        sequence = torch.cat([embed[tokens(before)], projected, embed[tokens(after)]])
        image_span = slice(len(tokens(before)), len(tokens(before)) + len(projected))
        text_span = slice(image_span.stop, len(sequence))
    else:
        sequence = embed[tokens(prompt)]
        image_span, text_span = None, slice(len(tokens(SYSTEM + " USER:")), len(sequence))
    parts = []
    outputs = stablelm_o_proj(sequence, weights)
    for layer in LAYERS:
        o = outputs[layer]
        vision = torch.zeros(o.shape[1]) if image_span is None else F.normalize(torch.tanh(o[image_span].mean(0)), dim=0)
        parts += [vision, F.normalize(torch.tanh(o[text_span].mean(0)), dim=0)]
    return (torch.cat(parts) / math.sqrt(2 * len(LAYERS))).numpy()


def png(image: Image.Image) -> bytes:
    out = _io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


# --- the tests ---------------------------------------------------------------------------------

def test_every_source_tensor_is_carried_over_bit_for_bit(converted):
    from safetensors import safe_open

    _, output, weights = converted
    with safe_open(str(output / "model.safetensors"), framework="pt") as handle:
        written = {name: handle.get_tensor(name) for name in handle.keys()}
    assert len(written) == len(weights)
    unmatched = dict(written)
    for name, tensor in weights.items():
        match = [k for k, v in unmatched.items() if v.dtype == tensor.dtype and v.shape == tensor.shape
                 and torch.equal(v.view(torch.int16), tensor.view(torch.int16)) and k.split(".")[-1] == name.split(".")[-1]]
        assert match, name
        del unmatched[match[0]]
    config = json.loads((output / "config.json").read_text())
    assert config["model_type"] == "llava" and config["text_config"]["model_type"] == "stablelm"
    assert config["vision_config"]["num_hidden_layers"] == TOWER["stored_layers"]


def test_the_converted_tokenizer_gives_the_tiktoken_ids(converted):
    from transformers import AutoTokenizer

    source, output, _ = converted
    tokenizer = AutoTokenizer.from_pretrained(str(output))
    enc = encoding(source)
    for text in [phi_prompt([{"from": "human", "value": "What colour is the square?"},
                             {"from": "gpt", "value": "The square is red."}]),
                 "Café naïve 123 colour's\n\n  spaced   out<|im_start|>x", "e\u0301t\u00e9"]:
        expected = enc.encode(unicodedata.normalize("NFC", text), allowed_special="all")
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == expected, text


def test_converted_vectors_equal_the_authors_recipe_on_the_source_weights(converted, tmp_path):
    source, output, weights = converted
    rng = np.random.default_rng(5)
    images = {"wide.png": Image.fromarray(rng.integers(0, 255, (90, 200, 3), dtype=np.uint8)),
              "tall.png": Image.fromarray(rng.integers(0, 255, (150, 60, 3), dtype=np.uint8))}
    for name, image in images.items():
        (tmp_path / name).write_bytes(png(image))
    records = [
        Record("wide", "wide.png", [{"from": "human", "value": "<image>\nWhat colour is the square?"},
                                    {"from": "gpt", "value": "The square is red."}], "r#0"),
        Record("tall", "tall.png", [{"from": "human", "value": "How many triangles are there?\n<image>"},
                                    {"from": "gpt", "value": "There are three."},
                                    {"from": "human", "value": "Describe the image."},
                                    {"from": "gpt", "value": "A chat."}], "r#1"),
        Record("text", None, [{"from": "human", "value": "Describe the square."},
                              {"from": "gpt", "value": "It is red."}], "r#2"),
        Record("three", "wide.png", [{"from": "human", "value": "What shape is drawn?\n<image>"},
                                     {"from": "gpt", "value": "A square."},
                                     {"from": "human", "value": "What colour is it?"},
                                     {"from": "gpt", "value": "Red, with a thin border."},
                                     {"from": "human", "value": "Is there text?"},
                                     {"from": "gpt", "value": "No."}], "r#3"),
    ]
    loaded = load_model(str(output), EmbedConfig(dtype="float32"), device="cpu")
    ours = embed_as_the_stage_does(loaded, output, records, tmp_path)
    worst = {}
    for record in records:
        image = images[record.image] if record.image else None
        expected = recipe_vector(record.conversations, image, source, weights)
        worst[record.id] = float(np.abs(ours[record.id] - expected).max())
        np.testing.assert_allclose(ours[record.id], expected, atol=2e-5, rtol=0)
    half = DECODER["hidden_size"]
    assert not ours["text"][:half].any() and ours["text"][half : 2 * half].any()  # text-only: vision half zero
    print(f"largest difference to the recipe per record: {worst}")

    # the tolerance has teeth: the separators kept (as before the recipe) misses it on multi-turn records
    kept = embed_as_the_stage_does(loaded, output, records, tmp_path, drop_in_image_rows=())
    missed = {r.id: float(np.abs(kept[r.id] - recipe_vector(r.conversations, images.get(r.image), source,
                                                             weights)).max()) for r in records}
    assert missed["tall"] > 1e-4 and missed["three"] > 1e-4, missed
    print(f"with the separators kept: {missed}")


def embed_as_the_stage_does(loaded, output: Path, records, image_root, **override) -> dict[str, np.ndarray]:
    """Vectors through the embed stage's own preparation (the converted folder's recipe and
    context, as PrepareWorker reads them) and its extraction."""
    from coincide_ray.embed.model import preprocessing

    settings = {**preprocessing(str(output)), **override}
    block = Preprocessor(loaded.processor, image_root=str(image_root), batch_size=4, max_image_pixels=10**7,
                         **settings).prepare(0, records)
    assert not block.rejected
    ours = {}
    for batch in block.batches:
        vectors = extract_msa_embeddings(loaded.model, batch.inputs, LAYERS)
        ours.update({records[p].id: v for p, v in zip(batch.positions, vectors)})
    return ours


def test_the_converted_folder_records_its_recipe(converted):
    source, output, _ = converted
    recipe = json.loads((output / "coincide_recipe.json").read_text())
    assert recipe["image_records_drop_token_ids"] == [pad_id(source)]
    assert recipe["image_records_drop_tokens"] == ["<|endoftext|>"]
    assert recipe["context_tokens"] == 3072 and recipe["context_from"] == "tokenizer_model_max_length"
    assert "copy inside" in recipe["vision_tower"]


@pytest.mark.parametrize("changed", [None, "encoder.layers.1.mlp.fc1.weight"])
def test_the_tower_comes_from_the_tower_folder_when_given(tmp_path, capsys, changed):
    from safetensors import safe_open

    weights = source_weights()
    source = write_source(tmp_path / "source", weights)
    tower = write_tower_weights(tmp_path / "tower", weights, changed=changed)
    output = tmp_path / "converted"
    assert main(["convert", "tinyllava", "--source", str(source), "--output", str(output),
                 "--vision-config", str(tower), "--vision-tower", str(tower)]) == 0
    said = [line for line in capsys.readouterr().err.splitlines() if "vision tower from" in line]
    assert len(said) == 1
    assert ("equal, bit for bit" in said[0]) == (changed is None) and ("differs" in said[0]) == (changed is not None)
    assert json.loads((output / "coincide_recipe.json").read_text())["vision_tower"] == str(tower)
    with safe_open(str(output / "model.safetensors"), framework="pt") as out, \
            safe_open(str(tower / "model.safetensors"), framework="pt") as folder:
        name = "encoder.layers.1.mlp.fc1.weight"
        written = next(out.get_tensor(k) for k in out.keys() if "vision" in k and k.endswith(name))
        assert torch.equal(written, folder.get_tensor("vision_model." + name))  # the folder's, as their loader
        assert torch.equal(written, weights[TOWER_SOURCE + name]) == (changed is None)


def test_unrecognised_sources_stop_with_one_line_naming_what(tmp_path, capsys):
    weights = source_weights()
    tower = str(write_tower_config(tmp_path / "tower"))
    cases = {
        "kind": (write_source(tmp_path / "kind", weights, model_type="llava_llama"), "model_type 'llava_llama'"),
        "missing": (write_source(tmp_path / "missing", {k: v for k, v in weights.items() if k != "model.norm.bias"}),
                    "missing, e.g. model.language_model.norm.bias"),
        "extra": (write_source(tmp_path / "extra", dict(weights, **{"model.extra.weight": torch.zeros(2)})),
                  "not recognised, e.g. model.extra.weight"),
        "projector": (write_source(tmp_path / "projector", weights, mm_projector_type="linear"), "mm_projector_type"),
    }
    for name, (source, expected) in cases.items():
        with pytest.raises(ConvertError, match=expected.replace("(", r"\(").replace(".", r"\.")):
            convert_tinyllava(str(source), str(tmp_path / f"out-{name}"), tower)
        assert not (tmp_path / f"out-{name}").exists()  # nothing published
    assert main(["convert", "tinyllava", "--source", str(cases["kind"][0]), "--output", str(tmp_path / "o"),
                 "--vision-config", tower]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("coincide-ray: error:") and "tiny_llava_stablelm" in err[0]
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(ConvertError, match="already holds files"):
        convert_tinyllava(str(cases["missing"][0]), str(tmp_path / "taken"), tower)
