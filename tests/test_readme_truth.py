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


def test_export_help_states_the_formats_default_the_search_uses(tmp_path):
    # export --help once promised int4-b128-asym; the shipped model (192-wide inputs) gets b64
    from helpers import tiny_model

    from cwca_export.planning.precision import default_formats

    model = tiny_model("llama", hidden_size=192, intermediate_size=512)
    assert default_formats(model)[2] == "int4-b64-asym"
    text = " ".join(CliRunner().invoke(cli, ["export", "--help"], terminal_width=400).output.split())
    assert "[default: fp32,int8,int4-b128-asym,int4-b32]" not in text
    assert "int4-bB-asym,int4-b32 with B the largest of 128, 64 dividing every input size, else 32" in text
