"""Compressed models saved as Hugging Face folders and rebuilt by load_compressed."""

from __future__ import annotations

import json

import pytest
import torch
from compress_plans import make_plan
from helpers import sample_text, save_tiny_model, tiny_model, tiny_tokenizer

import cwca_export
from cwca_export.compression.saving import describe_structure, save_compressed
from cwca_export.data import calibration_data


@pytest.fixture(scope="module")
def data():
    return calibration_data([sample_text()], tiny_tokenizer(), num_samples=4, seq_len=32)


def _logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize(
    ("family", "steps"),
    [
        ("llama", [("width", "prune", {"heads": True})]),
        ("gpt2", [("width", "prune", {"heads": True})]),
        ("phi3", [("width", "prune", {})]),
        ("qwen2", [("sparsegpt", "prune", {"nm": "2:4"})]),
        ("gpt2", [("asvd", "allocate", {})]),
        ("mistral", [("width", "prune", {"heads": True}), ("lowrank", "allocate", {})]),
    ],
    ids=lambda v: v if isinstance(v, str) else "+".join(s[0] for s in v),
)
def test_round_trip_gives_the_same_logits_and_tokens(tmp_path, family, steps, data):
    model = tiny_model(family)
    for method, program, options in steps:
        plan = make_plan(model, program, [0.3, 0.6] if program == "prune" else [1, 2])
        cwca_export.compress(model, plan, method=method, data=data, **options)
    path = save_compressed(model, tmp_path / "out", tokenizer=tiny_tokenizer())
    loaded = cwca_export.load_compressed(path)
    ids = data.input_ids[:2]
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids), rtol=1e-5, atol=1e-5)
    prompt = ids[:, :8]
    assert torch.equal(
        loaded.generate(prompt, max_new_tokens=5, do_sample=False),
        model.generate(prompt, max_new_tokens=5, do_sample=False),
    )
    record = json.loads((path / "config.json").read_text())["cwca_compression"]
    assert record["blocks"] == describe_structure(loaded) == describe_structure(model)
    assert [s["method"] for s in record["steps"]] == [s[0] for s in steps]
    assert (path / "model.safetensors").is_file() and (path / "tokenizer.json").is_file()
    assert not list(tmp_path.glob(".out.*"))  # no staging folders left behind


def test_config_records_per_block_shapes(tmp_path, data):
    model = tiny_model("llama")
    cwca_export.compress(
        model, make_plan(model, "prune", [0.3, 0.6]), method="width", data=data, heads=True
    )
    path = save_compressed(model, tmp_path / "out")
    record = json.loads((path / "config.json").read_text())["cwca_compression"]
    assert record["schema_version"] == 1
    assert record["blocks"] == [
        {
            "index": 0,
            "name": "model.layers.0",
            "intermediate_size": 48,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "factorised": {},
        },
        {
            "index": 1,
            "name": "model.layers.1",
            "intermediate_size": 24,
            "num_attention_heads": 2,
            "num_key_value_heads": 1,
            "factorised": {},
        },
    ]
    step = record["steps"][0]
    assert step["method"] == "width" and step["options"]["heads"] is True
    assert step["plan"]["x"] == [0.3, 0.6] and step["data"]["samples"] == 4


def test_plain_save_pretrained_after_compress_is_loadable(tmp_path):
    model = tiny_model("gpt2")
    cwca_export.compress(model, make_plan(model, "allocate", [1, 2]), method="lowrank", rank_step=4)
    model.save_pretrained(tmp_path / "plain")
    loaded = cwca_export.load_compressed(tmp_path / "plain")
    ids = torch.arange(10).reshape(1, 10)
    torch.testing.assert_close(_logits(loaded, ids), _logits(model, ids))
    assert loaded.transformer.h[1].mlp.c_fc[0].out_features == 8


def test_load_refuses_dense_and_newer_folders(tmp_path):
    dense = save_tiny_model("llama", tmp_path / "dense")
    with pytest.raises(ValueError, match="no 'cwca_compression' entry"):
        cwca_export.load_compressed(dense)
    config = json.loads((dense / "config.json").read_text())
    config["cwca_compression"] = {"schema_version": 99, "blocks": []}
    (dense / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="newer"):
        cwca_export.load_compressed(dense)
    with pytest.raises(FileNotFoundError):
        cwca_export.load_compressed(tmp_path / "missing")


def test_saving_is_atomic(tmp_path, monkeypatch):
    model = tiny_model("llama")
    out = tmp_path / "out"
    save_compressed(model, out)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_compressed(model, out)

    def broken(folder, **_kwargs):
        (folder / "config.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(model, "save_pretrained", broken)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, tmp_path / "other")
    assert not (tmp_path / "other").exists()
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, out, overwrite=True)
    assert (out / "model.safetensors").is_file()  # the old folder survives a failed overwrite
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
