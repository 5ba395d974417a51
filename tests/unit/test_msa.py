import math

import naive
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from coincide_ray.embed.msa import decoder_info, default_layers, extract_msa_embeddings
from coincide_ray.toy.tiny import FAMILIES, build_tiny_checkpoint

LAYERS = [1, 3, 4]


@pytest.fixture(scope="module", params=FAMILIES)
def tiny(request, tmp_path_factory):
    folder = build_tiny_checkpoint(tmp_path_factory.mktemp(request.param), request.param, layers=6)
    model = AutoModelForImageTextToText.from_pretrained(folder, use_safetensors=True).eval()
    return request.param, model, AutoProcessor.from_pretrained(folder)


def image(seed):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (30 + seed, 40, 3), dtype=np.uint8))


SAMPLES = [  # (question, answer, image seed or None)
    ("What colour is the square?", "The square is red.", 1),
    ("How many triangles are there? Count them.", "three", 2),
    ("Describe it.", "A green star on a blue background next to a yellow square.", None),
    ("Read the text.", "OPEN", 3),
]


def prompt(processor, question, answer, has_image):
    user = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": question}]
    messages = [{"role": "user", "content": user}, {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
    return processor.apply_chat_template(messages, tokenize=False)


def encode(family, processor, samples, side="right"):
    processor.tokenizer.padding_side = side
    texts = [prompt(processor, q, a, s is not None) for q, a, s in samples]
    images = [[image(s)] if s is not None else [] for _, _, s in samples]
    if all(not i for i in images):
        return processor(text=texts, return_tensors="pt", padding=True)
    if family == "llava":
        return processor(text=texts, images=[i[0] for i in images if i], return_tensors="pt", padding=True)
    return processor(text=texts, images=images, return_tensors="pt", padding=True)


@pytest.mark.parametrize("side", ["right", "left"])
def test_matches_naive_single_rows_whatever_the_padding(tiny, side):
    family, model, processor = tiny
    batch = encode(family, processor, SAMPLES, side)
    got = extract_msa_embeddings(model, batch, LAYERS)
    info = decoder_info(model)
    assert got.shape == (len(SAMPLES), 2 * len(LAYERS) * info.hidden) and got.dtype == np.float32
    for row, sample in enumerate(SAMPLES):
        alone = encode(family, processor, [sample])
        assert np.allclose(got[row], naive.msa_vector(model, alone, LAYERS), atol=2e-5), (family, side, row)
    assert np.allclose(np.linalg.norm(got[[0, 1, 3]], axis=1), 1.0, atol=1e-5)
    # text-only row: vision halves are exactly zero, norm 1/sqrt(2)
    hidden = info.hidden
    for k in range(len(LAYERS)):
        assert not got[2, 2 * k * hidden:(2 * k + 1) * hidden].any()
    assert np.linalg.norm(got[2]) == pytest.approx(1 / math.sqrt(2), abs=1e-5)


def test_batch_composition_does_not_change_a_row(tiny):
    family, model, processor = tiny
    together = extract_msa_embeddings(model, encode(family, processor, SAMPLES), LAYERS)
    for row, sample in enumerate(SAMPLES):
        alone = extract_msa_embeddings(model, encode(family, processor, [sample]), LAYERS)
        assert np.allclose(alone[0], together[row], atol=2e-5)
    pair = extract_msa_embeddings(model, encode(family, processor, SAMPLES[2:0:-1]), LAYERS)
    assert np.allclose(pair[[1, 0]], together[1:3], atol=2e-5)


def test_stops_after_the_last_chosen_layer(tiny):
    family, model, processor = tiny
    info = decoder_info(model)
    calls = []
    hooks = [info.layers[5].register_forward_hook(lambda *a: calls.append("layer5")),
             model.lm_head.register_forward_hook(lambda *a: calls.append("lm_head"))]
    try:
        extract_msa_embeddings(model, encode(family, processor, SAMPLES[:2]), [0, 2])
    finally:
        for h in hooks:
            h.remove()
    assert calls == []


def test_language_start_skips_the_template_prefix_on_text_only_rows(tiny):
    family, model, processor = tiny
    batch = dict(encode(family, processor, [SAMPLES[2]]))
    full = extract_msa_embeddings(model, batch, [2])
    skipped = extract_msa_embeddings(model, {**batch, "language_start": torch.tensor([3])}, [2])
    assert not np.allclose(full, skipped)
    # the same skip done by hand: a vector over the tokens after the first three
    info = decoder_info(model)
    out = {}
    h = info.layers[2].self_attn.o_proj.register_forward_hook(lambda m, a, o: out.__setitem__("o", o[0]))
    with torch.no_grad():
        model(**batch)
    h.remove()
    t = torch.tanh(out["o"][3:].mean(0))
    assert np.allclose(skipped[0, info.hidden:], (t / t.norm() / math.sqrt(2)).numpy(), atol=2e-5)


def test_generic_discovery_and_errors(tiny):
    family, model, processor = tiny
    info = decoder_info(model)
    assert len(info.layers) == 6 and info.hidden == 32
    with pytest.raises(ValueError, match="out of range"):
        extract_msa_embeddings(model, encode(family, processor, SAMPLES[:1]), [6])
    with pytest.raises(ValueError, match="not an image-text-to-text"):
        decoder_info(torch.nn.Linear(2, 2))


def test_default_layers():
    assert default_layers(24) == (3, 7, 11, 15, 19)
    assert default_layers(6) == (0, 1, 2, 3, 4)
    assert default_layers(2) == (0, 1)
    assert default_layers(32) == (4, 10, 15, 20, 26)
