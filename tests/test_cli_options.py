"""One meaning per flag: every verb's options walked, same name -> same type, choices and kind.

A flag that two verbs spell the same must parse the same way (type, choice vocabulary, flag or
value, repeatable or not), and one concept must not go by two names across verbs. No exceptions:
old spellings live on only as hidden aliases that print a one-line deprecation.
"""

from __future__ import annotations

import click
import pytest

from cwca_export import defaults
from cwca_export.cli import cli

SYNONYMS = [("--batch", "--batch-size"), ("--cpu", "--device"), ("--samples", "--num-samples"),
            ("--seq-len", "--seqlen"), ("--json", "--as-json")]


def _signature(param: click.Option) -> tuple:
    choices = tuple(sorted(param.type.choices)) if isinstance(param.type, click.Choice) else None
    return type(param.type).__name__, choices, param.is_flag, param.multiple


def _options():
    """option name -> [(verb, signature)] over every verb's visible options."""
    seen: dict[str, list[tuple[str, tuple]]] = {}
    for verb, command in cli.commands.items():
        for param in command.params:
            if isinstance(param, click.Option) and not param.hidden:
                for name in param.opts + param.secondary_opts:
                    seen.setdefault(name, []).append((verb, _signature(param)))
    return seen


def test_one_meaning_per_flag():
    clashes = {name: uses for name, uses in _options().items() if len({sig for _, sig in uses}) > 1}
    assert not clashes, clashes


def test_one_name_per_concept():
    names = set(_options())
    found = {pair for pair in SYNONYMS if set(pair) <= names}
    assert not found, found


def test_dtype_is_one_vocabulary_on_every_verb():
    uses = _options()["--dtype"]
    assert {verb for verb, _ in uses} >= {"score", "compress", "export"}
    assert {sig[1] for _, sig in uses} == {("bfloat16", "float16", "float32")}


@pytest.mark.parametrize(
    ("verb", "old", "new"),
    [("score", ["--method", "uniform"], "--estimator"), ("score", ["--cpu"], "--device cpu"),
     ("export", ["--batch", "2"], "--batch-size"), ("export", ["--dtype", "fp16"], "--dtype float16")],
)
def test_old_spellings_parse_with_a_one_line_deprecation(verb, old, new, tmp_path):
    from click.testing import CliRunner

    # a missing model folder stops each verb right after parsing: the warning comes first
    result = CliRunner().invoke(cli, [verb, str(tmp_path / "missing"), "--out", str(tmp_path / "o"),
                                      *(["--data", str(tmp_path / "c.txt")] if verb == "score" else []), *old])
    assert result.exit_code != 0
    first = result.stderr.splitlines()[0]
    assert first.startswith("Warning: ") and "deprecated" in first and new in first, result.stderr


def test_method_flags_accept_registered_names_only():
    from click.testing import CliRunner

    result = CliRunner().invoke(cli, ["compress", "m", "--plan", "p.json", "--method", "wandda", "--out", "o"])
    assert result.exit_code == 2 and "'wandda' is not one of: asvd, lowrank, magnitude" in result.stderr
    result = CliRunner().invoke(cli, ["score", "m", "--data", "c.txt", "--estimator", "fishr"])
    assert result.exit_code == 2 and "'fishr' is not one of: damage, exact, fisher" in result.stderr


def test_max_memory_is_a_size_budget_everywhere_and_score_keeps_a_deprecated_alias():
    uses = _options()["--max-memory"]
    assert {verb for verb, _ in uses} == {"export"}
    score = cli.commands["score"]
    alias = next(p for p in score.params if "--max-memory" in getattr(p, "opts", []))
    assert alias.hidden and "--device-memory" in alias.help


def test_every_verb_prints_json():
    for verb, command in cli.commands.items():
        assert any("--json" in p.opts for p in command.params if isinstance(p, click.Option)), verb


def _default(verb: str, flag: str):
    return next(p.default for p in cli.commands[verb].params if isinstance(p, click.Option) and flag in p.opts)


@pytest.mark.parametrize("verb", ["score", "compress"])
def test_calibration_defaults_come_from_one_place(verb):
    assert _default(verb, "--samples") == defaults.CALIBRATION_SAMPLES == 128
    assert _default(verb, "--seq-len") == defaults.CALIBRATION_SEQ_LEN == 512


def test_deliberate_calibration_differences_are_the_documented_ones():
    assert (_default("refine", "--samples"), _default("refine", "--seq-len")) == (
        defaults.REFINE_SAMPLES, defaults.REFINE_SEQ_LEN)
    assert (_default("export", "--samples"), _default("export", "--seq-len")) == (
        defaults.EXPORT_SAMPLES, defaults.EXPORT_SEQ_LEN)


def test_refine_json_is_the_plan_it_wrote(tmp_path):
    import json

    from click.testing import CliRunner
    from helpers import sample_text, save_tiny_model

    from cwca_export.planning.plan import Plan
    from cwca_export.scoring import score

    model = save_tiny_model("llama", tmp_path / "llama")
    (tmp_path / "calib.txt").write_text(sample_text(), encoding="utf-8")
    score(str(model), str(tmp_path / "calib.txt"), method="uniform", num_samples=2, seq_len=16,
          progress=False).save(tmp_path / "scores.json")
    out = tmp_path / "plan.json"
    result = CliRunner().invoke(cli, ["refine", str(model), "--scores", str(tmp_path / "scores.json"),
                                      "--sparsity", "0.3", "--data", str(tmp_path / "calib.txt"), "--samples", "2",
                                      "--seq-len", "16", "--max-evals", "4", "--no-tune", "--method", "magnitude",
                                      "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    printed = json.loads(result.stdout)
    assert printed == json.loads(out.read_text(encoding="utf-8"))
    assert Plan.load(out).global_sparsity == pytest.approx(0.3)
    assert printed["parameters"]["refinement"]["forwards"] <= 4


def test_score_max_memory_alias_still_parses_and_says_it_is_deprecated(tmp_path):
    from click.testing import CliRunner
    from helpers import sample_text, save_tiny_model

    model = save_tiny_model("llama", tmp_path / "llama")
    (tmp_path / "calib.txt").write_text(sample_text(), encoding="utf-8")
    result = CliRunner().invoke(cli, ["score", str(model), "--data", str(tmp_path / "calib.txt"), "--samples", "2",
                                      "--seq-len", "16", "--device-map", "auto", "--max-memory", "lots"])
    assert result.exit_code == 2
    lines = result.stderr.splitlines()
    assert lines[0].startswith("Warning: score --max-memory is deprecated") and "--device-memory" in lines[0]
    assert lines[1].startswith("Error: ") and "--max-memory" in lines[1]
