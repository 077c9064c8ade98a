"""--verbose / --quiet on every verb: one-line warnings, silenced library chatter, debug logging."""

from __future__ import annotations

import io
import logging
import sys
import warnings

import pytest
from click.testing import CliRunner
from helpers import save_tiny_model

from cwca_export.cli import cli


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("verbosity")
    save_tiny_model("llama", root / "llama")
    (root / "tiny.txt").write_text("A short held-out text.", encoding="utf-8")
    return root


def _eval(folder, *flags):
    return CliRunner().invoke(cli, ["eval", str(folder / "llama"), "--data", str(folder / "tiny.txt"),
                                    "--seq-len", "64", *flags])


def test_every_verb_has_verbose_and_quiet():
    for name, command in cli.commands.items():
        options = {opt for p in command.params for opt in p.opts}
        assert {"--verbose", "-v", "--quiet", "-q"} <= options, name


def test_a_warning_is_one_line_without_source(folder):
    result = _eval(folder)
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    # the default format is "file:line: Category: message" and then the source line
    assert lines == [lines[0]] and lines[0].startswith("Warning: ") and "fewer than one window" in lines[0]
    assert "ShortEvaluationWarning" not in result.stderr and "warnings.warn" not in result.stderr


def test_quiet_drops_the_warning_and_verbose_logs_debug(folder):
    quiet = _eval(folder, "--quiet")
    assert quiet.exit_code == 0 and quiet.stderr == "" and "perplexity" in quiet.stdout
    verbose = _eval(folder, "--verbose")
    assert verbose.exit_code == 0, verbose.output
    assert "debug: cwca_export.loading: loaded" in verbose.stderr
    assert sum("Warning: " in line for line in verbose.stderr.splitlines()) == 1


def test_verbose_and_quiet_together_are_refused(folder):
    result = _eval(folder, "-v", "-q")
    assert result.exit_code == 2 and "--verbose and --quiet" in result.stderr


def test_library_warnings_only_under_verbose_and_settings_restored(monkeypatch):
    from cwca_export.cli.verbosity import verbosity

    before = (warnings.showwarning, logging.getLogger("transformers").level, logging.getLogger("cwca_export").level)
    err = io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    with verbosity():
        warnings.warn_explicit("a library's deprecation", FutureWarning, "/site-packages/lib/x.py", 3)
    with verbosity(verbose=True):
        warnings.warn_explicit("a library's deprecation", FutureWarning, "/site-packages/lib/x.py", 4)
    shown = err.getvalue()
    assert shown.splitlines() == ["Warning: a library's deprecation [FutureWarning from x.py:4]"]
    after = (warnings.showwarning, logging.getLogger("transformers").level, logging.getLogger("cwca_export").level)
    assert after == before


def test_quiet_export_prints_only_its_result(folder, tmp_path):
    """`export -q` printed "exporting ... with backend ..." on stderr: --quiet promises results and
    errors only."""
    args = ["export", str(folder / "llama"), "--backend", "onnx", "--runs", "1", "--warmup", "0", "--out"]
    result = CliRunner().invoke(cli, [*args, str(tmp_path / "art"), "-q"])
    assert result.exit_code == 0, result.output
    assert result.stderr == "" and "wrote" in result.stdout
    loud = CliRunner().invoke(cli, [*args, str(tmp_path / "art2")])
    assert loud.exit_code == 0 and "exporting" in loud.stderr


def test_eval_of_one_window_says_window(folder):
    """A text shorter than one window printed "(1 windows of 64 ...)"."""
    result = _eval(folder, "--quiet")
    assert result.exit_code == 0 and "(1 window of 64," in result.stdout, result.output
