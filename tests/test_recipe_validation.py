"""Recipes are typed and every name in them is checked before any step runs; `run --dry-run`,
`--set`, the score cache and the shipped JSON Schema."""

from __future__ import annotations

import json

import pytest
import yaml
from click.testing import CliRunner
from helpers import sample_text, save_tiny_model

import cwca_export.scoring
from cwca_export.cli import cli
from cwca_export.planning.plan import Plan
from cwca_export.recipe import SCHEMA_PATH, Recipe, json_schema


@pytest.fixture()
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("CWCA_CACHE_DIR", str(tmp_path / "cache"))
    save_tiny_model("llama", tmp_path / "model", num_hidden_layers=3)
    (tmp_path / "calib.txt").write_text(sample_text() * 4)
    return tmp_path


@pytest.fixture()
def score_calls(monkeypatch):
    """Count calls of the scorer (and fail the test if a bad recipe reaches it)."""
    calls = []
    real = cwca_export.scoring.score

    def counting(*args, **kwargs):
        calls.append(kwargs.get("method"))
        return real(*args, **kwargs)

    monkeypatch.setattr(cwca_export.scoring, "score", counting)
    return calls


BASE = {
    "model": "model", "data": "calib.txt", "samples": 4, "seq_len": 16,
    "score": {"method": "gradnorm"},
    "plan": {"program": "prune", "sparsity": 0.5},
    "compress": {"method": "magnitude"},
}


def _write(folder, body, name="recipe.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(body))
    return path


def _run(*args):
    return CliRunner().invoke(cli, ["run", *[str(a) for a in args]])


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        # wrong types: strict, with the key path, what is allowed and a --set fix
        ({"plan": {"program": "prune", "sparsity": "half"}},
         ["plan.sparsity: Input should be a valid number, got 'half' (str)", "fix: --set plan.sparsity=0.5"]),
        ({"plan": {"program": "prune", "sparsity": [0.5]}}, ["plan.sparsity", "valid number", "(list)"]),
        ({"samples": True}, ["samples: Input should be a valid integer, got True (bool)", "--set samples=32"]),
        ({"plan": {"program": "prune", "sparsity": 0.5, "refine": "yes"}}, ["plan.refine", "valid boolean"]),
        ({"plan": {"program": "prune", "sparsity": 1.5}}, ["plan.sparsity", "less than or equal to 1"]),
        ({"plan": {"program": "prune", "sparsity": 0.5, "rule": "owl"}},
         ["plan.rule", "'auto', 'cwca', 'damage' or 'band'"]),
        ({"export": {"quantize": "int3"}}, ["export.quantize", "'int8' or 'int4'", "--set export.quantize=int8"]),
        ({"export": {"max_memory": "lots"}}, ["export.max_memory"]),
        ({"score": {"method": "gradnorm", "debias": 1}}, ["score.debias", "valid boolean"]),
        ({"score": {"methd": "gradnorm"}}, ["score.methd: unknown key; allowed here: method, options, debias"]),
        # names: registries, files, profiles, options
        ({"score": {"method": "fishr"}}, ["score.method: 'fishr' is not a scoring method", "fisher",
                                          "--set score.method="]),
        ({"score": {"method": "damage", "options": {"prunr": "wanda"}}},
         ["score.options: unknown option(s) prunr; allowed: at, max_cache, points, pruner"]),
        ({"compress": {"method": "wandaa"}}, ["compress.method: 'wandaa' is not a compression method", "sparsegpt"]),
        ({"compress": {"method": "asvd"}},
         ["compress.method: 'asvd' applies allocate plans", "--set compress.method="]),
        ({"compress": {"method": "magnitude", "options": {"n_m": "2:4"}}},
         ["compress.options: unknown option(s) n_m"]),
        ({"plan": {"program": "allocate", "budget_fraction": 0.6}, "compress": {"method": "lowrank",
                                                                              "options": {"rank_step": 16}}},
         ["compress.options.rank_step: 16", "plan.rank_step 8", "--set compress.options.rank_step=8",
          "--set plan.rank_step=16"]),
        ({"export": {"backend": "tflite"}}, ["export.backend: 'tflite' is not registered", "onnx, optimum"]),
        ({"export": {"hardware": "pdp-11"}}, ["export.hardware: no profile 'pdp-11'", "jetson-orin-8gb"]),
        ({"model": "no-such-model"}, ["model:", "not a local model folder", "--set model="]),
        ({"eval": {"data": "nope.txt"}}, ["eval.data:", "is not a file"]),
    ],
)
def test_bad_recipes_fail_before_any_step(setup, score_calls, change, expected):
    res = _run(_write(setup, {**BASE, **change}), "--out", setup / "out")
    assert res.exit_code == 1, res.output
    assert len(res.output.strip().splitlines()) == 1, res.output
    for text in expected:
        assert text in res.output, res.output
    assert score_calls == [] and not (setup / "out").exists()


