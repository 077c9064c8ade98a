"""Flags that did nothing, or hints that named flags the user's verb lacks: one clear line each.

Each case was silent or misleading before: `export --levels` without a structure search,
`export --plan` without `--method`, `compress --rank-step` against a plan's recorded step, a
budget error inside `run` naming export's flags, and the short-calibration hint naming score's
`--allow-fewer` from every verb.
"""

from __future__ import annotations

import pytest
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


def _error(result, code: int) -> str:
    """The one ``Error:`` line of a refused command."""
    assert result.exit_code == code, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


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
