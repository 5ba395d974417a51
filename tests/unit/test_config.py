from pathlib import Path

import pytest

from coincide_ray.config import ConfigError, JobConfig, load_yaml, merge, parse_layers

EXAMPLE = Path(__file__).resolve().parents[2] / "jobs" / "job.example.yaml"


def test_example_config_parses_with_every_key():
    values = load_yaml(EXAMPLE.read_text())
    config = JobConfig.from_dict(values)
    assert config.layers == (1, 3, 5, 7) and config.cluster.clusters == 24
    assert config.select.fraction == 0.2 and config.select.kernel_memory_mb == 512
    # the example names every key of every part
    for part in ("embed", "cluster", "select"):
        assert set(values[part]) == set(config.to_dict()[part]), part
    assert set(values) == set(config.to_dict())
    assert config.embed.trust_remote_code is False


def test_flags_override_file_values():
    merged = merge({"output": "a", "select": {"fraction": 0.5, "sigma": 2.0}},
                   {"output": None, "select": {"fraction": 0.1}})
    config = JobConfig.from_dict(merged)
    assert config.output == "a" and config.select.fraction == 0.1 and config.select.sigma == 2.0


@pytest.mark.parametrize("values, message", [
    ({"output": "o", "cluster": {"clusters": 2.5}}, "cluster.clusters must be an integer"),
    ({"output": "o", "select": {"fraction": "lots"}}, "select.fraction must be a number"),
    ({"output": "o", "select": {"fraction": True}}, "select.fraction must be a number"),
    ({"output": "o", "bogus": 1}, "unknown configuration key(s): bogus"),
    ({"output": "o", "layers": [3, 3]}, "layers must not repeat"),
    ({"output": "o", "layers": []}, "at least one decoder layer"),
    ({"output": "o", "layers": [7, 3]}, "ascending order"),
    ({"output": "o", "cluster": [1]}, "cluster must be a mapping"),
    ({"output": 5}, "output must be a string"),
    ({"output": "o", "embed": {"trust_remote_code": "yes"}}, "embed.trust_remote_code must be true or false"),
    ({"output": "o", "embed": {"dtype": "float8"}}, "embed.dtype must be one of"),
    ({"output": "o", "embed": {"block_records": 0}}, "embed.block_records must be at least 1"),
])
def test_bad_values_are_one_line(values, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")) as error:
        JobConfig.from_dict(values)
    assert "\n" not in str(error.value)


def test_layers_and_yaml_errors():
    assert parse_layers("3, 7,11") == (3, 7, 11)
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml("a: [1, 2")
    with pytest.raises(ConfigError, match="mapping"):
        load_yaml("- 1\n- 2\n")


def run_cli(argv, capsys):
    from coincide_ray.cli import main

    code = main(argv)
    return code, capsys.readouterr().err.strip().splitlines()


def test_checkable_flags_are_refused_in_one_line_before_ray_starts(tmp_path, capsys, monkeypatch):
    from coincide_ray import cli
    from coincide_ray.toy.corpus import write_corpus

    started = []

    def start_ray(address=None):  # a spy: every case must be refused before it gets here
        started.append(address)
        raise RuntimeError("Ray was started")

    monkeypatch.setattr(cli, "start_ray", start_ray)

    write_corpus(str(tmp_path / "c" / "records.json"), str(tmp_path / "c"), 2, seed=1, broken=False)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    (model / "model.safetensors").write_bytes(b"")
    base = ["run", "--input", str(tmp_path / "c" / "records.json"), "--image-root", str(tmp_path / "c"),
            "--model", str(model), "--output", str(tmp_path / "out"), "--layers", "1"]
    cases = [
        (["--seed", "-1"], "cluster.seed must lie in"),
        (["--compare-with", str(tmp_path / "nonexistent")], "--compare-with"),
        (["--previous", str(tmp_path / "no-previous")], "--previous"),
    ]
    for extra, message in cases:
        code, err = run_cli(base + extra, capsys)
        assert code == 2 and len(err) == 1 and message in err[0] and "Traceback" not in err[0], (extra, err)
    code, err = run_cli(["run", "--input", str(tmp_path / "typo.json"), *base[3:]], capsys)
    assert code == 2 and len(err) == 1 and "--input" in err[0] and "typo.json" in err[0]
    code, err = run_cli(["select", "--embeddings", str(tmp_path / "none"), "--output", str(tmp_path / "o2")], capsys)
    assert code == 2 and len(err) == 1 and "--embeddings" in err[0]
    assert not started  # refused before Ray starts
    assert not (tmp_path / "out").exists() and not (tmp_path / "o2").exists()


def alias_bomb(levels: int, key: str = "clusters") -> str:
    lines = ['l0: &l0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for level in range(1, levels):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 9) + "]")
    return "\n".join(lines) + f"\ncluster:\n  {key}: *l{levels - 1}\n"


@pytest.mark.parametrize("levels", [6, 10])
def test_a_yaml_alias_bomb_is_refused_at_once_in_one_short_line(tmp_path, levels, capsys):
    import time

    from coincide_ray.cli import main

    path = tmp_path / "bomb.yaml"
    path.write_text(alias_bomb(levels))
    began = time.monotonic()
    code = main(["select", "--config", str(path), "--output", str(tmp_path / "out"), "--embeddings", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and len(err[0]) < 400, err[0][:500]
    assert "aliases" in err[0]
    assert time.monotonic() - began < 10


def test_a_huge_value_in_a_typed_key_is_quoted_short():
    from coincide_ray.config import ConfigError, JobConfig

    huge = [[list(range(50))] * 50] * 20  # 50,000 values: under the alias cap, far over a line
    with pytest.raises(ConfigError) as caught:
        JobConfig.from_dict({"output": "o", "cluster": {"clusters": huge}})
    assert "cluster.clusters must be an integer" in str(caught.value) and len(str(caught.value)) < 200
