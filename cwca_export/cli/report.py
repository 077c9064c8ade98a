"""``cwca-export report``: rebuild the per-layer figure and the HTML report of a folder."""

from __future__ import annotations

import click


@click.command()
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
def report(folder) -> None:
    """Write DIR/layers.png and DIR/report.html from the files in DIR.

    DIR needs plan.json; scores.json, */cwca_manifest.json and report.json (from
    `cwca-export demo`) are added when present. The HTML is one self-contained file.

    \b
    Examples:
      cwca-export report cwca-demo
      cwca-export report ./run-7        # a folder holding plan.json, scores.json, artifact/
    """
    from cwca_export.report import FIGURE_NAME, build_report

    page = build_report(folder)
    click.echo(f"figure: {page.with_name(FIGURE_NAME)}")
    click.echo(f"report: {page}")
