import json
import os
from io import BytesIO

import naive
import numpy as np
import pytest
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from coincide_ray import io, schema
from coincide_ray.cli import main
from coincide_ray.toy.corpus import BROKEN_REASONS, write_corpus

LAYERS = "1,3,4"


def job_yaml(tmp_path, name, block_records, batch_size):
    """float32 storage: the vectors are checked against the recipe at float32 precision
    (test_float16_vectors shows float16 storage is these vectors rounded once)."""
    path = tmp_path / f"{name}.yaml"
    path.write_text(f"embed:\n  block_records: {block_records}\n  batch_size: {batch_size}\n"
                    f"  model_cache: {tmp_path / 'cache'}\n  vector_dtype: float32\n")
    return str(path)


def upload_folder(local, uri):
    for name in sorted(os.listdir(local)):
        io.write_bytes(io.join(uri, name), open(os.path.join(local, name), "rb").read())


def run(storage, tmp_path, model, output, block_records=8, batch_size=4):
    return main(["run", "--input", io.join(storage, "corpus", "records.json"),
                 "--image-root", io.join(storage, "corpus"), "--model", model, "--output", output,
                 "--layers", LAYERS, "--clusters", "3", "--iterations", "5", "--fraction", "0.3",
                 "--config", job_yaml(tmp_path, output.rsplit("/", 1)[-1], block_records, batch_size)])


def embeddings_by_id(output):
    vectors = {}
    for path in io.list_files(io.join(output, "embeddings"), (".parquet",)):
        table = io.read_parquet(path).to_pydict()
        for sample_id, vector in zip(table["sample_id"], table["embedding"]):
            if vector is not None:
                vectors[sample_id] = np.array(vector, np.float32)
    return vectors


@pytest.mark.slow
def test_run_from_records_to_selection(storage, tmp_path, tiny_model, ray_session):
    records = write_corpus(io.join(storage, "corpus", "records.json"), io.join(storage, "corpus"), 30, seed=3)
    model = tiny_model
    if storage.startswith("s3://"):
        model = io.join(storage, "model")
        upload_folder(tiny_model, model)
    out = io.join(storage, "run")
    assert run(storage, tmp_path, model, out) == 0

    # every record ends selected, not selected or rejected, the planted bad ones with their reason
    selection = io.read_parquet(io.join(out, schema.SELECTION_PATH)).to_pydict()
    rejected = io.read_parquet(io.join(out, schema.REJECTED_PATH)).to_pydict()
    assert len(selection["sample_id"]) + len(rejected["sample_id"]) == len(records)
    assert dict(zip(rejected["sample_id"], rejected["reason"])) == BROKEN_REASONS
    assert set(rejected["stage"]) <= {"read", "embed"}
    good = [r["id"] for r in records if r["concept"] != "broken"]
    assert selection["sample_id"] == good  # canonical order
    assert sum(selection["selected"]) == int(0.3 * len(good))

    # the pipeline's vectors are the naive reference's (tests/naive.py: its own decoder lookup,
    # the full forward, loops) on rows built here from the record and its image file, one at a time
    vectors = embeddings_by_id(out)
    hf = AutoModelForImageTextToText.from_pretrained(tiny_model, use_safetensors=True).eval()
    processor = AutoProcessor.from_pretrained(tiny_model)
    checked = 0
    for record in [r for r in records if r.get("image") and r["concept"] != "broken"][:4]:
        question, answer = (turn["value"] for turn in record["conversations"][:2])
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": question.replace("<image>", "").strip()}]},
                    {"role": "assistant", "content": [{"type": "text", "text": answer}]}]
        picture = Image.open(BytesIO(io.read_bytes(io.join(storage, "corpus", record["image"])))).convert("RGB")
        row = processor(text=[processor.apply_chat_template(messages, tokenize=False)], images=[picture],
                        return_tensors="pt")
        assert np.allclose(vectors[record["id"]], naive.msa_vector(hf, row, [1, 3, 4]), atol=1e-5)
        checked += 1
    assert checked == 4
    provenance = io.read_json(io.join(out, schema.PROVENANCE_PATH))
    assert provenance["dimension"] == 2 * 3 * 32 and provenance["layers"] == [1, 3, 4]
    manifest = io.read_json(io.join(out, schema.MANIFEST_PATH))
    assert manifest["counts"]["rejected"] == len(BROKEN_REASONS)
    assert manifest["counts"]["embedded"] == len(good) and manifest["counts"]["reused"] == 0
    chosen = {i for i, s in zip(selection["sample_id"], selection["selected"]) if s}
    assert io.read_json(io.join(out, schema.SELECTED_RECORDS_PATH)) == [r for r in records if r["id"] in chosen
                                                                        and r["concept"] != "broken"]

    # a second run finds every block written and rewrites none of them
    parts = io.list_files(io.join(out, "embeddings"), (".parquet",))
    before = {p: io.read_bytes(p) for p in parts}
    fs, _ = io.resolve(parts[0])
    stamps = {p: fs.info(io.resolve(p)[1]).get("LastModified") or fs.info(io.resolve(p)[1]).get("mtime")
              for p in parts}
    assert run(storage, tmp_path, model, out) == 0
    assert io.read_json(io.join(out, schema.MANIFEST_PATH))["counts"]["reused"] == len(good)
    assert {p: io.read_bytes(p) for p in parts} == before
    assert {p: fs.info(io.resolve(p)[1]).get("LastModified") or fs.info(io.resolve(p)[1]).get("mtime")
            for p in parts} == stamps

    # another parallel layout: same vectors, same selection
    other = io.join(storage, "run-other-layout")
    assert run(storage, tmp_path, model, other, block_records=5, batch_size=3) == 0
    other_vectors = embeddings_by_id(other)
    assert other_vectors.keys() == vectors.keys()
    assert all(np.allclose(other_vectors[k], vectors[k], atol=1e-5) for k in vectors)
    other_selection = io.read_parquet(io.join(other, schema.SELECTION_PATH)).to_pydict()
    assert other_selection["selected"] == selection["selected"]


