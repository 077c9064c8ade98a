"""The precision-damage table measured once, data-parallel, and handed to export as a file.

References are independent of the path under test: the one-process table for the two-process
one, the budget search's own in-process measurement (and its chosen candidate) for the table
read from a file, the uncapped measurement for the capped one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model, tiny_model

from cwca_export.cli import cli
from cwca_export.planning.precision import measure_precision_damage

FORMATS = "fp32,int8,int4-b32"
CALIB = ["--samples", "16", "--seq-len", "16"]


def _table(path):
    return json.loads(path.read_text(encoding="utf-8"))


def _close(a, b, tol=1e-6):
    assert len(a) == len(b)
    for ra, rb in zip(a, b, strict=True):
        assert [v is None for v in ra] == [v is None for v in rb]
        assert [v for v in ra if v is not None] == pytest.approx([v for v in rb if v is not None], rel=0, abs=tol)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny model folder, its calibration text and its table measured in one process (clip rounding)."""
    root = tmp_path_factory.mktemp("precdp")
    folder = save_tiny_model("llama", root / "llama", hidden_size=64, intermediate_size=256)
    calib = root / "calib.txt"
    calib.write_text(sample_text() * 4, encoding="utf-8")
    one = root / "one.json"
    result = CliRunner().invoke(cli, ["score", str(folder), "--estimator", "precision", "--formats", FORMATS,
                                      "--data", str(calib), *CALIB, "--no-progress",
                                      "--device", "cpu", "--out", str(one)])
    assert result.exit_code == 0, result.output
    return folder, calib, one


def test_capped_input_cache_gives_the_same_table():
    from cwca_export.planning.damage import block_input_bytes

    model = tiny_model("llama", num_hidden_layers=3)
    ids = torch.randint(0, model.config.vocab_size, (6, 12), generator=torch.Generator().manual_seed(1))
    full = measure_precision_damage(model, ids, FORMATS.split(","), batch_size=2)
    capped = measure_precision_damage(model, ids, FORMATS.split(","), batch_size=2,
                                      max_cache=block_input_bytes(model, ids))
    assert capped.base_loss == pytest.approx(full.base_loss, abs=1e-9)
    _close(capped.damage, full.damage)
    assert max(abs(v) for row in full.damage for v in row if v is not None) > 1e-4  # a table that can differ


def test_two_processes_under_torchrun_match_one_process(setup, tmp_path):
    folder, calib, one = setup
    two = tmp_path / "two.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cwca_export", "score", str(folder), "--estimator", "precision", "--formats", FORMATS,
         "--data", str(calib), *CALIB, "--no-progress", "--device", "cpu", "--out", str(two)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    a, b = _table(one), _table(two)
    assert (a["processes"], b["processes"]) == (1, 2)
    assert a["_type"] == b["_type"] == "PrecisionDamageTable"
    assert a["calibration"]["ids_sha256"] == b["calibration"]["ids_sha256"]
    assert b["table"]["settings"]["samples"] == a["table"]["settings"]["samples"] == 16  # all shares counted
    assert (a["rounding"], a["table"]["formats"]) == ("clip", FORMATS.split(","))
    assert b["table"]["base_loss"] == pytest.approx(a["table"]["base_loss"], rel=0, abs=1e-6)
    _close(b["table"]["damage"], a["table"]["damage"])
    assert max(abs(v) for row in a["table"]["damage"] for v in row if v is not None) > 1e-4


def _export(folder, calib, out, *extra):
    budget = ["--backend", "onnx", "--max-disk", "345000", "--prompt-len", "8", "--context", "24",
              "--runs", "3", "--warmup", "1"]
    return CliRunner().invoke(cli, ["export", str(folder), "--out", str(out), "--data", str(calib), *CALIB,
                                    *budget, *extra])


