"""Flags that did nothing, or hints that named flags the user's verb lacks: one clear line each.

Each case was silent or misleading before: `export --levels` without a structure search,
`export --plan` without `--method`, `compress --rank-step` against a plan's recorded step, a
budget error inside `run` naming export's flags, and the short-calibration hint naming score's
`--allow-fewer` from every verb.
"""

from __future__ import annotations

import pytest
import yaml
from click.testing import CliRunner
from compress_plans import make_plan
from helpers import sample_text, save_tiny_model, tiny_model

from cwca_export.cli import cli


class Loaded(Exception):
    """Raised in place of loading the model: the verb's checks of its flags all passed."""


@pytest.fixture()
def folder(tmp_path):
    save_tiny_model("llama", tmp_path / "model")
    model = tiny_model("llama")
    make_plan(model, "prune", [0.3, 0.6]).save(tmp_path / "prune.json")
    make_plan(model, "allocate", [1, 2], rank_step=8).save(tmp_path / "ranks-8.json")
    make_plan(model, "allocate", [1, 2]).save(tmp_path / "ranks.json")  # no recorded step (plan --budget)
    (tmp_path / "calib.txt").write_text(sample_text() * 4)
    (tmp_path / "short.txt").write_text(sample_text()[:300])
    return tmp_path


@pytest.fixture()
def no_load(monkeypatch):
    from cwca_export import loading

    def load_model(*args, **kwargs):
        raise Loaded("the flags passed their checks")

    monkeypatch.setattr(loading, "load_model", load_model)


def _passed_checks(result) -> bool:
    """The verb got as far as the stand-in for loading (the CLI turns it into one error line)."""
    return result.exit_code == 1 and "Loaded: " in result.output


