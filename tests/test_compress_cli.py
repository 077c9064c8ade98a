"""``cwca-export compress`` on saved model folders: exit codes, outputs, atomic folders."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from compress_plans import make_plan
from helpers import sample_text, save_tiny_model, tiny_model

import cwca_export
from cwca_export.cli import cli
from cwca_export.loading import load_model

DATA = ["--samples", "4", "--seq-len", "32"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("compress_cli")
    model_dir = save_tiny_model("llama", root / "llama")
    model, _ = load_model(model_dir)
    make_plan(model, "prune", [0.3, 0.6]).save(root / "prune.json")
    make_plan(model, "allocate", [1, 2]).save(root / "ranks.json")
    make_plan(tiny_model("llama", num_hidden_layers=3), "prune", [0.1, 0.2, 0.3]).save(
        root / "other.json"
    )
    (root / "calib.txt").write_text(sample_text())
    return root


def _run(*args):
    return CliRunner().invoke(cli, ["compress", *map(str, args)])


@pytest.mark.parametrize(
    ("method", "plan", "extra", "check"),
    [
        (
            "magnitude",
            "prune",
            [],
            lambda m: (m.model.layers[1].mlp.up_proj.weight == 0).float().mean() > 0.55,
        ),
        (
            "wanda",
            "prune",
            ["--data", "calib.txt", *DATA],
            lambda m: (m.model.layers[0].self_attn.q_proj.weight == 0).float().mean() > 0.25,
        ),
        (
            "sparsegpt",
            "prune",
            ["--nm", "2:4", "--data", "calib.txt", *DATA],
            lambda m: (m.model.layers[0].mlp.down_proj.weight == 0).float().mean() == 0.5,
        ),
        (
            "width",
            "prune",
            ["--heads", "--data", "calib.txt", *DATA],
            lambda m: m.model.layers[1].mlp.up_proj.out_features == 24,
        ),
        (
            "lowrank",
            "ranks",
            ["--rank-step", "4"],
            lambda m: m.model.layers[1].mlp.up_proj[0].out_features == 8,
        ),
        (
            "asvd",
            "ranks",
            ["--data", "calib.txt", *DATA],
            lambda m: m.model.layers[0].mlp.up_proj[0].out_features == 8,
        ),
    ],
)
def test_every_method_runs_on_a_saved_folder(folder, tmp_path, method, plan, extra, check):
    out = tmp_path / method
    extra = [str(folder / e) if e == "calib.txt" else e for e in extra]
    result = _run(
        folder / "llama",
        "--plan",
        folder / f"{plan}.json",
        "--method",
        method,
        "--out",
        out,
        *extra,
    )
    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[-1].endswith(f"wrote {out.absolute()}")
    assert "model.layers.1" in result.output
    model = cwca_export.load_compressed(out)
    assert check(model)
    assert (out / "tokenizer.json").is_file()


def test_json_report_and_a_second_step_on_the_compressed_folder(folder, tmp_path):
    narrow = tmp_path / "narrow"
    result = _run(
        folder / "llama",
        "--plan",
        folder / "prune.json",
        "--method",
        "width",
        "--out",
        narrow,
        "--data",
        folder / "calib.txt",
        *DATA,
        "--multiple",
        "16",
        "--json",
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert [b["intermediate_size"] for b in report["blocks"]] == [[64, 48], [64, 32]]
    model = cwca_export.load_compressed(narrow)
    make_plan(model, "allocate", [1, 1]).save(tmp_path / "ranks.json")
    result = _run(
        narrow, "--plan", tmp_path / "ranks.json", "--method", "lowrank", "--out", tmp_path / "both"
    )
    assert result.exit_code == 0, result.output
    both = cwca_export.load_compressed(tmp_path / "both")
    assert both.model.layers[1].mlp.down_proj[0].in_features == 32
    assert [s["method"] for s in both.config.cwca_compression["steps"]] == ["width", "lowrank"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--plan", "other.json", "--method", "magnitude"],
            "plan has 3 blocks but the model has 2",
        ),
        (["--plan", "prune.json", "--method", "wanda"], "needs calibration data"),
        (["--plan", "prune.json", "--method", "lowrank"], "allocation plan"),
        (
            ["--plan", "prune.json", "--method", "width", "--nm", "2:4"],
            "does not take option(s) ['nm']",
        ),
        (["--plan", "missing.json", "--method", "magnitude"], "no such file"),
    ],
)
def test_errors_are_one_line_and_write_nothing(folder, tmp_path, args, message):
    args = [str(folder / a) if a.endswith(".json") else a for a in args]
    out = tmp_path / "out"
    result = _run(folder / "llama", *args, "--out", out)
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and message in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_an_existing_output_needs_overwrite(folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    result = _run(
        folder / "llama", "--plan", folder / "prune.json", "--method", "magnitude", "--out", out
    )
    assert result.exit_code == 1 and "already exists; hint: pass --overwrite" in result.output  # as export
    result = _run(
        folder / "llama",
        "--plan",
        folder / "prune.json",
        "--method",
        "magnitude",
        "--out",
        out,
        "--overwrite",
    )
    assert result.exit_code == 0, result.output
    assert (out / "model.safetensors").is_file()


def test_console_entry_point_in_a_subprocess(folder, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cwca_export",
            "compress",
            str(folder / "llama"),
            "--plan",
            str(folder / "prune.json"),
            "--method",
            "magnitude",
            "--nm",
            "4:8",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "sparsity 0.5000 (4:8)" in proc.stdout
    assert (out / "config.json").is_file()