def test_model_errors_are_one_line(tmp_path, capsys, tiny_model):
    (tmp_path / "records.json").write_text(json.dumps([{"id": "a", "conversations": [
        {"from": "human", "value": "hi"}, {"from": "gpt", "value": "hello"}]}]))
    weightless = tmp_path / "weightless"
    weightless.mkdir()
    (weightless / "config.json").write_text("{}")
    (weightless / "pytorch_model.bin").write_bytes(b"pickled")
    code = main(["embed", "--input", str(tmp_path / "records.json"), "--model", str(weightless),
                 "--output", str(tmp_path / "out"), "--layers", "1"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "no .safetensors weights" in err[-1] and "Traceback" not in "\n".join(err)
    code = main(["embed", "--input", str(tmp_path / "records.json"), "--model", tiny_model,
                 "--output", str(tmp_path / "out2"), "--layers", "1,9"])
    assert code == 2 and "out of range" in capsys.readouterr().err
    code = main(["embed", "--input", str(tmp_path / "records.json"), "--model", str(tmp_path / "none"),
                 "--output", str(tmp_path / "out3"), "--layers", "1"])
    assert code == 2 and "no checkpoint folder" in capsys.readouterr().err


def test_changed_model_is_not_mixed_into_old_shards(tmp_path, tiny_model, ray_session, capsys):
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    write_corpus(str(tmp_path / "corpus" / "records.json"), str(tmp_path / "corpus"), 6, seed=1, broken=False)
    args = ["embed", "--input", str(tmp_path / "corpus" / "records.json"), "--image-root", str(tmp_path / "corpus"),
            "--output", str(tmp_path / "out"), "--layers", "1"]
    assert main(args + ["--model", tiny_model]) == 0
    other = build_tiny_checkpoint(tmp_path / "other-model", "llava", layers=6, seed=5)
    assert main(args + ["--model", str(other)]) == 2
    assert "made with other model_fingerprint" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "out" / schema.IN_PROGRESS_PATH)  # refused: the output is left as it was


@pytest.mark.parametrize("family", ["idefics3", "llava-next"])
def test_other_families_with_default_layers(family, tmp_path, ray_session):
    from coincide_ray.embed.msa import default_layers
    from coincide_ray.toy.tiny import build_tiny_checkpoint

    model = build_tiny_checkpoint(tmp_path / family, family, layers=6)
    records = write_corpus(str(tmp_path / "corpus" / "records.json"), str(tmp_path / "corpus"), 12, seed=2)
    out = str(tmp_path / "out")
    base = ["--input", str(tmp_path / "corpus" / "records.json"), "--image-root", str(tmp_path / "corpus"),
            "--model", str(model), "--output", out]
    assert main(["embed", *base]) == 0
    provenance = io.read_json(io.join(out, schema.PROVENANCE_PATH))
    assert tuple(provenance["layers"]) == default_layers(6) == (0, 1, 2, 3, 4)
    vectors = embeddings_by_id(out)
    assert len(vectors) == 12 and all(v.shape == (2 * 5 * 32,) for v in vectors.values())
    # select takes the layers from the provenance when none are given
    assert main(["select", "--output", out, "--clusters", "2", "--iterations", "3", "--fraction", "0.5"]) == 0
    manifest = io.read_json(io.join(out, schema.MANIFEST_PATH))
    assert manifest["config"]["layers"] == [0, 1, 2, 3, 4]
    assert manifest["counts"]["records"] == len(records)


def test_preparation_stays_apart_from_the_model_actors(capsys):
    # One preparing task at a time beside one model actor (a 2-CPU machine's plan): Ray Data
    # would run both in the model actor if it fused them, and preparing would no longer overlap the model
    from coincide_ray.config import EmbedConfig, JobConfig
    from coincide_ray.embed.stage import Pool, Publish, embed_dataset

    config = JobConfig(input="unused", model="unused", output="unused", embed=EmbedConfig(device="cpu"))
    pool = Pool("cpu", (1, 1), 0.0, 2, (1, 1))
    embed_dataset([{"block": 0}], config, "salt", None, Publish("unused"), pool).explain()
    optimized = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "TaskPoolMapOperator[Map(prepare_block)]" in optimized
    assert "ActorPoolMapOperator[Map(ModelWorker)]" in optimized
