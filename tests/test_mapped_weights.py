"""Weights as file pages (issue 14, the 7B export and eval): a low-memory export widens a
bfloat16 checkpoint into a mapped float32 scratch file instead of memory, and its ONNX Runtime
sessions (and ``eval --low-memory``'s) run without prepacking, computing from the artifact's
mapped external data.

References: the ordinary export of the same checkpoint loaded in float32 by transformers (byte
for byte), the kernel's own account of the process's memory (``/proc/self/maps`` and
``RssAnon``), and ONNX Runtime's default (prepacked) session."""

from __future__ import annotations

import copy
import filecmp
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from helpers import save_tiny_model, tiny_model, tiny_tokenizer

import cwca_export
from cwca_export.budget import Budget
from cwca_export.cli import cli
from cwca_export.exporter.manifest import MANIFEST_NAME
from cwca_export.exporter.measure import MeasureConfig, measure_runtime
from cwca_export.exporter.placeholders import map_weights
from cwca_export.exporter.session import DecoderSession, make_session

COMMON = ["--prompt-len", "8", "--context", "24", "--runs", "2", "--warmup", "1"]


def _mapped_files() -> dict[tuple[int, int], str]:
    spans = {}
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) == 6:
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans[(start, end)] = fields[5]
    return spans


def _file_of(address: int) -> str | None:
    return next((name for (start, end), name in _mapped_files().items() if start <= address < end), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_map_weights_gives_float32_file_pages_that_compute_like_a_float32_load(tmp_path, dtype):
    model = tiny_model("llama").to(dtype)
    widened = copy.deepcopy(model).float()  # what loading the same weights in float32 gives
    spill = tmp_path / "weights.spill"
    mapped = map_weights(model, spill)
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    assert len(mapped) == len(matrices) > 0
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(_file_of(p.data_ptr()) == str(spill) for p in matrices)  # the kernel says where they live
    assert spill.stat().st_size == 4 * sum(p.numel() for p in matrices)
    ids = torch.randint(2, 60, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, widened(ids).logits)


@pytest.mark.parametrize("threshold", ["1KiB", "2GiB"])  # external data, and an inline graph
def test_low_memory_export_of_a_bfloat16_checkpoint_is_the_float32_export(tmp_path, threshold):
    folder = tmp_path / "bf16-llama"
    tiny_model("llama").to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    assert json.loads((folder / "config.json").read_text())["dtype"] == "bfloat16"
    runner = CliRunner()
    ordinary = runner.invoke(cli, ["export", str(folder), "--backend", "onnx", "--external-data-threshold", threshold,
                                   "--out", str(tmp_path / "ordinary"), *COMMON])
    assert ordinary.exit_code == 0, ordinary.output
    lean = runner.invoke(cli, ["export", str(folder), "--backend", "onnx", "--low-memory", "--external-data-threshold",
                               threshold, "--out", str(tmp_path / "lean"), *COMMON])
    assert lean.exit_code == 0, lean.output
    names = sorted(p.name for p in (tmp_path / "ordinary").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "lean").iterdir())  # no scratch file left
    for name in names:
        if name != MANIFEST_NAME:
            assert filecmp.cmp(tmp_path / "ordinary" / name, tmp_path / "lean" / name, shallow=False), name
    manifests = [json.loads((tmp_path / n / MANIFEST_NAME).read_text()) for n in ("ordinary", "lean")]
    assert manifests[0]["model"] == manifests[1]["model"]
    assert manifests[0]["verification"]["fp32"] == manifests[1]["verification"]["fp32"] or (
        manifests[1]["verification"]["fp32"]["parity"]["rel_rms"] < 1e-5)
    workloads = [m["measurement"]["workload"] for m in manifests]
    assert workloads[0]["prepack"] is True and workloads[1]["prepack"] is False


def test_low_memory_compression_still_starts_from_float32(tmp_path):
    """A method compresses in the precision it is given: a bfloat16 model is refused, not widened after."""
    model = tiny_model("llama").to(torch.bfloat16)
    with pytest.raises(ValueError, match="float32 torch model"):
        cwca_export.export(model, None, tmp_path / "a", backend="onnx", low_memory=True, method="magnitude",
                           budget=Budget(prompt_len=8, context=24), runs=2, warmup=1)
    with pytest.raises(ValueError, match="float32 torch model"):
        cwca_export.export(model, None, tmp_path / "b", backend="onnx",
                           budget=Budget(prompt_len=8, context=24), runs=2, warmup=1)


@pytest.fixture(scope="module")
def external_artifact(tmp_path_factory):
    """A llama of 37 MB of float32 weights, exported with external data."""
    tmp = tmp_path_factory.mktemp("mapped")
    model = tiny_model("llama", hidden_size=256, intermediate_size=1024, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=8)
    weights = 4 * sum(p.numel() for p in model.parameters())
    artifact = cwca_export.export(model, None, tmp / "art", backend="onnx", tokenizer=tiny_tokenizer(),
                                  external_data_threshold=1024, budget=Budget(prompt_len=8, context=24),
                                  runs=2, warmup=1)
    assert (artifact.path / "model.onnx_data").stat().st_size > 0.9 * weights
    return artifact, weights