def _error(result, code: int, *, alone: bool = True) -> str:
    """The one ``Error:`` line of a failed command, its last line (``alone``: its only one)."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert [line for line in lines if "Error" in line] == lines[-1:], result.output
    assert lines[-1].startswith("Error: ") and (len(lines) == 1 or not alone), result.output
    return lines[-1]


# ------------------------------------------------------------------ export --levels


@pytest.mark.parametrize(("extra", "why"), [
    ([], "no --plan and no --method"),
    (["--plan", "{d}/prune.json", "--max-disk", "1MB"], "no --method"),
    (["--method", "width", "--max-disk", "1MB"], "no --plan"),
    (["--plan", "{d}/prune.json", "--method", "width"], "no limit"),
])
def test_export_levels_without_a_structure_search_is_refused(folder, no_load, extra, why):
    args = ["export", str(folder / "model"), "--out", str(folder / "o"), "--levels", "3"]
    line = _error(CliRunner().invoke(cli, args + [a.format(d=folder) for a in extra]), 2)
    assert "--levels" in line and "--plan and --method" in line and why in line and "drop --levels" in line
    assert not (folder / "o").exists()


def test_export_levels_with_a_structure_search_is_taken(folder, no_load):
    args = ["export", str(folder / "model"), "--out", str(folder / "o"), "--levels", "3",
            "--plan", str(folder / "prune.json"), "--method", "width", "--max-disk", "1MB"]
    result = CliRunner().invoke(cli, args)
    assert _passed_checks(result), result.output


# ------------------------------------------------------------------ export --plan without --method


def test_export_plan_without_method_says_it_is_recorded_not_applied(folder, monkeypatch):
    from cwca_export.exporter import api

    def export(model, plan, out, **kwargs):
        assert plan is not None  # recorded in the manifest either way
        raise Loaded(f"method {kwargs['method']}")

    monkeypatch.setattr(api, "export", export)
    args = ["export", str(folder / "model"), "--out", str(folder / "o"), "--plan", str(folder / "prune.json")]
    result = CliRunner().invoke(cli, args)
    assert _passed_checks(result), result.output
    notes = [line for line in result.stderr.splitlines() if "--plan" in line]
    assert len(notes) == 1, result.stderr
    assert str(folder / "prune.json") in notes[0] and "not applied" in notes[0] and "--method" in notes[0]
    quiet = CliRunner().invoke(cli, [*args, "--quiet"])
    assert _passed_checks(quiet) and "--plan" not in quiet.stderr, quiet.stderr
    # with --method the plan is applied: no note
    applied = CliRunner().invoke(cli, [*args, "--method", "width", "--data", str(folder / "calib.txt"),
                                       "--samples", "2", "--seq-len", "16"])
    assert _passed_checks(applied) and "not applied" not in applied.stderr, applied.output


# ------------------------------------------------------------------ compress --rank-step


def test_compress_rank_step_against_the_plans_recorded_step_is_refused(folder, no_load):
    plan = folder / "ranks-8.json"
    args = ["compress", str(folder / "model"), "--plan", str(plan), "--method", "lowrank", "--out", str(folder / "o")]
    line = _error(CliRunner().invoke(cli, [*args, "--rank-step", "16"]), 2)
    assert "--rank-step 16" in line and str(plan) in line and "rank_step 8" in line
    assert "drop --rank-step" in line and "re-plan" in line
    assert not (folder / "o").exists()
    # the same step, no step, or a plan that records none: taken
    for extra, plan_file in ([["--rank-step", "8"], plan], [[], plan], [["--rank-step", "16"], folder / "ranks.json"]):
        result = CliRunner().invoke(cli, ["compress", str(folder / "model"), "--plan", str(plan_file), "--method",
                                          "lowrank", "--out", str(folder / "o"), *extra])
        assert _passed_checks(result), (extra, result.output)


# ------------------------------------------------------------------ recipes (`run`)


BASE = {"model": "model", "data": "calib.txt", "samples": 4, "seq_len": 16, "score": {"method": "gradnorm"},
        "plan": {"program": "prune", "sparsity": 0.5}, "compress": {"method": "magnitude"}}


def _run(folder, **changes):
    (folder / "recipe.yaml").write_text(yaml.safe_dump({**BASE, **changes}))
    return CliRunner().invoke(cli, ["run", str(folder / "recipe.yaml"), "--out", str(folder / "out")])


def test_a_recipe_rank_step_agrees_with_its_plans(folder, monkeypatch):
    """A recipe's compress.options.rank_step overrode plan.rank_step as --rank-step did a plan's."""
    monkeypatch.setenv("CWCA_CACHE_DIR", str(folder / "cache"))
    ranks = {"plan": {"program": "allocate", "budget_fraction": 0.6, "rank_step": 4}}
    for options, refused in (({"rank_step": 8}, True), ({"rank_step": 4}, False), ({}, False)):
        (folder / "recipe.yaml").write_text(yaml.safe_dump(
            {**BASE, **ranks, "compress": {"method": "lowrank", "options": options}}))
        result = CliRunner().invoke(cli, ["run", str(folder / "recipe.yaml"), "--dry-run"])
        if refused:
            line = _error(result, 1)
            assert "compress.options.rank_step: 8" in line and "plan.rank_step 4" in line, line
        else:
            assert result.exit_code == 0 and "rank_step 4" in result.output, result.output


def test_a_budget_miss_inside_run_names_the_recipe_keys(folder, monkeypatch):
    monkeypatch.setenv("CWCA_CACHE_DIR", str(folder / "cache"))
    line = _error(_run(folder, export={"backend": "onnx", "max_disk": "1KiB"}), 1, alone=False)
    assert "no setting meets the budget" in line
    # export's flags are not a recipe's: the fixes are its keys, as --set flags
    for flag in ("--formats", "--max-disk", "--plan", "--method"):
        assert flag not in line, line
    fix = line.partition("; fix: ")[2]
    size = fix.split()[1].removeprefix("export.max_disk=").rstrip(",")
    assert fix.startswith("--set export.max_disk=")
    from cwca_export.budget import parse_size

    predicted = line.partition("is predicted at ")[2].split(" on disk")[0]  # e.g. "186.48 KiB"
    assert parse_size(predicted.replace(" ", "")) <= parse_size(size) < parse_size(predicted.replace(" ", "")) + 1024
    # magnitude's zeros are stored dense: the structure the recipe can shrink is width's
    assert "--set compress.method=width" in fix
    assert not (folder / "out").exists()


def test_recipe_keys_of_a_measured_miss_name_only_the_limits_missed():
    from cwca_export.recipe import Recipe, as_recipe_keys

    recipe = Recipe.from_dict({**BASE, "plan": {"program": "allocate", "budget_fraction": 0.6},
                               "compress": {"method": "asvd"},
                               "export": {"max_disk": "64MiB", "max_latency_ms": 0.1}}, check_names=False)
    # the search's message when every candidate was built and missed (exporter/search.py, _Search.error)
    message = ("no setting meets the budget (disk 64.00 MiB, decode 0.1 ms at batch 1, prompt 32, context 128, cpu);"
               " 12 candidate(s) considered, 0 predicted to fit, 1 built; smallest measured: memory 13.10 MiB"
               " (as given, t=0), decode p50 0.227 ms (as given, t=0), prefill p50 0.395 ms (as given, t=0);"
               " hint: relax the budget or give --plan and --method width|lowrank|asvd to compress structure too")
    least = {"memory": int(13.10 * 2**20), "max_latency_ms": 0.227, "max_prefill_ms": 0.395}  # BudgetError.least
    fix = as_recipe_keys(message, recipe, least).partition("; fix: ")[2]
    # the disk limit was met (13.10 MiB measured < 64 MiB): only the decode limit is relaxed
    assert fix == ("--set export.max_latency_ms=0.227, or compress more before the export:"
                   " --set plan.budget_fraction=0.5")


# ------------------------------------------------------------------ too little calibration text


SHORT = ["--samples", "500", "--seq-len", "16"]


def test_too_little_text_names_what_each_verb_offers(folder):
    from cwca_export.scores import LayerScores

    LayerScores("gradnorm", zeta2=[1.0, 2.0], n_params=make_plan(tiny_model(), "prune", [0, 0]).n_params).save(
        folder / "scores.json")
    model, short = str(folder / "model"), str(folder / "short.txt")
    verbs = {
        "export": ["export", model, "--backend", "onnx", "--data", short, "--out", str(folder / "o")],
        "compress": ["compress", model, "--plan", str(folder / "prune.json"), "--method", "wanda", "--data", short,
                     "--out", str(folder / "o")],
        "refine": ["refine", model, "--scores", str(folder / "scores.json"), "--sparsity", "0.5", "--data", short,
                   "--out", str(folder / "p.json")],
        "score": ["score", model, "--data", short, "--out", str(folder / "s.json")],
    }
    for verb, args in verbs.items():
        line = _error(CliRunner().invoke(cli, args + SHORT), 1, alone=False)
        assert "calibration data has" in line and "--samples" in line and "--seq-len" in line, line
        assert ("--allow-fewer" in line) == (verb == "score"), line  # score alone has the flag
        assert "(score)" not in line
    assert not any((folder / name).exists() for name in ("o", "p.json", "s.json"))


def test_too_little_text_in_a_recipe_names_its_keys(folder, monkeypatch):
    monkeypatch.setenv("CWCA_CACHE_DIR", str(folder / "cache"))
    line = _error(_run(folder, data="short.txt", samples=500), 1, alone=False)
    assert "calibration data has" in line and "--allow-fewer" not in line and "--samples" not in line, line
    windows = int(line.partition("tokens (")[2].split()[0])
    assert windows >= 1 and line.endswith(f"fix: --set samples={windows}")
    assert not (folder / "out").exists()
