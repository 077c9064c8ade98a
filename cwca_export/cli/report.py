"""``cwca-export report``: rebuild the per-layer figure and the HTML report of a folder."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("folder", metavar="DIR", type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the paths written as JSON.")
def report(folder, as_json) -> None:
    """Write DIR/layers.png and DIR/report.html from the files in DIR.

    DIR needs plan.json; scores.json, */cwca_manifest.json and report.json (from
    `cwca-export demo`) are added when present. The HTML is one self-contained file.

    \b
    Examples:
      cwca-export report cwca-demo
      cwca-export report ./run-7        # a folder holding plan.json, scores.json, artifact/
    """
    from cwca_export.outputs import check_output, refresh_record
    from cwca_export.report import FIGURE_NAME, HTML_NAME, build_report, report_files_intact

    intact = dict(zip((HTML_NAME, FIGURE_NAME), report_files_intact(folder), strict=True))
    for name in (HTML_NAME, FIGURE_NAME):  # never replace a page or figure the tool did not write, or one edited
        check_output(Path(folder) / name, kind="file", recognise=lambda _, ok=intact[name]: ok, flag="DIR")
    page = build_report(folder)
    refresh_record(folder, [HTML_NAME, FIGURE_NAME])
    if as_json:
        import json

        click.echo(json.dumps({"figure": str(page.with_name(FIGURE_NAME)), "report": str(page)}, indent=2))
        return
    click.echo(f"figure: {page.with_name(FIGURE_NAME)}")
    click.echo(f"report: {page}")
