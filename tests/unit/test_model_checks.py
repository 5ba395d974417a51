"""A checkpoint is checked before Ray starts: its safetensors headers, and the shapes of its
tensors against its config.json. A bad one is one line naming the file."""

import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

from coincide_ray.cli import main
from coincide_ray.toy.corpus import write_corpus
from coincide_ray.toy.tiny import build_tiny_checkpoint


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("m"), "llava", layers=2)


def weights_file(folder):
    return next(p for p in folder.iterdir() if p.suffix == ".safetensors")


def refused(tmp_path, model, capsys):
    from coincide_ray import cli

    started = []

    def start_ray(address=None):  # a spy: the run must be refused before it gets here
        started.append(address)
        raise RuntimeError("Ray was started")

    original, cli.start_ray = cli.start_ray, start_ray
    try:
        write_corpus(str(tmp_path / "c" / "records.json"), str(tmp_path / "c"), 2, seed=1, broken=False)
        code = main(["embed", "--input", str(tmp_path / "c" / "records.json"), "--image-root", str(tmp_path / "c"),
                     "--model", str(model), "--output", str(tmp_path / "out"), "--layers", "1"])
    finally:
        cli.start_ray = original
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err[-5:]
    assert not started and not (tmp_path / "out").exists()  # refused before Ray starts, nothing written
    return err[0]


def test_a_header_length_beyond_the_file_is_one_line_naming_it(tmp_path, checkpoint, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    weights = weights_file(broken)
    data = bytearray(weights.read_bytes())
    data[:8] = struct.pack("<Q", 2**40)  # as a corrupt upload: a header of a terabyte
    weights.write_bytes(bytes(data))
    line = refused(tmp_path, broken, capsys)
    assert str(weights) in line and "corrupt safetensors header" in line


def test_header_garbage_and_offsets_outside_the_data_are_refused(tmp_path, checkpoint, capsys):
    broken = tmp_path / "garbage"
    shutil.copytree(checkpoint, broken)
    weights = weights_file(broken)
    weights.write_bytes(struct.pack("<Q", 5) + b"{nope" + b"\0" * 64)
    assert "not JSON" in refused(tmp_path, broken, capsys)
    cut = tmp_path / "cut"
    shutil.copytree(checkpoint, cut)
    whole = weights_file(cut).read_bytes()
    weights_file(cut).write_bytes(whole[: len(whole) // 2])  # the data ends before the last tensors
    assert "data outside the file" in refused(tmp_path / "second", cut, capsys)


def test_a_tensor_whose_shape_the_config_does_not_give_is_named(tmp_path, checkpoint, capsys):
    broken = tmp_path / "reshaped"
    shutil.copytree(checkpoint, broken)
    weights = weights_file(broken)
    tensors = load_file(str(weights))
    key = "language_model.model.layers.0.mlp.up_proj.weight"
    rows, columns = tensors[key].shape
    tensors[key] = torch.zeros(rows + 1, columns)
    save_file(tensors, str(weights), metadata={"format": "pt"})
    line = refused(tmp_path, broken, capsys)
    assert str(weights) in line and key in line and f"[{rows + 1}, {columns}]" in line and f"[{rows}, {columns}]" in line
