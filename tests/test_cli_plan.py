"""`cwca-export plan` and `inspect`, through click's runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cwca_export.cli import cli
from cwca_export.plan import Plan
from cwca_export.scores import LayerScores


@pytest.fixture
def scores_file(tmp_path):
    s = LayerScores(
        "gradnorm",
        zeta2=[5.0, 1.0, 2.0, 0.5],
        n_params=[1000, 1000, 2000, 1000],
        block_names=[f"model.layers.{i}" for i in range(4)],
    )
    return s.save(tmp_path / "scores.json")


def _invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_prune_writes_plan_and_prints_table(scores_file, tmp_path):
    out = tmp_path / "plan.json"
    r = _invoke("plan", scores_file, "--sparsity", 0.5, "--bounds", "0:0.3", "--hi", 0.8, "--out", out)
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    n = np.array(plan.n_params)
    assert n @ np.array(plan.x) == pytest.approx(0.5 * n.sum(), rel=1e-12)
    assert plan.hi == [0.3, 0.8, 0.8, 0.8]
    lines = r.output.splitlines()
    assert lines[0].split() == ["#", "block", "n_k", "q_k", "rho", "bound"]
    assert len([ln for ln in lines if "model.layers." in ln]) == 4
    assert "global sparsity 0.500000 (target 0.5)" in r.output


def test_allocate_integer_units_within_budget(scores_file, tmp_path):
    out = tmp_path / "ranks.json"
    r = _invoke("plan", scores_file, "--program", "allocate", "--budget", 12, "--gamma", 30,
                "--beta", 1, "--hi", 8, "--out", out, "--json")
    assert r.exit_code == 0, r.output
    printed = json.loads(r.output)
    plan = Plan.load(out)
    assert printed == plan.to_dict()
    assert all(float(x).is_integer() and 0 <= x <= 8 for x in plan.x)
    assert sum(plan.x) <= 12


def test_infeasible_target_is_one_line_and_writes_nothing(scores_file, tmp_path):
    out = tmp_path / "plan.json"
    r = CliRunner().invoke(cli, ["plan", str(scores_file), "--sparsity", "0.9", "--hi", "0.5",
                                 "--out", str(out)])
    assert r.exit_code == 1
    assert r.output.strip().count("\n") == 0
    assert "reachable range is [0, 0.5]" in r.output
    assert not out.exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--program", "prune"], "needs --sparsity"),
        (["--program", "allocate"], "needs --budget"),
        (["--sparsity", "0.5", "--bounds", "zero:0.3"], "BLOCKS:HI"),
        (["--sparsity", "0.5", "--bounds", "9:0.3"], "block 9 does not exist"),
    ],
)
def test_bad_arguments_get_a_hint(scores_file, tmp_path, args, message):
    r = CliRunner().invoke(cli, ["plan", str(scores_file), *args, "--out", str(tmp_path / "p.json")])
    assert r.exit_code != 0
    assert message in r.output


def test_missing_scores_file_is_an_error(tmp_path):
    r = CliRunner().invoke(cli, ["plan", str(tmp_path / "nope.json"), "--sparsity", "0.5"])
    assert r.exit_code == 1
    assert "no such file" in r.output


def test_inspect_plan(scores_file, tmp_path):
    out = tmp_path / "plan.json"
    _invoke("plan", scores_file, "--sparsity", 0.4, "--out", out)
    r = _invoke("inspect", out, "--json")
    info = json.loads(r.output)
    assert info["type"] == "Plan" and info["global_sparsity"] == pytest.approx(0.4)


def test_inspect_model_folder_reads_no_weights(tmp_path, monkeypatch):
    import safetensors.torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
                         num_key_value_heads=1, vocab_size=64)
    config.save_pretrained(tmp_path)
    r = _invoke("inspect", tmp_path, "--json")  # a config alone is not a model: no guessing
    assert r.exit_code != 0 and "no weights" in r.output
    LlamaForCausalLM(config).save_pretrained(tmp_path)

    def no_reading(*args, **kwargs):
        raise AssertionError("inspect read the weights")

    monkeypatch.setattr(safetensors.torch, "load_file", no_reading)
    r = _invoke("inspect", tmp_path, "--json")
    info = json.loads(r.output)
    # per block: q 16x16, k/v 8x16, o 16x16, gate/up 32x16, down 16x32
    assert info["blocks"] == 3
    assert info["block_params"] == [2 * 256 + 2 * 128 + 3 * 512] * 3