def test_a_session_without_prepacking_keeps_the_weights_as_file_pages(external_artifact):
    """The kernel's count of the measuring process's own memory (RssAnon): the weights without
    prepacking stay pages of model.onnx_data; with it, ONNX Runtime holds its own copy."""
    artifact, weights = external_artifact
    config = MeasureConfig(prompt_len=8, context=24, runs=1, warmup=0)
    packed = measure_runtime(artifact.model_path, config)
    mapped = measure_runtime(artifact.model_path, MeasureConfig(**{**config.__dict__, "prepack": False}))
    assert packed["anonymous_after_bytes"] > 0.8 * weights
    assert mapped["anonymous_after_bytes"] < 0.3 * weights
    assert mapped["workload"]["prepack"] is False and packed["workload"]["prepack"] is True


def test_a_session_without_prepacking_computes_what_the_default_one_does(external_artifact):
    artifact, _ = external_artifact
    ids = np.random.default_rng(0).integers(2, 60, size=(2, 7))
    logits = []
    for prepack in (True, False):
        decoder = DecoderSession(make_session(artifact.model_path, prepack=prepack))
        logits.append(decoder.session.run(["logits"], decoder.feed(ids, np.ones_like(ids), None))[0])
    scale = float(np.sqrt(np.mean(logits[0].astype(np.float64) ** 2)))
    assert float(np.abs(logits[0] - logits[1]).max()) < 1e-5 * max(scale, 1.0)


def test_eval_low_memory(tmp_path, external_artifact):
    artifact, _ = external_artifact
    text = tmp_path / "heldout.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then the dog sleeps. " * 20)
    runner = CliRunner()
    args = ["eval", str(artifact.path), "--data", str(text), "--seq-len", "16", "--max-tokens", "64", "--json"]
    default = runner.invoke(cli, args)
    lean = runner.invoke(cli, [*args, "--low-memory"])
    assert default.exit_code == 0 and lean.exit_code == 0, default.output + lean.output
    a, b = json.loads(default.output), json.loads(lean.output)
    assert a["tokens"] == b["tokens"] and math.isclose(a["perplexity"], b["perplexity"], rel_tol=1e-5)
    assert b["runtime"] == "onnxruntime (cpu, no prepacking)"

    folder = save_tiny_model("llama", tmp_path / "folder")
    refused = runner.invoke(cli, ["eval", str(folder), "--data", str(text), "--seq-len", "16", "--low-memory"])
    assert refused.exit_code == 2 and "--low-memory" in refused.output and "hint: drop --low-memory" in refused.output
    assert "Traceback" not in refused.output


def test_cli_points_a_big_export_at_low_memory(tmp_path, monkeypatch):
    """Above the 2 GiB protobuf limit of float32 weights the ordinary export holds the model and
    its graph; the CLI says so and names --low-memory (here the limit is lowered to a tiny model's size)."""
    from cwca_export.exporter import postprocess

    folder = save_tiny_model("llama", tmp_path / "tiny")
    monkeypatch.setattr(postprocess, "PROTOBUF_LIMIT", 1000)
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--out", str(tmp_path / "a"),
                                      *COMMON])
    assert result.exit_code == 0, result.output
    assert "--low-memory holds a fraction of one copy" in result.output
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--low-memory",
                                      "--out", str(tmp_path / "b"), *COMMON])
    assert result.exit_code == 0, result.output
    assert "holds a fraction" not in result.output and "saves memory only" not in result.output
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--low-memory", "--quantize", "int8",
                                      "--out", str(tmp_path / "c"), *COMMON])
    assert result.exit_code == 0, result.output
    assert "note" not in result.output  # the quantizer streams too (tests/test_streamed_quantize.py)
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--low-memory", "--dtype", "float16",
                                      "--out", str(tmp_path / "d"), *COMMON])
    assert result.exit_code == 0, result.output
    assert "note" not in result.output  # the float16 converter streams too (tests/test_streamed_fp16.py)
    # ONNX Runtime's optimiser without prepacking reads the weights as file pages (550M: BENCHMARKS.md)
    result = CliRunner().invoke(cli, ["export", str(folder), "--backend", "onnx", "--low-memory", "--optimize", "basic",
                                      "--out", str(tmp_path / "e"), *COMMON])
    assert result.exit_code == 0, result.output
    assert "note" not in result.output


def test_eval_low_memory_of_a_float16_artifact_casts_per_forward(tmp_path):
    """A float16 artifact with external data: the session without prepacking keeps its weights
    float16 (casting each per forward); the perplexity is the torch model's within float16 error."""
    model = tiny_model("llama", hidden_size=64, intermediate_size=256, num_hidden_layers=2)
    reference = copy.deepcopy(model)
    artifact = cwca_export.export(model, None, tmp_path / "fp16", backend="onnx", tokenizer=tiny_tokenizer(),
                                  external_data_threshold=1024, budget=Budget(prompt_len=8, context=24, dtype="fp16"),
                                  runs=1, warmup=0)
    text = tmp_path / "heldout.txt"
    text.write_text("the quick brown fox jumps over the lazy dog and then the dog sleeps. " * 20)
    folder = tmp_path / "torch"
    reference.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    runner = CliRunner()
    common = ["--data", str(text), "--seq-len", "16", "--max-tokens", "64", "--json"]
    lean = runner.invoke(cli, ["eval", str(artifact.path), *common, "--low-memory"])
    torch_run = runner.invoke(cli, ["eval", str(folder), *common])
    assert lean.exit_code == 0 and torch_run.exit_code == 0, lean.output + torch_run.output
    a, b = json.loads(lean.output), json.loads(torch_run.output)
    assert a["runtime"] == "onnxruntime (cpu, no prepacking, float16 weights cast per forward)"
    assert a["tokens"] == b["tokens"] and math.isclose(a["perplexity"], b["perplexity"], rel_tol=1e-2)
