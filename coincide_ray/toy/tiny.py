"""Tiny random-weight image-text-to-text checkpoints, built from transformers configs.

Nothing can be downloaded where the tests and the demo run, so they build their own
checkpoints: a byte-level BPE tokenizer trained on a few sentences, a real image
processor, a real chat template, and a model of the requested family with random
weights, saved with safetensors exactly as a real checkpoint is. They then go through the
same loading code as a real checkpoint.

Families: "llava" (LlavaForConditionalGeneration: CLIP vision tower + projector + Llama
decoder under `language_model`, the shape of TinyLLaVA's HF port) and "idefics3"
(Idefics3ForConditionalGeneration, SmolVLM's architecture: SigLIP-style `vision_model`, a
pixel-shuffle `connector`, the decoder under `text_model`, image tiles wrapped in
<fake_token_around_image><global-img> markers) and "llava-next" (LlavaNextForConditionalGeneration
with a Qwen2 decoder: "anyres" images cut into tiles on a grid of resolutions, so an image's
token count depends on its shape, as in LLaVA-OneVision). LLaVA-OneVision itself and Qwen2-VL
would be further layouts, but their processors cannot be built without torchvision (OneVision's
needs a video processor), which has no CPU build here.
"""

from __future__ import annotations

from pathlib import Path

FAMILIES = ("llava", "idefics3", "llava-next")

_CORPUS = [
    "USER: ASSISTANT: SYSTEM: You are a helpful assistant.",
    "What colour is the square? The square is red. What shape is it? It is a circle.",
    "How many triangles are there? There are three. Read the text in the image. It says OPEN.",
    "Describe the image. A green star on a blue background next to a yellow square.",
    "0 1 2 3 4 5 6 7 8 9 ten eleven twelve colour shape count read describe",
]

LLAVA_TEMPLATE = (
    "{{ 'A chat between a curious user and an assistant. ' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}USER: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: {% for c in m['content'] %}{{ c['text'] }}{% endfor %}</s>{% endif %}{% endfor %}"
)

IDEFICS3_TEMPLATE = (
    "<|im_start|>{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% else %} {{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>\n{% endfor %}"
)


def _tokenizer(specials: list[str], image_token: str):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token=specials[0],
        bos_token=specials[1],
        eos_token=specials[2],
        extra_special_tokens={"image_token": image_token},
    )


def build_tiny_checkpoint(
    folder: str | Path,
    family: str = "llava",
    *,
    hidden: int = 32,
    layers: int = 6,
    heads: int = 2,
    image_size: int = 32,
    seed: int = 0,
) -> Path:
    """Write a random-weight checkpoint of `family` (safetensors + processor) to `folder`."""
    import torch

    if family not in FAMILIES:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {', '.join(FAMILIES)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    text = dict(
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=4096,
    )
    if family == "llava":
        model, processor = _llava(text, hidden, image_size)
    elif family == "llava-next":
        model, processor = _llava_next(text, hidden, image_size)
    else:
        model, processor = _idefics3(text, hidden, image_size)
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def _clip_tower(hidden: int, image_size: int, patch: int):
    """A two-layer CLIP vision tower: LLaVA-1.5's kind, at toy size."""
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, image_size=image_size, patch_size=patch)


def _llava(text: dict, hidden: int, image_size: int):
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    tokenizer = _tokenizer(["<pad>", "<s>", "</s>", "<image>"], "<image>")
    patch = 8
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="default",  # LLaVA-1.5: drop the CLS feature
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
        image_token="<image>",
    )
    config = LlavaConfig(
        vision_config=_clip_tower(hidden, image_size, patch),
        text_config=LlamaConfig(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
    )
    return LlavaForConditionalGeneration(config).eval(), processor


QWEN2_TEMPLATE = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}"
)


def _llava_next(text: dict, hidden: int, image_size: int):
    from transformers import (
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextProcessor,
        Qwen2Config,
    )
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tokenizer = _tokenizer(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"], "<image>")
    patch = 8
    grid = [[image_size, image_size], [image_size, 2 * image_size], [2 * image_size, image_size]]
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
            image_grid_pinpoints=grid,
        ),
        tokenizer=tokenizer, patch_size=patch, vision_feature_select_strategy="default",
        num_additional_image_tokens=1, chat_template=QWEN2_TEMPLATE, image_token="<image>",
    )
    config = LlavaNextConfig(
        vision_config=_clip_tower(hidden, image_size, patch),
        text_config=Qwen2Config(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **text),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=grid, vision_feature_layer=-1, vision_feature_select_strategy="default",
    )
    return LlavaNextForConditionalGeneration(config).eval(), processor


