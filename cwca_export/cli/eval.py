"""``cwca-export eval``: held-out perplexity of a model folder or an ONNX artifact."""

from __future__ import annotations

import json

import click

from cwca_export.cli.options import COUNT, loading_options


@click.command(name="eval")
@click.argument("path", metavar="MODEL_DIR_OR_ARTIFACT", type=click.Path(exists=True, file_okay=False))
@click.option("--data", type=click.Path(exists=True),
              help="Held-out text: .txt, .jsonl with a text field, or a folder saved by datasets' save_to_disk"
                   " (one split; column --text-field; needs pip install 'cwca-export[datasets]')"
                   " (required unless --lm-eval-tasks).")
@click.option("--text-field", default="text", show_default=True,
              help="JSON Lines field (or dataset column) holding the text.")
@click.option("--seq-len", type=click.IntRange(min=2), default=256, show_default=True, help="Window length in tokens.")
@click.option("--stride", type=COUNT, default=None, help="Step between windows [default: --seq-len].")
@click.option("--max-tokens", type=click.IntRange(min=2), default=None,
              help="Evaluate only the first N tokens (the text is read only that far).")
@click.option("--batch-size", type=COUNT, default=8, show_default=True, help="Windows per forward.")
@click.option("--ep", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True,
              help="ONNX Runtime execution provider (artifacts only; a torch folder refuses --ep cuda).")
@click.option("--low-memory", is_flag=True,
              help="Artifacts: run the session without weight prepacking, computing from the artifact's"
                   " mapped weights (file pages, not memory of its own: docs/memory.md); prefill-sized"
                   " forwards run slower (float32 at 550M: 1.2x), quantized ones much slower (int8 2.6x, int4"
                   " 8x for 16 tokens) for little saving: meant for float32 artifacts. A float16 artifact with"
                   " external data on the CPU casts each weight as it is read, holding no float32 copy (slower).")
@click.option("--device", default="auto", show_default=True,
              help="Where a torch model folder runs: cpu, cuda, cuda:N or auto (cuda when visible);"
                   " artifacts run on --ep (another --device with an artifact is refused).")
@click.option("--lm-eval-tasks", "lm_eval_tasks", metavar="TASKS", default=None,
              help="Also run lm-eval-harness tasks, comma-separated (torch folders; needs the eval extra).")
@click.option("--lm-eval-include", "lm_eval_include", type=click.Path(exists=True, file_okay=False),
              default=None, help="Folder of your own lm-eval task YAMLs (e.g. reading local data files).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@loading_options
def eval_command(path, data, text_field, seq_len, stride, max_tokens, batch_size, ep, low_memory, device, lm_eval_tasks,
                 lm_eval_include, as_json, trust_remote_code, allow_pickle) -> None:
    """Measure held-out perplexity with one protocol for torch models and ONNX artifacts.

    \b
    Examples:
      cwca-export eval ./my-llama --data heldout.txt --seq-len 256
      cwca-export eval ./artifact --data heldout.txt --json     # ONNX Runtime, same protocol
      cwca-export eval ./narrow --lm-eval-tasks hellaswag,arc_easy  # pip install 'cwca-export[eval]'
    """
    if data is None and lm_eval_tasks is None:
        raise click.UsageError("give --data (held-out perplexity) or --lm-eval-tasks (lm-eval-harness)")
    if stride is not None and stride > seq_len:
        raise click.BadParameter(f"{stride} is longer than --seq-len {seq_len}; pass --stride {seq_len} or less",
                                 param_hint="--stride")
    from cwca_export.evaluate import check_target, is_artifact

    check_target(path, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle, seq_len=seq_len)
    if low_memory and not is_artifact(path):  # before lm-eval, which would run the folder and ignore it
        raise click.BadParameter(f"{path} is a model folder, and it applies to ONNX artifacts (a session without"
                                 " prepacking); hint: drop --low-memory", param_hint="--low-memory")
    report: dict = {}
    if lm_eval_tasks is not None:
        from cwca_export.lm_eval_bridge import run_lm_eval

        # before the perplexity run, so a missing extra or an artifact path fails at once
        lm_eval_report = run_lm_eval(path, lm_eval_tasks, include_path=lm_eval_include,
                                     trust_remote_code=trust_remote_code)
    if data is not None:
        import warnings

        from cwca_export.evaluate import ShortEvaluationWarning, evaluate

        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ShortEvaluationWarning)
            try:
                report = evaluate(path, data, seq_len=seq_len, stride=stride, batch_size=batch_size,
                                  max_tokens=max_tokens, ep=ep, device=device, text_field=text_field,
                                  low_memory=low_memory,
                                  trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                                  progress=not as_json)
            except ValueError as err:
                if "--device" not in str(err) and not str(err).startswith("--ep"):
                    raise
                raise click.UsageError(str(err)) from None
        for w in caught:  # one stderr line each (cwca_export.cli.verbosity)
            warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)
    if lm_eval_tasks is not None:
        report["lm_eval"] = lm_eval_report
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    if data is not None:
        click.echo(
            f"{report['runtime']}: perplexity {report['perplexity']:.3f} over {report['tokens']:,} tokens"
            f" ({report['windows']} window{'' if report['windows'] == 1 else 's'} of {report['seq_len']},"
            f" stride {report['stride']})"
        )
        for key, value in report.get("measured", {}).items():
            click.echo(f"  {key}: {json.dumps(value)}")
    if lm_eval_tasks is not None:
        for task, metrics in (report["lm_eval"].get("results") or {}).items():
            shown = ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in metrics.items() if k != "alias")
            click.echo(f"lm-eval {task}: {shown}")
