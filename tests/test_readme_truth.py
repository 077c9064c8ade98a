"""README.md and every verb's --help tell the truth: what they show exists and reads as meant."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from cwca_export.cli import cli

VERBS = ("score", "plan", "refine", "compress", "export", "eval", "inspect", "demo", "report", "run")


@pytest.mark.parametrize("verb", VERBS)
def test_help_shows_no_placeholder_range(verb):
    # an unbounded number once read "[default: 2.0; x<=None]" (plan --beta)
    result = CliRunner().invoke(cli, [verb, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    assert "None]" not in result.output and "<=None" not in result.output
