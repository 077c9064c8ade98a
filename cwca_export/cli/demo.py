"""``cwca-export demo``: the whole pipeline on the shipped model, with a side-by-side table."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import click

from cwca_export.cli.guard import guards_output
from cwca_export.cli.options import LATENCY_LIMIT, finite


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="cwca-demo", show_default=True,
              help="Folder for scores, plan, the four artifacts and the report.")
@click.option("--sparsity", type=finite(0, 1, max_open=True), default=0.3, show_default=True,
              help="Global MLP-width sparsity of the plan the budget search moves.")
@click.option("--max-disk-fraction", type=finite(0, 1, min_open=True), default=0.15, show_default=True,
              help="Budget: the searched artifact's bytes as a fraction of the dense fp32 artifact's.")
@click.option("--max-latency-ms", type=LATENCY_LIMIT, metavar="MS|int8", default=50.0, show_default=True,
              help="Budget: decode p50 per token at batch 1, context 128, or int8: no slower than the dense"
                   " int8 peer, measured beside it.")
@click.option("--overwrite", is_flag=True,
              help="Replace an earlier demo folder (put back if this run fails) only when it is exactly what"
              " the demo wrote: every file as its cwca_files.json records it, none added or edited; otherwise"
              " refuse, naming the file that differs.")
@click.option("--json", "as_json", is_flag=True,
              help="Print the report (report.json) on stdout; the step lines go to stderr.")
@guards_output(inputs={})
def demo(out, sparsity, max_disk_fraction, max_latency_ms, overwrite, as_json) -> None:
    """The main job on the shipped 12-block Llama: a budget below what plain quantization reaches.

    Measures each block's damage when its MLP is narrowed, plans the width on those curves,
    exports the dense model as fp32, int8 and int4 (the peers), then searches structure level x
    per-layer precision for the smallest budget, and compares all four on disk bytes, resident
    memory, prefill and per-token latency and held-out perplexity. A few minutes on 2 CPU
    cores; no network.

    \b
    Examples:
      cwca-export demo
      cwca-export demo --out /tmp/demo --max-disk-fraction 0.12 --overwrite
    """
    from cwca_export.demo import DemoConfig, run_demo

    config = DemoConfig(sparsity=sparsity, max_disk_fraction=max_disk_fraction, max_latency_ms=max_latency_ms)
    from cwca_export.interrupts import deferred_signals
    from cwca_export.scratch import OLD_CONTENT, scratch_folder

    fresh = not os.path.lexists(out)
    aside = None
    if not fresh and overwrite:  # the earlier demo moves aside, and comes back if this one fails
        with deferred_signals():
            aside = scratch_folder(Path(out), "old")
            os.rename(out, aside / OLD_CONTENT)
    try:
        report = run_demo(out, config, overwrite=overwrite,
                          echo=(lambda message: click.echo(message, err=True)) if as_json else click.echo)
    except BaseException:  # an error or a signal leaves no half-built demo folder behind
        if fresh or aside is not None:
            with deferred_signals():
                shutil.rmtree(out, ignore_errors=True)
                if aside is not None:
                    os.rename(aside / OLD_CONTENT, out)
                    shutil.rmtree(aside, ignore_errors=True)
        raise
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)
    if as_json:
        import json

        click.echo(json.dumps(report, indent=2, default=str))
