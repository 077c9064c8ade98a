"""``cwca-export score`` on saved tiny model folders, in one process and under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner
from helpers import FAMILIES, sample_text, save_tiny_model

from cwca_export.cli import cli
from cwca_export.scores import LayerScores


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "calib.txt"
    path.write_text(sample_text(), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


def invoke(*args):
    return CliRunner().invoke(cli, ["score", *map(str, args)])


@pytest.mark.parametrize("family", FAMILIES)
def test_score_writes_scores_json_for_every_family(family, folders, calib, tmp_path):
    out = tmp_path / "scores.json"
    result = invoke(folders[family], "--data", calib, "--samples", 4, "--seq-len", 24, "--out", out, "--no-progress")
    assert result.exit_code == 0, result.output
    assert f"wrote {out}" in result.output and "zeta2*N/n_k" in result.output
    scores = LayerScores.load(out)
    assert scores.method == "fisher" and scores.num_blocks == 2
    assert scores.samples == 4 and scores.tokens == 96 and scores.settings["seq_len"] == 24
    assert scores.model["name_or_path"] == str(folders[family]) and scores.wall_time_s is not None
    assert {"grad_sq_norm", "fisher_trace", "zeta2_noise_ratio", "zeta2_debiased"} <= set(scores.stats)
    assert scores.versions["transformers"].startswith("4.")
    body = json.loads(out.read_text())
    assert body["q"] == pytest.approx(list(scores.qualities()))


def test_batched_fisher_and_a_saved_dataset_as_data(folders, calib, tmp_path):
    """--batch-size 3 on fisher gives batch size 1's scores; a datasets folder reads like the text."""
    datasets = pytest.importorskip("datasets")
    docs = sample_text().split("\n\n")
    folder = tmp_path / "ds"
    datasets.Dataset.from_dict({"body": docs}).save_to_disk(str(folder))
    jsonl = tmp_path / "c.jsonl"
    jsonl.write_text("".join(json.dumps({"body": d}) + "\n" for d in docs), encoding="utf-8")
    runs = {}
    for name, data, batch in (("jsonl", jsonl, 1), ("dataset", folder, 3)):
        out = tmp_path / f"{name}.json"
        result = invoke(folders["gpt2"], "--data", data, "--text-field", "body", "--batch-size", batch,
                        "--samples", 5, "--seq-len", 24, "--out", out, "--no-progress")
        assert result.exit_code == 0, result.output
        runs[name] = LayerScores.load(out)
    assert runs["dataset"].data_hash == runs["jsonl"].data_hash
    assert runs["dataset"].settings["batch_size"] == 3
    assert runs["dataset"].zeta2 == pytest.approx(runs["jsonl"].zeta2, rel=1e-5)


def test_json_output_jsonl_text_field_and_method(folders, tmp_path):
    data = tmp_path / "c.jsonl"
    data.write_text("".join(json.dumps({"body": p}) + "\n" for p in sample_text().split("\n\n")), encoding="utf-8")
    out = tmp_path / "kfac.json"
    result = invoke(folders["llama"], "--data", data, "--text-field", "body", "--estimator", "kfac", "--batch-size", 2,
                    "--samples", 4, "--seq-len", 24, "--out", out, "--json", "--no-progress")
    assert result.exit_code == 0, result.output
    printed = json.loads(result.output)
    assert printed["method"] == "kfac" and printed["settings"]["batch_size"] == 2
    assert printed["zeta2"] == LayerScores.load(out).zeta2


def test_errors_are_one_line(folders, calib, tmp_path):
    missing = invoke(tmp_path / "nope", "--data", calib)
    assert missing.exit_code == 1
    assert missing.output.strip().splitlines() == [
        f"Error: {tmp_path / 'nope'}: not a local model folder (it does not exist; the tool never fetches"
        " from the Hub); see `cwca-export score --help`"
    ]
    short = invoke(folders["gpt2"], "--data", calib, "--samples", 500, "--seq-len", 64, "--out", tmp_path / "s.json")
    assert short.exit_code == 1 and len(short.output.strip().splitlines()) == 1
    assert f"Error: {calib}: calibration data has " in short.output
    assert "500 samples x 64 tokens need 32000" in short.output
    fewer = invoke(folders["gpt2"], "--data", calib, "--samples", 500, "--seq-len", 64, "--allow-fewer",
                   "--out", tmp_path / "s.json", "--no-progress")
    assert fewer.exit_code == 0, fewer.output
    assert 0 < LayerScores.load(tmp_path / "s.json").samples < 500


def test_two_processes_under_torchrun_match_one_process(folders, calib, tmp_path):
    common = [str(folders["llama"]), "--data", str(calib), "--samples", "6", "--seq-len", "24",
              "--no-wall-time", "--no-progress", "--device", "cpu"]
    one = invoke(*common, "--out", tmp_path / "one.json")
    assert one.exit_code == 0, one.output
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
         "-m", "cwca_export", "score", *common, "--out", str(tmp_path / "two.json")],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert two.returncode == 0, two.stderr[-2000:]
    a, b = LayerScores.load(tmp_path / "one.json"), LayerScores.load(tmp_path / "two.json")
    assert (a.settings["processes"], b.settings["processes"]) == (1, 2)
    assert b.samples == a.samples and b.tokens == a.tokens and b.data_hash == a.data_hash
    assert b.zeta2 == pytest.approx(a.zeta2, rel=1e-5)
    for name, values in a.stats.items():
        assert b.stats[name] == pytest.approx(values, rel=1e-5, abs=1e-12), name
