"""The bad-input catalogue: every verb, through the real CLI, refuses each bad input clearly.

Clear means: a non-zero exit, exactly one ``Error:`` line on stderr that names the file or
flag at fault and carries a ``--flag`` hint, no traceback, no output left behind and none of
a hostile folder's code run (stdin answers yes to any prompt). The inputs and cases live in
tests/bad_inputs.py; benchmarks/bench_reliability.py counts the same cases for BENCHMARKS.md.
"""

from __future__ import annotations

import pytest
from bad_inputs import CASES, build_world, marker_path, run_in_process, run_subprocess
from click.testing import CliRunner

from cwca_export.cli import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return build_world(tmp_path_factory.mktemp("bad-inputs"))


@pytest.fixture(autouse=True)
def _no_debug(monkeypatch):
    monkeypatch.delenv("CWCA_DEBUG", raising=False)


def test_the_catalogue_is_broad():
    verbs = {c.argv[0] for c in CASES}
    assert len(CASES) >= 80
    assert {"score", "plan", "refine", "compress", "inspect", "export", "eval", "demo", "report", "run"} <= verbs


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_clear_line(world, case):
    outcome = run_in_process(world, case)
    assert outcome.clear, f"{outcome.problems}\n{outcome.stderr}"


# a handful as a user meets them: a child process, stdin answering yes
_THROUGH_A_PROCESS = ("inspect-remote-code", "plan-model-remote-code", "score-bert", "unknown-global-option")


@pytest.mark.parametrize("case_id", _THROUGH_A_PROCESS)
def test_bad_input_in_a_real_process(world, case_id):
    case = next(c for c in CASES if c.id == case_id)
    outcome = run_subprocess(world, case)
    assert outcome.clear, f"{outcome.problems}\n{outcome.stderr}"


def test_debug_shows_the_traceback(world, monkeypatch):
    monkeypatch.setenv("CWCA_DEBUG", "1")
    result = CliRunner().invoke(cli, ["inspect", str(world.root / "bert")])
    assert result.exit_code != 0 and result.exception is not None
    assert "BertForMaskedLM" in str(result.exception)


# ---------------------------------------------------------------- the flags open what they name


def test_trust_remote_code_runs_the_folders_code_only_when_given(world):
    marker = marker_path(world.root)
    assert not marker.exists()
    result = CliRunner().invoke(cli, ["inspect", str(world.root / "remote"), "--trust-remote-code", "--json"])
    try:
        assert result.exit_code == 0, result.output
        assert marker.exists()  # the flag really lets the folder's code run
        assert '"architecture": "EvilForCausalLM"' in result.stdout
    finally:
        marker.unlink(missing_ok=True)


def test_allow_pickle_loads_the_same_model(world):
    args = ["--data", str(world.root / "calib.txt"), "--seq-len", "32", "--json"]
    safe = CliRunner().invoke(cli, ["eval", str(world.root / "llama"), *args])
    pickled = CliRunner().invoke(cli, ["eval", str(world.root / "pickle"), *args, "--allow-pickle"])
    assert safe.exit_code == 0 and pickled.exit_code == 0, pickled.output
    import json

    # both folders hold tiny_model("llama") (seed 0): same weights, same perplexity
    assert json.loads(pickled.stdout)["perplexity"] == pytest.approx(json.loads(safe.stdout)["perplexity"], rel=1e-6)


def test_short_evaluation_warns_in_one_line(world):
    result = CliRunner().invoke(cli, ["eval", str(world.root / "llama"), "--data", str(world.root / "tiny.txt"),
                                      "--seq-len", "64"])
    assert result.exit_code == 0, result.output
    warnings = result.stderr.strip().splitlines()
    assert len(warnings) == 1 and warnings[0].startswith("Warning: ")
    assert "fewer than one window of --seq-len 64" in warnings[0]


def test_a_plan_within_its_bounds_and_fingerprint_still_compresses(world, tmp_path):
    out = tmp_path / "c"
    result = CliRunner().invoke(cli, ["compress", str(world.root / "llama"), "--plan", str(world.root / "plan.json"),
                                      "--method", "magnitude", "--out", str(out)])
    assert result.exit_code == 0, result.output
    forced = CliRunner().invoke(cli, ["compress", str(world.root / "llama-other"), "--plan",
                                      str(world.root / "plan-no-fingerprint.json"), "--method", "magnitude",
                                      "--no-fingerprint", "--out", str(tmp_path / "forced")])
    assert forced.exit_code == 0, forced.output
