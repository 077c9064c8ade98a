"""Extract the demo corpus: English prose from the Python 3.11 documentation sources.

Why this text: it is real English, licence-clean (PSF licence, kept beside it), available
offline from Debian, and has two distinct domains (the library reference and the guides),
which the transfer benchmark needs. Run once; the output is committed, never fetched at
test time.

    apt-get download python3.11-doc    # Debian 12: python3.11-doc_3.11.2-6+deb12u9_all.deb
    python scripts/extract_corpus.py python3.11-doc_3.11.2-6+deb12u9_all.deb

Documents (one .rst source each) are split, by a seeded draw, into train and held-out;
held-out documents never appear in train. Each split is capped in bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import random
import re
import subprocess
import tempfile
from pathlib import Path

OUT = Path(__file__).resolve().parents[1] / "cwca_export" / "assets" / "text"
SOURCES = "usr/share/doc/python3.11/html/_sources"
GUIDES = ("tutorial", "howto", "faq", "reference", "using", "extending", "installing", "glossary")

_ROLE = re.compile(r":[\w:+-]+:`(?:[^`<]*<)?([^`>]+)>?`")
_UNDERLINE = re.compile(r"^([=\-~*^\"'#+`])\1{3,}\s*$")


def clean(rst: str) -> str:
    """Keep prose and code, drop reST scaffolding (directives, labels, heading rules)."""
    lines, skipping = [], False
    for line in rst.splitlines():
        if line.startswith(".. "):
            skipping = True  # a directive or comment: skip it and its indented options
            continue
        if skipping and (line.startswith("   :") or not line.strip()):
            continue
        skipping = False
        if _UNDERLINE.match(line):
            continue
        line = _ROLE.sub(lambda m: m.group(1).lstrip("~!"), line)
        lines.append(line.replace("``", ""))
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def domain_of(rel: str) -> str | None:
    top = rel.split("/", 1)[0].removesuffix(".rst.txt")
    if top == "library":
        return "library"
    return "guides" if top in GUIDES else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("deb", type=Path, help="the python3.11-doc .deb")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--heldout-fraction", type=float, default=0.1)
    parser.add_argument("--train-bytes", type=int, default=7_000_000)
    parser.add_argument("--heldout-bytes", type=int, default=300_000, help="per domain")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(args.deb), tmp], check=True)
        root = Path(tmp) / SOURCES
        docs = []
        for path in sorted(root.rglob("*.rst.txt")):
            rel = path.relative_to(root).as_posix()
            domain = domain_of(rel)
            if domain:
                docs.append((rel, domain, clean(path.read_text(encoding="utf-8"))))
        copyright_text = (Path(tmp) / "usr/share/doc/python3.11-doc/copyright").read_text()
        license_text = (root / "license.rst.txt").read_text(encoding="utf-8")

    rng = random.Random(args.seed)
    rng.shuffle(docs)
    n_held = int(len(docs) * args.heldout_fraction)
    held, train = docs[:n_held], docs[n_held:]

    def take(items, cap):
        out, size = [], 0
        for rel, _, text in items:
            if size + len(text) > cap:
                continue
            out.append(rel)
            size += len(text)
        return out

    OUT.mkdir(parents=True, exist_ok=True)
    train_keep = set(take(train, args.train_bytes))
    (OUT / "train.txt").write_text("\n".join(t for r, _, t in train if r in train_keep))
    manifest = [f"train: {len(train_keep)} documents"]
    for domain in ("library", "guides"):
        keep = set(take([d for d in held if d[1] == domain], args.heldout_bytes))
        (OUT / f"heldout-{domain}.txt").write_text("\n".join(t for r, _, t in held if r in keep))
        manifest.append(f"heldout-{domain}: {len(keep)} documents")
    (OUT / "heldout.txt").write_text(
        (OUT / "heldout-library.txt").read_text() + "\n" + (OUT / "heldout-guides.txt").read_text()
    )
    (OUT / "LICENSE-python-docs.txt").write_text(copyright_text + "\n\n" + license_text)
    digest = hashlib.sha256(args.deb.read_bytes()).hexdigest()
    (OUT / "PROVENANCE.md").write_text(
        "# Demo corpus provenance\n\n"
        f"Source: Debian package `{args.deb.name}` (sha256 {digest}), folder `/{SOURCES}`:\n"
        "the reStructuredText sources of the Python 3.11 documentation, PSF licence\n"
        "(`LICENSE-python-docs.txt`).\n\n"
        f"Made by `python scripts/extract_corpus.py {args.deb.name}` (seed {args.seed}).\n"
        "Domains: `library` = library/; `guides` = " + ", ".join(GUIDES) + ".\n"
        "Held-out documents are drawn per document and never appear in train.txt;\n"
        "heldout.txt = heldout-library.txt + heldout-guides.txt.\n\n"
        + "\n".join(f"- {line}" for line in manifest) + "\n"
    )


if __name__ == "__main__":
    main()
