"""The paper's reference model, TinyLLaVA-2.0B, as a transformers-native checkpoint.

The COINCIDE authors embed with TinyLLaVA-2.0B (`bczhou/TinyLLaVA-2.0B`), saved in the
original LLaVA layout with custom code: a StableLM-2-1.6B decoder (`model.layers.*`), a
SigLIP-so400m tower already cut before its last layer (`model.vision_tower.vision_tower.*`),
a two-layer GELU projector (`model.mm_projector.{0,2}.*`) and an arcade100k tiktoken
tokenizer. `convert_tinyllava` rewrites it as a LlavaForConditionalGeneration (StableLM
text model, SigLIP vision model, every patch feature of the tower's last stored layer,
the same projector) with a fast tokenizer, an image processor that pads to a square of
the mean colour as the authors' `image_aspect_ratio: pad` does, and a chat template that
renders their `phi` conversation. Tensors are renamed, never changed: every source tensor
is written bit for bit, and the output is read back and compared before it is published.

The tower's layer: the authors' SigLIP module returns `hidden_states[-1]` of the tower as
stored, without the post-layernorm. Their config's `mm_vision_select_layer: -2` names the
same layer counted on the uncut 27-layer tower. The converted vision config declares the
stored layers only, so the same features are `vision_feature_layer = -1` there.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from coincide_ray import io
from coincide_ray.embed.model import RECIPE_FILE

SOURCE_MODEL_TYPE = "tiny_llava_stablelm"
IMAGE_TOKEN = "<image>"

# The authors' `phi` conversation (tinyllava/conversation.py, conv_phi_v0): the system
# sentence, then "USER: <message> " and "ASSISTANT: <message><|endoftext|>" turns. The image
# opens the turn that carries it, followed by a newline.
PHI_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
              "The assistant gives helpful, detailed, and polite answers to the user's questions.")
PHI_TEMPLATE = (
    "{{ '" + PHI_SYSTEM.replace("'", "\\'") + " ' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}<|endoftext|>{% endif %}{% endfor %}"
)

# arcade100k (StableLM 2's tokenizer): tiktoken ranks, this split pattern, NFC-normalised
# text, and these special tokens numbered from 100257 in this order.
ARCADE_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                  r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
ARCADE_FIRST_SPECIAL = 100257
ARCADE_SPECIALS = (
    ["<|endoftext|>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"]
    + ["<gh_stars>", "<filename>", "<issue_start>", "<issue_comment>", "<issue_closed>", "<jupyter_start>",
       "<jupyter_text>", "<jupyter_code>", "<jupyter_output>", "<empty_output>", "<commit_before>", "<commit_msg>",
       "<commit_after>", "<reponame>"]
    + ["<|endofprompt|>", "<|im_start|>", "<|im_end|>", "<|pause|>"]
    + [f"<|reg{i}|>" for i in range(8)] + ["<|extra0|>"]
)

# SigLIP-so400m at 384 px, the tower TinyLLaVA-2.0B was trained with; `--vision-config`
# names another tower's config.json. The layer count always comes from the weights.
SO400M_384 = dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, image_size=384,
                  patch_size=14, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh",
                  image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

SOURCE_TOWER = "model.vision_tower.vision_tower.vision_model."
SOURCE_PROJECTOR = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}
SOURCE_TEXT = ("model.embed_tokens.", "model.layers.", "model.norm.")


class ConvertError(ValueError):
    """The source cannot be converted (one line, for the user)."""


@dataclass
class Converted:
    output: str
    tensors: int  # source tensors carried over, each checked bit for bit
    bytes: int  # their size
    image_tokens: int  # per image, as the converted processor expands one
    image_token_id: int


def convert_tinyllava(source: str, output: str, vision_config: str | None = None, cache: str = "",
                      progress=None, vision_tower: str | None = None) -> Converted:
    """Write the converted checkpoint of the TinyLLaVA folder `source` (local or s3://) to
    `output`, which must not hold files yet. ConvertError names anything not recognised.

    `vision_tower`: the published SigLIP tower folder (the source's `mm_vision_tower`), whose
    weights the authors' loader uses; the converter then takes the tower from there and says
    whether it equals the copy inside the source's model.safetensors. Without it, the copy."""
    from coincide_ray.embed.model import ModelError, local_copy

    say = progress or (lambda message: None)
    if io.exists(output) and io.list_files(output, ("",)):
        raise ConvertError(f"{output} already holds files; convert into a new folder")
    try:
        folder = local_copy(source, cache or "~/.cache/coincide-ray/models")
    except ModelError as error:
        raise ConvertError(str(error)) from None
    config = _read_json(folder / "config.json", source)
    _check_source_config(config, source)
    tensors = _source_tensors(folder, source)
    tower = _tower_config(tensors, vision_config, source)
    tower_source = _take_tower(tensors, vision_tower, cache, say) if vision_tower else \
        "the copy inside the source's model.safetensors"
    if not vision_tower:
        say("convert: vision tower: the copy inside the source's model.safetensors (the authors' loader reads "
            "the tower folder mm_vision_tower names instead; give it with --vision-tower to use it)")
    say(f"convert: {len(tensors)} tensors; decoder {config['num_hidden_layers']} layers x {config['hidden_size']}, "
        f"tower {tower['num_hidden_layers']} layers x {tower['hidden_size']}, "
        f"{(tower['image_size'] // tower['patch_size']) ** 2} image tokens")
    tokenizer = _fast_tokenizer(folder, source)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id >= config["vocab_size"]:
        raise ConvertError(f"{source}: the tokenizer needs id {image_token_id} for {IMAGE_TOKEN} but the model "
                           f"has {config['vocab_size']} embedding rows")
    llava = _llava_config(config, tower, tokenizer, image_token_id, has_head=any(".head." in n for n in tensors))
    recipe = _recipe(config, tokenizer, tower_source)
    say(f"convert: image records drop every {recipe['image_records_drop_tokens'][0]} token (id "
        f"{recipe['image_records_drop_token_ids'][0]}, the pad token of the source's tokenizer), as the authors' "
        f"collator does; context {recipe['context_tokens']} tokens ({recipe['context_from']})")
    renamed = _renamed(tensors, llava, source)
    staging = Path(tempfile.mkdtemp(prefix="coincide-convert-"))
    try:
        _write(staging, renamed, tensors, llava, _processor(tokenizer, tower))
        (staging / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
        carried = _check_bits(staging / "model.safetensors", renamed, tensors)
        image_tokens = _check_processor(staging, image_token_id)
        if image_tokens != (tower["image_size"] // tower["patch_size"]) ** 2:
            raise ConvertError(f"the converted processor gives {image_tokens} image tokens per image, not the "
                               f"tower's {(tower['image_size'] // tower['patch_size']) ** 2}; nothing was published")
        for name in sorted(os.listdir(staging), key=lambda n: n == "config.json"):  # config last: then it loads
            io.publish_file(str(staging / name), io.join(output, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"convert: {carried} tensors carried over bit for bit to {output}")
    return Converted(output, carried, sum(t[2] for t in tensors.values()), image_tokens, image_token_id)


def _read_json(path: Path, source: str) -> dict:
    try:
        return json.loads(io.read_bytes(str(path)))
    except (OSError, ValueError) as error:
        raise ConvertError(f"{source}: {path.name} cannot be read ({type(error).__name__})") from None


def _check_source_config(config: dict, source: str) -> None:
    kind = config.get("model_type")
    if kind != SOURCE_MODEL_TYPE:
        raise ConvertError(f"{source}: model_type {kind!r} is not TinyLLaVA-2.0B's {SOURCE_MODEL_TYPE!r}")
    expected = {"mm_projector_type": "mlp2x_gelu", "mm_vision_select_feature": "patch", "image_aspect_ratio": "pad"}
    for key, value in expected.items():
        if config.get(key, value) != value:
            raise ConvertError(f"{source}: {key} {config.get(key)!r} is not supported (TinyLLaVA-2.0B has {value!r})")
    if "siglip" not in str(config.get("mm_vision_tower", "")).lower():
        raise ConvertError(f"{source}: mm_vision_tower {config.get('mm_vision_tower')!r} is not a SigLIP tower")
    if config.get("mm_use_im_start_end") or config.get("mm_use_im_patch_token"):
        raise ConvertError(f"{source}: image start/end or patch tokens (mm_use_im_start_end) are not supported")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in config]
    if missing:
        raise ConvertError(f"{source}: config.json lacks {', '.join(missing)}")


def _source_tensors(folder: Path, source: str) -> dict[str, tuple[Path, tuple, int, str]]:
    """name -> (file, shape, bytes, name in that file) of every tensor of the source's
    safetensors files."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    found: dict[str, tuple[Path, tuple, int]] = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                piece = handle.get_slice(name)
                shape = tuple(piece.get_shape())
                found[name] = (path, shape, _dtype_bytes(piece.get_dtype()) * math.prod(shape), name)
    if not found:
        raise ConvertError(f"{source}: no tensors in its .safetensors files")
    return found


TOWER_FOLDER_PREFIX = "vision_model."  # a SiglipVisionModel folder's tensor names


def _take_tower(tensors: dict, uri: str, cache: str, say) -> str:
    """Point every tower tensor of `tensors` at the tower folder's own copy (its layers past
    the stored ones are not used: the converted tower ends where the source's copy does),
    say in one line whether the two are equal, and return the folder, for the recipe."""
    import torch
    from safetensors import safe_open

    from coincide_ray.embed.model import ModelError, local_copy

    try:
        folder = local_copy(uri, cache or "~/.cache/coincide-ray/models")
    except ModelError as error:
        raise ConvertError(f"--vision-tower: {error}") from None
    theirs = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for name in handle.keys():
                if name.startswith(TOWER_FOLDER_PREFIX):
                    theirs[name[len(TOWER_FOLDER_PREFIX):]] = path
    ours = [n for n in tensors if n.startswith(SOURCE_TOWER)]
    missing = [n for n in ours if n[len(SOURCE_TOWER):] not in theirs]
    if missing:
        raise ConvertError(f"--vision-tower {uri}: no {TOWER_FOLDER_PREFIX}{missing[0][len(SOURCE_TOWER):]} "
                           f"(and {len(missing) - 1} more tensors of the source's tower)")
    largest, differing = 0.0, 0
    with contextlib.ExitStack() as files:  # each file opened once, not once per tensor
        opened = {path: files.enter_context(safe_open(str(path), framework="pt"))
                  for path in {*theirs.values(), *(tensors[name][0] for name in ours)}}
        for name in ours:
            rest = name[len(SOURCE_TOWER):]
            tower_tensor = opened[theirs[rest]].get_tensor(TOWER_FOLDER_PREFIX + rest)
            copy = opened[tensors[name][0]].get_tensor(tensors[name][3])
            if tuple(tower_tensor.shape) != tuple(copy.shape):
                raise ConvertError(f"--vision-tower {uri}: {TOWER_FOLDER_PREFIX}{rest} has shape "
                                   f"{list(tower_tensor.shape)}, the source's copy {list(copy.shape)}")
            if not (tower_tensor.dtype == copy.dtype and torch.equal(tower_tensor, copy)):
                differing += 1
                largest = max(largest, float((tower_tensor.float() - copy.float()).abs().max()))
            tensors[name] = (theirs[rest], tuple(tower_tensor.shape),
                             tower_tensor.element_size() * tower_tensor.numel(), TOWER_FOLDER_PREFIX + rest)
    if differing:
        say(f"convert: vision tower from {uri}: it differs from the copy inside the source's model.safetensors in "
            f"{differing} of {len(ours)} tensors (largest difference {largest:.3g}, dtypes included); the tower "
            "folder's is used, as the authors' loader does")
    else:
        say(f"convert: vision tower from {uri}: equal, bit for bit, to the copy inside the source's model.safetensors")
    return uri


def _recipe(config: dict, tokenizer, tower_source: str) -> dict:
    """What the embed stage must do beside the processor to give the authors' vectors."""
    limit = config.get("tokenizer_model_max_length")
    return {
        "recipe": "TinyLLaVA-2.0B, as the COINCIDE authors embed with it",
        "image_records_drop_token_ids": [tokenizer.pad_token_id],
        "image_records_drop_tokens": [tokenizer.pad_token],
        "context_tokens": int(limit or config.get("max_position_embeddings", 4096)),
        "context_from": "tokenizer_model_max_length" if limit else "max_position_embeddings",
        "vision_tower": tower_source,
    }


def _dtype_bytes(name: str) -> int:
    return {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "F16": 2, "BF16": 2, "I16": 2, "U8": 1, "I8": 1,
            "BOOL": 1}.get(name, 4)


def _tower_config(tensors: dict, vision_config: str | None, source: str) -> dict:
    """The tower's shape: `vision_config` (a SigLIP config.json, or a folder holding one) or
    so400m-384, checked against the stored tensors; the layer count is the stored one."""
    tower = dict(SO400M_384)
    if vision_config:
        uri = vision_config if vision_config.endswith(".json") else io.join(vision_config, "config.json")
        try:
            given = json.loads(io.read_bytes(uri))
        except (OSError, ValueError) as error:
            raise ConvertError(f"--vision-config {uri} cannot be read ({type(error).__name__})") from None
        given = given.get("vision_config", given)
        tower.update({k: given[k] for k in tower if k in given})
        declared = given.get("num_hidden_layers")
    else:
        declared = None
    layers = {int(n[len(SOURCE_TOWER + "encoder.layers."):].split(".")[0])
              for n in tensors if n.startswith(SOURCE_TOWER + "encoder.layers.")}
    if not layers or layers != set(range(len(layers))):
        raise ConvertError(f"{source}: the vision tower's layers are missing or not numbered 0..n-1")
    if declared is not None and declared not in (len(layers), len(layers) + 1):
        raise ConvertError(f"{source}: the weights hold {len(layers)} tower layers but --vision-config declares "
                           f"{declared}")
    tower["num_hidden_layers"] = len(layers)
    patch = tensors.get(SOURCE_TOWER + "embeddings.patch_embedding.weight")
    positions = tensors.get(SOURCE_TOWER + "embeddings.position_embedding.weight")
    if patch is None or positions is None:
        raise ConvertError(f"{source}: the vision tower's patch or position embedding is missing")
    hidden, _, patch_size, _ = patch[1]
    if (hidden, patch_size) != (tower["hidden_size"], tower["patch_size"]) or \
            positions[1][0] != (tower["image_size"] // tower["patch_size"]) ** 2:
        raise ConvertError(f"{source}: the stored tower ({hidden} wide, {patch_size} px patches, {positions[1][0]} "
                           f"positions) is not the configured one; give the tower's config with --vision-config")
    return tower


def _read_ranks(path: Path) -> dict[bytes, int]:
    """tiktoken ranks, read without tiktoken: each line is a base64 token and its rank."""
    ranks = {}
    for line in io.read_bytes(str(path)).splitlines():
        if line.strip():
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)
    return ranks


def _fast_tokenizer(folder: Path, source: str):
    """arcade100k as a PreTrainedTokenizerFast: the same ids for every text, specials
    included, and `<image>` added after the last id."""
    from tokenizers import AddedToken, Tokenizer, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    files = sorted(folder.glob("*.tiktoken"))
    if len(files) != 1:
        raise ConvertError(f"{source}: expected one arcade100k .tiktoken file, found {len(files)}")
    ranks = _read_ranks(files[0])
    converter = TikTokenConverter(vocab_file=str(files[0]), pattern=ARCADE_PATTERN)
    converter.load_tiktoken_bpe = lambda _: ranks  # the same table, read without tiktoken installed
    core = converter.converted()
    core.normalizer = normalizers.NFC()  # as the authors' tokenizer normalises before encoding
    ids = {name: ARCADE_FIRST_SPECIAL + i for i, name in enumerate(ARCADE_SPECIALS)}
    if max(ranks.values()) >= ARCADE_FIRST_SPECIAL:
        raise ConvertError(f"{source}: its .tiktoken ranks reach the special token ids (from {ARCADE_FIRST_SPECIAL})")
    ids[IMAGE_TOKEN] = max(max(ranks.values()), *ids.values()) + 1
    described = json.loads(core.to_str())
    described["model"]["vocab"].update(ids)  # special tokens at their own ids, not after the ranks
    core = Tokenizer.from_str(json.dumps(described))
    core.add_special_tokens([AddedToken(name, special=True, normalized=False) for name in ids])
    config_path = folder / "tokenizer_config.json"
    settings = _read_json(config_path, source) if config_path.exists() else {}

    def token(key: str, default: str) -> str:
        value = settings.get(key) or default
        return value.get("content", default) if isinstance(value, dict) else value

    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=token("eos_token", "<|endoftext|>"),
        bos_token=token("bos_token", "<|endoftext|>"), pad_token=token("pad_token", "<|endoftext|>"),
        unk_token=token("unk_token", "<|endoftext|>"), extra_special_tokens={"image_token": IMAGE_TOKEN},
        model_max_length=int(settings.get("model_max_length", 2048)),
    )


def _llava_config(config: dict, tower: dict, tokenizer, image_token_id: int, has_head: bool):
    from transformers import LlavaConfig, SiglipVisionConfig, StableLmConfig

    text = StableLmConfig(
        vocab_size=config["vocab_size"], hidden_size=config["hidden_size"],
        intermediate_size=config["intermediate_size"], num_hidden_layers=config["num_hidden_layers"],
        num_attention_heads=config["num_attention_heads"],
        num_key_value_heads=config.get("num_key_value_heads", config["num_attention_heads"]),
        hidden_act=config.get("hidden_act", "silu"),
        max_position_embeddings=config.get("max_position_embeddings", 4096),
        layer_norm_eps=config.get("norm_eps", 1e-5), use_qkv_bias=config.get("use_qkv_bias", True),
        partial_rotary_factor=config.get("rope_pct", 0.25), rope_theta=float(config.get("rope_theta", 10000)),
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    vision = SiglipVisionConfig(
        hidden_size=tower["hidden_size"], intermediate_size=tower["intermediate_size"],
        num_hidden_layers=tower["num_hidden_layers"], num_attention_heads=tower["num_attention_heads"],
        image_size=tower["image_size"], patch_size=tower["patch_size"], layer_norm_eps=tower["layer_norm_eps"],
        hidden_act=tower["hidden_act"], vision_use_head=has_head,
    )
    return LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=image_token_id,
        vision_feature_layer=-1,  # the last stored tower layer: the uncut tower's second-to-last (see above)
        vision_feature_select_strategy="full", projector_hidden_act="gelu", multimodal_projector_bias=True,
        tie_word_embeddings=text.tie_word_embeddings,
    )


def _renamed(tensors: dict, llava, source: str) -> dict[str, str]:
    """target name -> source name, for every tensor the LLaVA model has; ConvertError
    naming source tensors it has no place for, target tensors with no source, or shapes
    that differ."""
    import torch
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        target = {name: tuple(t.shape) for name, t in LlavaForConditionalGeneration(llava).state_dict().items()}

    def prefix(ending: str) -> str:
        return next(name[: -len(ending)] for name in target if name.endswith(ending))

    vision = prefix("embeddings.patch_embedding.weight")
    text = prefix("embed_tokens.weight")
    projector = prefix("linear_1.weight")
    mapping, unknown = {}, []
    for name in tensors:
        if name.startswith(SOURCE_TOWER):
            mapping[vision + name[len(SOURCE_TOWER):]] = name
        elif name.startswith(SOURCE_TEXT):
            mapping[text + name[len("model."):]] = name
        elif name.startswith(tuple(SOURCE_PROJECTOR)):
            head = next(p for p in SOURCE_PROJECTOR if name.startswith(p))
            mapping[projector + SOURCE_PROJECTOR[head] + name[len(head):]] = name
        elif name == "lm_head.weight":
            mapping["lm_head.weight"] = name
        else:
            unknown.append(name)
    unknown += [mapping[t] for t in mapping if t not in target]
    if unknown:
        raise ConvertError(f"{source}: {len(unknown)} tensor(s) not recognised, e.g. {', '.join(sorted(unknown)[:3])}")
    missing = sorted(t for t in target if t not in mapping)
    if missing:
        raise ConvertError(f"{source}: {len(missing)} tensor(s) missing, e.g. {', '.join(missing[:3])}")
    wrong = [f"{mapping[t]} {tensors[mapping[t]][1]} (expected {target[t]})"
             for t in target if tuple(tensors[mapping[t]][1]) != target[t]]
    if wrong:
        raise ConvertError(f"{source}: {len(wrong)} tensor(s) of the wrong shape, e.g. {wrong[0]}")
    return mapping


def _write(staging: Path, renamed: dict[str, str], tensors: dict, llava, processor) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    out = {}
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for target, name in renamed.items():
        by_file.setdefault(tensors[name][0], []).append((target, name))
    for path, names in by_file.items():
        with safe_open(str(path), framework="pt") as handle:
            for target, name in names:
                out[target] = handle.get_tensor(tensors[name][3])
    save_file(out, str(staging / "model.safetensors"), metadata={"format": "pt"})
    processor.save_pretrained(str(staging))
    llava.save_pretrained(str(staging))


def _check_bits(written: Path, renamed: dict[str, str], tensors: dict) -> int:
    """Every source tensor equals its converted copy byte for byte (read back from disk)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(written), framework="pt") as out:
        for target, name in renamed.items():
            with safe_open(str(tensors[name][0]), framework="pt") as handle:
                original = handle.get_tensor(tensors[name][3])
            copy = out.get_tensor(target)
            same = original.dtype == copy.dtype and original.shape == copy.shape and torch.equal(
                original.contiguous().view(torch.uint8), copy.contiguous().view(torch.uint8))
            if not same:
                raise ConvertError(f"{name} changed on the way to {target}; nothing was published")
    return len(renamed)


def _processor(tokenizer, tower: dict):
    from transformers import LlavaProcessor
    from transformers.image_utils import PILImageResampling
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    size = tower["image_size"]
    images = LlavaImageProcessorPil(
        do_pad=True,  # pasted onto a square of the mean colour, as `image_aspect_ratio: pad`
        size={"height": size, "width": size}, do_center_crop=False, resample=PILImageResampling.BICUBIC,
        image_mean=tower["image_mean"], image_std=tower["image_std"],
    )
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=tower["patch_size"],
                          vision_feature_select_strategy="full", num_additional_image_tokens=0,
                          chat_template=PHI_TEMPLATE, image_token=IMAGE_TOKEN)


def _check_processor(staging: Path, image_token_id: int) -> int:
    """The written processor loads and expands one image into the tower's patch count."""
    from PIL import Image
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(staging))
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "a"}]}]
    prompt = processor.apply_chat_template(messages, tokenize=False)
    ids = processor(text=[prompt], images=[[Image.new("RGB", (20, 10))]], return_tensors="np")["input_ids"][0]
    return int((ids == image_token_id).sum())
