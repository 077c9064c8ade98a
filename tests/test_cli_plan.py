"""`cwca-export plan` and `inspect`, through click's runner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from cwca_export.cli import cli
from cwca_export.planning.plan import Plan
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


def test_band_rule_honours_per_block_bounds(tmp_path):
    """Issue 13: `--rule band --bounds 0:0.3` ignored the bounds (block 0 got 0.58)."""
    s = LayerScores("owl", zeta2=[1.0, 2.0, 3.0], n_params=[10, 10, 10],
                    block_names=[f"model.layers.{i}" for i in range(3)])
    scores = s.save(tmp_path / "owl.json")
    out = tmp_path / "plan.json"
    r = _invoke("plan", scores, "--sparsity", 0.5, "--rule", "band", "--band", 0.08,
                "--bounds", "0:0.3", "--out", out)
    assert r.exit_code == 0, r.output
    plan = Plan.load(out)
    # block 0 has the lowest score, so the map gives it S + band = 0.58 unless capped;
    # capped at 0.3 it leaves 0.2 * 10 weights to the others, which shift by one offset:
    # 0.5 + 0.08 * (1 - 2 u_k) + c with u = (0, .5, 1) and (0.5 + c) + (0.42 + c) = 1.2
    assert plan.x[0] == pytest.approx(0.3)
    assert plan.hi[0] == 0.3
    assert plan.x[1] == pytest.approx(0.64, abs=1e-9) and plan.x[2] == pytest.approx(0.56, abs=1e-9)
    assert np.mean(plan.x) == pytest.approx(0.5, abs=1e-12)


def test_band_rule_infeasible_bounds_is_one_line(tmp_path):
    s = LayerScores("owl", zeta2=[1.0, 2.0], n_params=[10, 10], block_names=["a.0", "a.1"])
    scores = s.save(tmp_path / "owl.json")
    r = CliRunner().invoke(cli, ["plan", str(scores), "--sparsity", "0.5", "--rule", "band", "--band", "0.1",
                                 "--bounds", "0-1:0.3", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 1
    assert "--bounds" in r.output and r.output.strip().count("\n") == 0


def test_inspect_compressed_folder_reports_its_own_shapes(tmp_path):
    """Issue 13: inspect on a compressed folder reported the dense per-block weight counts."""
    from helpers import factorise, shrink_mlp, tiny_model

    from cwca_export.compression.saving import save_compressed

    model = tiny_model("llama")  # hidden 32, MLP 64, 4 query / 2 KV heads of 8
    shrink_mlp(model, 0, 16)
    factorise(model, "model.layers.1.self_attn.q_proj", 4)
    folder = save_compressed(model, tmp_path / "narrow")
    r = _invoke("inspect", folder, "--json")
    info = json.loads(r.output)
    attention = 2 * 32 * 32 + 2 * 16 * 32  # q, o + k, v
    dense = attention + 3 * 64 * 32
    assert info["block_params"] == [attention + 3 * 16 * 32, dense - 32 * 32 + 2 * 4 * 32]
