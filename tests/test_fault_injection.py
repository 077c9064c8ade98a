"""Faults inside scoring, planning, compression, export, quantization, verification and
measurement, and a disk that fills up mid-write: each run completes correctly or leaves the
previous output byte-identical, with nothing beside it (scenarios in tests/faults.py)."""

from __future__ import annotations

import pytest
from bad_inputs import build_world
from faults import SCENARIOS, VERBS, prepare_previous, run_scenario

_NEEDED = {s.verb for s in SCENARIOS}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from click.testing import CliRunner

    from cwca_export.cli import cli

    w = build_world(tmp_path_factory.mktemp("fault-world"))
    source = w.root / "report-source"  # a run folder the report verb writes into
    result = CliRunner().invoke(cli, ["run", str(w.root / "recipe-good.yaml"), "--out", str(source)])
    assert result.exit_code == 0, result.output
    return w


@pytest.fixture(scope="module")
def references(world, tmp_path_factory):
    """A clean run of every verb: what a completed faulty run must reproduce."""
    return {name: prepare_previous(world.root, tmp_path_factory.mktemp(f"ref-{name}"), verb)
            for name, verb in VERBS.items() if name in _NEEDED}


@pytest.mark.parametrize("scenario", SCENARIOS, ids=[s.id for s in SCENARIOS])
def test_fault_leaves_previous_output_or_completes(world, references, scenario, tmp_path):
    outcome = run_scenario(world.root, tmp_path, references[scenario.verb], scenario)
    assert outcome.survived, f"{outcome.problems}\n{outcome.stderr}"
    assert outcome.files_lost == 0
    assert outcome.fired, "the fault never fired: the scenario tests nothing"


def test_the_scenarios_cover_every_stage():
    ids = " ".join(s.id for s in SCENARIOS)
    for stage in ("score", "plan", "compress", "export-backend", "quantization", "verification", "disk-full"):
        assert stage in ids