def test_dry_run_prints_the_validated_steps_and_runs_nothing(setup, score_calls):
    body = {**BASE, "export": {"backend": "onnx", "quantize": "int8"}}
    res = _run(_write(setup, body), "--dry-run", "--set", "plan.sparsity=0.7", "--set", "export.quantize=int4")
    assert res.exit_code == 0, res.output
    assert "[plan] prune, sparsity 0.7" in res.output and "[export] onnx, int4" in res.output
    assert "[score] gradnorm" in res.output and "[compress] magnitude" in res.output
    assert score_calls == [] and not (setup / "cache").exists()
    res = _run(_write(setup, BASE), "--dry-run", "--json", "--set", "plan={program: allocate, budget_fraction: 0.6}",
               "--set", "compress.method=asvd")
    assert res.exit_code == 0, res.output
    dumped = json.loads(res.output)
    assert dumped["plan"]["program"] == "allocate" and dumped["plan"]["budget_fraction"] == 0.6
    assert dumped["model"] == str(setup / "model")


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("plan.sparsity", "expected KEY.PATH=VALUE"),
        ("plan.sparsity=[", "not valid YAML"),
        ("model.path=x", "model is a str, not a mapping"),
        ("plan.sparsity=true", "plan.sparsity: Input should be a valid number, got True (bool)"),
    ],
)
def test_bad_overrides_are_one_line(setup, override, message):
    res = _run(_write(setup, BASE), "--dry-run", "--set", override)
    assert res.exit_code == 1 and message in res.output and len(res.output.strip().splitlines()) == 1


def test_out_is_required_without_dry_run(setup):
    res = _run(_write(setup, BASE))
    assert res.exit_code == 2 and "--out" in res.output


def test_scores_are_cached_across_plans(setup, score_calls):
    recipe = _write(setup, BASE)
    cache = setup / "my-cache"
    first = _run(recipe, "--out", setup / "a", "--cache-dir", cache)
    assert first.exit_code == 0, first.output
    assert score_calls == ["gradnorm"]
    # a new sparsity only re-plans: the scorer is not called, the scores are the same
    second = _run(recipe, "--out", setup / "b", "--cache-dir", cache, "--set", "plan.sparsity=0.3")
    assert second.exit_code == 0, second.output
    assert score_calls == ["gradnorm"] and "[score] cached" in second.output
    assert (setup / "a" / "scores.json").read_bytes() == (setup / "b" / "scores.json").read_bytes()
    assert Plan.load(setup / "b" / "plan.json").global_sparsity == pytest.approx(0.3)
    # the same recipe again gives the same plan as the first run, from cached scores
    third = _run(recipe, "--out", setup / "c", "--cache-dir", cache)
    assert third.exit_code == 0 and score_calls == ["gradnorm"]
    assert Plan.load(setup / "c" / "plan.json").x == Plan.load(setup / "a" / "plan.json").x
    # other scorer settings, or --no-cache, score again
    assert _run(recipe, "--out", setup / "d", "--cache-dir", cache, "--set", "samples=3").exit_code == 0
    assert len(score_calls) == 2
    assert _run(recipe, "--out", setup / "e", "--cache-dir", cache, "--no-cache").exit_code == 0
    assert len(score_calls) == 3
    assert len(list((cache / "scores").glob("*.json"))) == 2


def test_shipped_schema_is_generated_from_the_models():
    shipped = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert shipped == json_schema(), (
        "recipe.schema.json is stale; regenerate it:"
        " python -c 'from cwca_export.recipe import write_schema; write_schema()'"
    )
    assert set(shipped["required"]) == {"model", "data", "plan", "compress"}
    assert shipped["additionalProperties"] is False
    assert all(d.get("additionalProperties") is False for d in shipped["$defs"].values())
    assert "source" not in shipped["properties"]


def test_shipped_schema_is_in_the_package_data():
    from pathlib import Path

    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert "schemas/*.json" in pyproject["tool"]["setuptools"]["package-data"]["cwca_export"]


def test_recipe_models_reject_bools_for_numbers_in_python_too(setup):
    with pytest.raises(ValueError, match=r"plan\.hi: Input should be a valid number, got True"):
        Recipe.from_dict({**BASE, "plan": {"program": "prune", "sparsity": 0.5, "hi": True}}, base=setup)