def test_table_from_the_file_gives_the_search_of_measuring_it_in_process(setup, tmp_path):
    folder, calib, one = setup
    measured = _export(folder, calib, tmp_path / "measured", "--formats", FORMATS)
    assert measured.exit_code == 0, measured.output
    reused = _export(folder, calib, tmp_path / "reused", "--precision-damage", str(one))
    assert reused.exit_code == 0, reused.output
    m = json.loads((tmp_path / "measured" / "cwca_manifest.json").read_text())["budget"]["search"]
    r = json.loads((tmp_path / "reused" / "cwca_manifest.json").read_text())["budget"]["search"]
    # the file's table is the search's own measurement (same ids, same clipping) ...
    assert r["precision_damage"]["formats"] == m["precision_damage"]["formats"] == FORMATS.split(",")
    _close(r["precision_damage"]["damage"], m["precision_damage"]["damage"])
    # ... so the search considers and chooses the same candidates
    assert r["chosen"]["formats"] and r["chosen"]["formats"] == m["chosen"]["formats"]
    assert (r["chosen"]["t"], r["chosen"]["storage"]) == (m["chosen"]["t"], m["chosen"]["storage"])
    assert [c["formats"] for c in r["candidates"]] == [c["formats"] for c in m["candidates"]]
    source = r["precision_damage"]["settings"]["source"]
    assert source["file"] == str(one.resolve()) and source["rounding"] == "clip"
    assert "source" not in m["precision_damage"]["settings"]


@pytest.mark.parametrize("extra, needle", [
    (["--rounding", "rtn"], "pass --rounding clip"),
    (["--formats", "fp32,int4-b16"], "pass --formats fp32,int8,int4-b32"),
    (["--samples", "12"], "--samples 16 --seq-len 16"),
    (["--precision-estimate", "fisher"], "drop --precision-estimate fisher"),
    (["--quantize", "int8"], "without --quantize"),
])
def test_export_refuses_a_table_measured_for_something_else(setup, tmp_path, extra, needle):
    folder, calib, one = setup
    result = _export(folder, calib, tmp_path / "o", "--precision-damage", str(one), *extra)
    _refused(result, needle)
    assert not (tmp_path / "o").exists()


def test_export_refuses_another_models_table_and_one_without_a_budget(setup, tmp_path):
    folder, calib, one = setup
    other = save_tiny_model("llama", tmp_path / "other", hidden_size=64, intermediate_size=256, seed=1)
    _refused(_export(other, calib, tmp_path / "o", "--precision-damage", str(one)), "measured on another model")
    plain = CliRunner().invoke(cli, ["export", str(folder), "--out", str(tmp_path / "o"),
                                     "--precision-damage", str(one)])
    _refused(plain, "add --max-memory")
    other_batch = _table(one)
    other_batch["calibration"]["batch_size"] = 4
    (tmp_path / "b4.json").write_text(json.dumps(other_batch))
    _refused(_export(folder, calib, tmp_path / "o", "--precision-damage", str(tmp_path / "b4.json")), "--batch-size 8")
    scores = tmp_path / "scores.json"
    scores.write_text(json.dumps({"_type": "LayerScores", "schema_version": 1}))
    _refused(_export(folder, calib, tmp_path / "o", "--precision-damage", str(scores)), "expected PrecisionDamageTable")


def test_score_keeps_the_precision_flags_to_the_precision_table(setup, tmp_path):
    folder, calib, _ = setup
    base = ["score", str(folder), "--data", str(calib), *CALIB, "--out", str(tmp_path / "s.json")]
    _refused(CliRunner().invoke(cli, [*base, "--formats", FORMATS]), "--estimator precision")
    _refused(CliRunner().invoke(cli, [*base, "--estimator", "precision", "--option", "points=0.5"]), "drop --option")
    _refused(CliRunner().invoke(cli, [*base, "--estimator", "precision", "--batch-size", "4"]), "drop --batch-size")


def _refused(result, needle):
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and needle in errors[0], result.output


def test_too_few_samples_for_the_processes_are_refused_before_any_process_waits():
    from cwca_export.data_parallel import Processes
    from cwca_export.planning.precision_table import measure_table

    model = tiny_model("llama")
    ids = torch.randint(0, model.config.vocab_size, (8, 12), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"--samples 8: 1 batch of 8 for 2 processes; pass --samples 16"):
        measure_table(model, ids, FORMATS, rounding="rtn", processes=Processes(rank=0, world=2))
