"""``cwca-export demo``: the whole pipeline on the shipped model, with a side-by-side table."""

from __future__ import annotations

import click

from cwca_export.cli.options import SIZE, finite


@click.command()
@click.option("--out", type=click.Path(file_okay=False), default="cwca-demo", show_default=True,
              help="Folder for scores, plan, compressed model, artifacts and report.")
@click.option("--method", default="gradnorm", show_default=True,
              help="Scoring estimator (fisher, kfac, exact, gradnorm, obd, layerif, owl, uniform).")
@click.option("--sparsity", type=finite(0, 1, max_open=True), default=0.3, show_default=True,
              help="Global structured MLP-width sparsity of the plan.")
@click.option("--quantize", type=click.Choice(["int8", "int4", "none"]), default="int8", show_default=True,
              help="ONNX Runtime weight quantization of the compressed artifact.")
@click.option("--max-memory", type=SIZE, default="48MiB", show_default=True,
              help="Budget: disk and resident bytes of the compressed artifact.")
@click.option("--max-latency-ms", type=finite(0, min_open=True), default=50.0, show_default=True,
              help="Budget: decode p50 per token at batch 1, context 128.")
@click.option("--overwrite", is_flag=True, help="Replace the contents of --out.")
def demo(out, method, sparsity, quantize, max_memory, max_latency_ms, overwrite) -> None:
    """Score, plan, compress, export and verify the shipped 12-block Llama, then compare.

    Runs in a few minutes on 2 CPU cores and needs no network. Prints dense against
    compressed: disk bytes, resident memory, prefill and per-token latency, held-out perplexity.

    \b
    Examples:
      cwca-export demo
      cwca-export demo --out /tmp/demo --sparsity 0.5 --quantize int4 --overwrite
    """
    from cwca_export.budget import parse_size
    from cwca_export.demo import DemoConfig, run_demo

    config = DemoConfig(
        method=method,
        sparsity=sparsity,
        quantize=None if quantize == "none" else quantize,
        max_memory=parse_size(max_memory),
        max_latency_ms=max_latency_ms,
    )
    run_demo(out, config, overwrite=overwrite, echo=click.echo)