# TinyLLaVA-2.0B's shape (the paper's reference model): a StableLM-2-1.6B-sized decoder and a
# SigLIP-so400m tower without its last layer, 729 patch tokens per 384 x 384 image. The
# decoder is built as Llama (the same matrix shapes and FLOPs; StableLM's partial rotary and
# layer norms do not change the cost). QUICK is the same layout at toy size.
TINYLLAVA_2B = dict(hidden=2048, layers=24, heads=32, intermediate=5632, vocab=100352, vision_hidden=1152,
                    vision_layers=26, vision_heads=16, vision_intermediate=4304, image_size=384, patch=14)
TINYLLAVA_QUICK = dict(hidden=64, layers=4, heads=2, intermediate=128, vocab=600, vision_hidden=32,
                       vision_layers=2, vision_heads=2, vision_intermediate=64, image_size=56, patch=14)


def build_tinyllava_shaped(folder: str | Path, shape: dict, seed: int = 0, dtype: str = "bfloat16") -> Path:
    """A random-weight LlavaForConditionalGeneration of `shape` (TINYLLAVA_2B or
    TINYLLAVA_QUICK): SigLIP tower, all its patch features (no CLS), the second-to-last
    layer's, a two-layer GELU projector; saved with safetensors in `dtype`."""
    import torch
    from transformers import (
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        SiglipVisionConfig,
    )
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tokenizer = _tokenizer(["<pad>", "<s>", "</s>", "<image>"], "<image>")
    size = shape["image_size"]
    processor = LlavaProcessor(
        image_processor=SiglipImageProcessorPil(size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=shape["patch"], vision_feature_select_strategy="full",
        num_additional_image_tokens=0, chat_template=LLAVA_TEMPLATE, image_token="<image>",
    )
    config = LlavaConfig(
        vision_config=SiglipVisionConfig(
            hidden_size=shape["vision_hidden"], intermediate_size=shape["vision_intermediate"],
            num_hidden_layers=shape["vision_layers"], num_attention_heads=shape["vision_heads"],
            image_size=size, patch_size=shape["patch"],
        ),
        text_config=LlamaConfig(
            vocab_size=max(shape["vocab"], len(tokenizer)), pad_token_id=tokenizer.pad_token_id,
            hidden_size=shape["hidden"], intermediate_size=shape["intermediate"],
            num_hidden_layers=shape["layers"], num_attention_heads=shape["heads"],
            num_key_value_heads=shape["heads"], max_position_embeddings=4096,
        ),
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="full", projector_hidden_act="gelu",
    )
    model = LlavaForConditionalGeneration(config).eval().to(getattr(torch, dtype))
    model.save_pretrained(folder, safe_serialization=True)
    processor.save_pretrained(folder)
    return folder


def _idefics3(text: dict, hidden: int, image_size: int):
    from transformers import (
        Idefics3Config,
        Idefics3ForConditionalGeneration,
        Idefics3Processor,
    )
    from transformers.models.idefics3 import Idefics3ImageProcessorPil

    specials = ["<|endoftext|>", "<|im_start|>", "<end_of_utterance>", "<image>", "<fake_token_around_image>",
                "<global-img>"]
    tokenizer = _tokenizer(specials, "<image>")
    patch, scale = 8, 2
    image_processor = Idefics3ImageProcessorPil(
        do_image_splitting=False,  # one global tile per image keeps the tiny model tiny
        size={"longest_edge": image_size},
        max_image_size={"longest_edge": image_size},
    )
    processor = Idefics3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_len=(image_size // patch) ** 2 // scale**2,
        chat_template=IDEFICS3_TEMPLATE,
    )
    config = Idefics3Config(
        vision_config=dict(
            hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2, num_attention_heads=2,
            image_size=image_size, patch_size=patch,
        ),
        text_config=dict(
            model_type="llama", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, **text,
        ),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        scale_factor=scale,
    )
    return Idefics3ForConditionalGeneration(config).eval(), processor
