"""Every `docs/design.md N.M` cited in the tree names a section that exists there."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CITE = re.compile(r"docs/design\.md (\d+(?:\.\d+)?)(?:-(\d+\.\d+))?")


def _sections() -> set[str]:
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    return set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", text, flags=re.M))


def test_design_sections_are_numbered():
    sections = _sections()
    expected = {"1", "2", "2.1", "2.2", "2.3", "2.4", "2.5", "2.6", "3", "3.2", "3.5", "4", "5", "6", "6.1", "6.2"}
    assert expected <= sections


def test_every_citation_resolves():
    sections = _sections()
    files = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *ROOT.glob("docs/*.md")]
    for folder in ("cwca_export", "backends", "benchmarks", "tests", "scripts"):
        files += (ROOT / folder).rglob("*.py")
    cited = 0
    for path in files:
        text = path.read_text(encoding="utf-8")
        assert "DESIGN " + "2" not in text, f"{path}: cites the old design page"
        for first, last in CITE.findall(text):
            cited += 1
            for number in filter(None, (first, last)):
                assert number in sections, f"{path.relative_to(ROOT)} cites docs/design.md {number}"
    assert cited >= 20
