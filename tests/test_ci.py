"""`.ci/run` is the README's test command, and that command lints and runs the doctests."""

from __future__ import annotations

import re
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme.split("Run the test suite:", 1)[1]
    return re.search(r"```bash\n(.+?)\n```", section, flags=re.S).group(1).strip()


def test_ci_runs_exactly_the_readme_test_command():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln and not ln.startswith("#")]
    assert ci[-1] == _readme_test_command()


def test_the_test_command_lints_and_runs_doctests():
    command = _readme_test_command()
    assert ".venv/bin/ruff check ." in command and command.endswith(".venv/bin/pytest -q")
    pytest_options = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--doctest-modules" in pytest_options["addopts"] and "cwca_export" in pytest_options["testpaths"]
    test_extra = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]["test"]
    assert any(req.startswith("ruff") for req in test_extra)
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    assert any(line.startswith("ruff==") for line in pins)
