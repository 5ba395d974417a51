"""`coincide-ray convert tinyllava` from an s3:// source to an s3:// output (moto's server on
loopback), and the output loaded through the embed stage's own loading code from S3."""

import torch
from safetensors import safe_open
from tinyllava_source import source_weights, write_source, write_tower_config

from coincide_ray import io
from coincide_ray.cli import main
from coincide_ray.config import EmbedConfig
from coincide_ray.embed.model import load_model, local_copy


def upload(folder, uri):
    for path in sorted(folder.iterdir()):
        io.publish_file(str(path), io.join(uri, path.name))


def test_convert_from_and_to_s3(tmp_path, s3_endpoint):
    weights = source_weights(seed=3)
    base = "s3://coincide-test/convert-" + tmp_path.name
    upload(write_source(tmp_path / "source", weights), io.join(base, "TinyLLaVA-2.0B"))
    upload(write_tower_config(tmp_path / "tower"), io.join(base, "tower"))
    output = io.join(base, "converted")
    assert main(["convert", "tinyllava", "--source", io.join(base, "TinyLLaVA-2.0B"), "--output", output,
                 "--vision-config", io.join(base, "tower")]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= {
        path.rsplit("/", 1)[-1] for path in io.list_files(output, ("",))}
    cache = str(tmp_path / "cache")
    loaded = load_model(output, EmbedConfig(dtype="float32", model_cache=cache), device="cpu")
    assert type(loaded.model).__name__ == "LlavaForConditionalGeneration"
    with safe_open(str(local_copy(output, cache) / "model.safetensors"), framework="pt") as handle:
        norm = handle.get_tensor("model.language_model.norm.bias")
    assert torch.equal(norm.view(torch.int16), weights["model.norm.bias"].view(torch.int16))
    assert main(["convert", "tinyllava", "--source", io.join(base, "TinyLLaVA-2.0B"), "--output", output]) == 2
