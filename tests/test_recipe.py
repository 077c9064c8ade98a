"""`cwca-export run RECIPE`: strict loading, the whole pipeline on a tiny model, atomic output."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model

from cwca_export.cli import cli
from cwca_export.planning.plan import Plan
from cwca_export.recipe import Recipe


@pytest.fixture(autouse=True)
def _cache_in_tmp(tmp_path, monkeypatch):
    """`run` caches scores; keep the cache out of the home folder."""
    monkeypatch.setenv("CWCA_CACHE_DIR", str(tmp_path / "cache"))


@pytest.fixture()
def setup(tmp_path):
    save_tiny_model("llama", tmp_path / "model", num_hidden_layers=3)
    (tmp_path / "calib.txt").write_text(sample_text() * 4)
    return tmp_path


def _write(folder, body):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


BASE = {
    "model": "model", "data": "calib.txt", "samples": 4, "seq_len": 16,
    "score": {"method": "gradnorm"},
    "plan": {"program": "prune", "sparsity": 0.5},
    "compress": {"method": "magnitude"},
}


def test_run_carries_out_every_step_and_writes_a_complete_folder(setup):
    body = {**BASE, "export": {"backend": "onnx"}, "eval": {"data": "calib.txt", "seq_len": 16}}
    res = CliRunner().invoke(cli, ["run", str(_write(setup, body)), "--out", str(setup / "out"), "--json"])
    assert res.exit_code == 0, res.output
    out = setup / "out"
    for name in ("scores.json", "plan.json", "compressed", "artifact", "run.json", "recipe.yaml", "report.html"):
        assert (out / name).exists(), name
    plan = Plan.load(out / "plan.json")
    assert plan.global_sparsity == pytest.approx(0.5)
    summary = json.loads((out / "run.json").read_text())
    assert summary["eval"]["runtime"].startswith("onnxruntime") and summary["eval"]["perplexity"] > 1
    manifest = json.loads((out / "artifact" / "cwca_manifest.json").read_text())
    assert [b["rho"] for b in manifest["plan"]["blocks"]] == pytest.approx(plan.x)
    # the run folder records every file it holds; rebuilding its report keeps the record true
    assert (out / "cwca_files.json").is_file() and (out / "compressed" / "cwca_files.json").is_file()
    for args in (["inspect", "--verify", str(out)], ["report", str(out)], ["inspect", "--verify", str(out)]):
        res = CliRunner().invoke(cli, args)
        assert res.exit_code == 0, res.output


def test_refined_damage_plan_through_a_recipe(setup):
    body = {**BASE, "score": {"method": "damage", "options": {"pruner": "magnitude"}},
            "plan": {"program": "prune", "sparsity": 0.5, "refine": True, "max_evals": 12}}
    res = CliRunner().invoke(cli, ["run", str(_write(setup, body)), "--out", str(setup / "out")])
    assert res.exit_code == 0, res.output
    plan = Plan.load(setup / "out" / "plan.json")
    assert plan.parameters["refinement"]["forwards"] <= 12


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"colour": "blue"}, "unknown key"),
        ({"plan": {"program": "prune", "sparsity": 0.5, "kapa": 1}}, "unknown key"),
        ({"plan": {"program": "prune"}}, "takes sparsity"),
        ({"plan": {"program": "allocate", "sparsity": 0.5}}, "takes budget_fraction"),
        ({"plan": {"program": "shrink", "sparsity": 0.5}}, "'prune' or 'allocate'"),
        ({"data": "missing.txt"}, "does not exist"),
        ({"compress": "wanda"}, "must be a mapping"),
    ],
)
def test_bad_recipes_are_one_line_errors_and_write_nothing(setup, change, message):
    res = CliRunner().invoke(cli, ["run", str(_write(setup, {**BASE, **change})), "--out", str(setup / "out")])
    assert res.exit_code == 1
    assert message in res.output and len(res.output.strip().splitlines()) == 1
    assert not (setup / "out").exists()


def test_missing_key_and_failed_step_leave_no_folder(setup):
    body = {k: v for k, v in BASE.items() if k != "plan"}
    with pytest.raises(ValueError, match="plan: missing required key"):
        Recipe.from_dict(body, base=setup)
    body = {**BASE, "export": {"backend": "onnx", "max_memory": "1KiB"}}  # unreachable budget
    res = CliRunner().invoke(cli, ["run", str(_write(setup, body)), "--out", str(setup / "out")])
    assert res.exit_code == 1
    assert not (setup / "out").exists()
    assert not any(p.name.startswith(".out.") for p in setup.iterdir())  # no staging left behind


def test_shipped_example_recipes_parse():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[1] / "recipes" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        recipe = Recipe.load(path)
        assert Path(recipe.model).is_dir() and Path(recipe.data).is_file()


def test_a_recipe_budget_search_prices_on_the_recipe_data_with_every_limit(setup, monkeypatch):
    """A recipe's export step under a budget handed the search no calibration, so it priced its
    candidates on the shipped Python documentation text, not the recipe's `data`; and the recipe
    had no `max_disk` / `max_prefill_ms`. Now the search gets the recipe's calibration ids and the
    budget every limit."""
    import torch
    from transformers import AutoTokenizer

    from cwca_export.data import calibration_data
    from cwca_export.exporter import api

    seen = {}

    def fake_export(model, plan, out, **kwargs):
        seen.update(kwargs)
        raise RuntimeError("stop here")

    monkeypatch.setattr(api, "export", fake_export)
    body = {**BASE, "export": {"backend": "onnx", "max_disk": "2MiB", "max_prefill_ms": 50, "max_memory": 10**9,
                               "significance": 0.5}}
    res = CliRunner().invoke(cli, ["run", str(_write(setup, body)), "--out", str(setup / "out")])
    assert "stop here" in res.output, res.output
    budget = seen["budget"]
    assert (budget.max_disk, budget.max_prefill_ms, budget.max_memory) == (2 * 2**20, 50, 10**9)
    assert seen["search_options"] == {"significance": 0.5}
    tokenizer = AutoTokenizer.from_pretrained(setup / "model", local_files_only=True)
    expected = calibration_data(setup / "calib.txt", tokenizer, num_samples=4, seq_len=16, seed=0)
    assert torch.equal(getattr(seen["calibration"], "input_ids", seen["calibration"]), expected.input_ids)
    assert not (setup / "out").exists()
