"""``cwca-export compress``: apply a plan to a model folder and write the compressed folder."""

from __future__ import annotations

import json
from typing import Any

import click

from cwca_export.cli.guard import guards_output
from cwca_export.cli.options import COUNT, DTYPE, METHOD, OVERWRITE_HELP, finite, loading_options
from cwca_export.defaults import CALIBRATION_SAMPLES, CALIBRATION_SEQ_LEN

# Names only, so --help needs no torch; compress() checks the name against the registry.


def _describe(row: dict[str, Any]) -> tuple[str, str]:
    """(planned, result) cells of one block's report row."""
    if "units" in row:
        dense = f", {len(row['dense'])} kept dense" if row["dense"] else ""
        return (
            f"{row['units']:g} units",
            f"rank {row['rank']}: {len(row['factorised'])} factorised{dense}",
        )
    planned = f"rho {row['rho']:.4f}"
    if "intermediate_size" in row:
        before, after = row["intermediate_size"]
        result = f"d_ff {before} -> {after}"
        if "heads" in row:
            result += f", heads {row['heads'][0]} -> {row['heads'][1]}"
        return planned, result
    pattern = f" ({row['nm']})" if "nm" in row else ""
    return planned, f"sparsity {row['realised']:.4f}{pattern}"


def _table(step: dict[str, Any]) -> str:
    rows = step["blocks"]
    width = max(len(r["name"]) for r in rows)
    lines = [f"{'#':>3}  {'block':<{width}}  {'plan':>14}  result"]
    for r in rows:
        planned, result = _describe(r)
        lines.append(f"{r['index']:>3}  {r['name']:<{width}}  {planned:>14}  {result}")
    dense = sum(len(r.get("dense", {})) for r in rows)
    if dense:
        lines.append(
            f"{dense} Linear(s) kept dense: their rank would not shrink them (r >= mn/(m+n))"
        )
    return "\n".join(lines)


def _check_rank_step(ctx: click.Context, plan: Any, plan_path: str, rank_step: int | None) -> None:
    """A plan's units were solved for the rank_step it records: another --rank-step would scale
    every planned rank (8 -> 16 doubles them) without a word."""
    from click.core import ParameterSource

    recorded = plan.parameters.get("rank_step")
    if ctx.get_parameter_source("rank_step") in (ParameterSource.DEFAULT, None) or recorded is None:
        return
    if int(recorded) != rank_step:
        raise click.UsageError(
            f"--rank-step {rank_step}: {plan_path} was planned with rank_step {recorded} (rank = units x {recorded}),"
            f" so {rank_step} would scale every planned rank by {rank_step / int(recorded):g}; hint: drop --rank-step,"
            f" or re-plan with --rank-step {rank_step}")


@click.command()
@click.argument("model_dir", metavar="MODEL_DIR", type=click.Path(file_okay=False))
@click.option(
    "--plan",
    "plan_path",
    required=True,
    type=click.Path(dir_okay=False),
    help="The plan.json from `cwca-export plan` (prune for sparsity/width, allocate for ranks).",
)
@click.option(
    "--method",
    type=METHOD,
    required=True,
    help="magnitude, wanda, sparsegpt (sparsity); width (MLP channels); lowrank, asvd (ranks); or a plug-in.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False),
    help="Folder for the compressed model (written atomically; must not exist unless --overwrite).",
)
@click.option(
    "--data",
    "data_path",
    type=click.Path(),
    help="Calibration text (.txt, .jsonl, or a folder saved by datasets' save_to_disk: one split, column"
    " --text-field, needs pip install 'cwca-export[datasets]'); needed by wanda, sparsegpt, asvd and width.",
)
@click.option(
    "--samples", type=COUNT, default=CALIBRATION_SAMPLES, show_default=True, help="Calibration sequences N."
)
@click.option("--seq-len", type=click.IntRange(min=2), default=CALIBRATION_SEQ_LEN, show_default=True,
              help="Tokens per sequence L.")
@click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for the choice of sequences."
)
@click.option(
    "--text-field", default="text", show_default=True, help="JSON Lines field (or dataset column) holding the text."
)
@click.option(
    "--nm",
    default=None,
    metavar="N:M",
    help="Sparsity methods: keep N of every M weights (2:4, 4:8) in blocks the plan prunes.",
)
@click.option(
    "--head-sparsity",
    type=finite(0, 1, max_open=True),
    default=None,
    help="Sparsity methods: also magnitude-prune lm_head and embeddings to this ratio"
    " [default: untouched].",
)
@click.option(
    "--multiple",
    type=COUNT,
    default=None,
    help="width: round kept channels to a multiple of this [default: 8].",
)
@click.option(
    "--heads", is_flag=True, help="width: also remove whole KV groups with their query heads."
)
@click.option(
    "--rank-step",
    type=COUNT,
    default=None,
    help="lowrank/asvd: rank per plan unit [default: the plan's rank_step, else 8]; a plan that records"
    " rank_step (plan --rule damage, refine) refuses another.",
)
@click.option(
    "--whole-model",
    is_flag=True,
    help="Collect every block's statistics from the dense model in one pass (the baseline)"
    " instead of block by block.",
)
@click.option(
    "--batch-size", type=COUNT, default=1, show_default=True, help="Sequences per forward pass."
)
@click.option(
    "--device",
    default=None,
    help="Where each block is processed, e.g. cuda [default: where the model is].",
)
@click.option(
    "--dtype",
    type=DTYPE,
    default="float32",
    show_default=True,
    help="Dtype to load the weights in.",
)
@click.option(
    "--no-fingerprint",
    is_flag=True,
    help="Apply a plan whose model fingerprint differs or is missing (same shapes).",
)
@loading_options
@click.option("--overwrite", is_flag=True,
              help=OVERWRITE_HELP)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print the compression report as JSON instead of a table.",
)
@guards_output(inputs={"model_dir": "MODEL_DIR", "plan_path": "--plan", "data_path": "--data"})
def compress(
    model_dir,
    plan_path,
    method,
    out,
    data_path,
    samples,
    seq_len,
    seed,
    text_field,
    nm,
    head_sparsity,
    multiple,
    heads,
    rank_step,
    whole_model,
    batch_size,
    device,
    dtype,
    no_fingerprint,
    trust_remote_code,
    allow_pickle,
    overwrite,
    as_json,
) -> None:
    """Apply a plan to MODEL_DIR (a local checkpoint folder) and save the compressed model.

    Ranks: a block with e_k units gets rank e_k * rank_step in each Linear; a Linear is
    factorised only where that shrinks it (r < mn/(m+n)). The output folder's config.json
    records the per-block shapes under cwca_compression; load it with
    cwca_export.load_compressed.

    \b
    Examples:
      cwca-export compress llama --plan plan.json --method wanda --data calib.txt --out llama-wanda
      cwca-export compress llama --plan plan.json --method sparsegpt --nm 2:4 --data c.txt --out s24
      cwca-export compress llama --plan plan.json --method width --heads --data c.txt --out narrow
      cwca-export compress llama --plan ranks.json --method lowrank --rank-step 16 --out llama-lr
    """
    from cwca_export.compression import compress as run_compress
    from cwca_export.compression.saving import save_compressed
    from cwca_export.data import calibration_data
    from cwca_export.loading import check_model_folder, load_model
    from cwca_export.planning.plan import Plan

    plan = Plan.load(plan_path)
    _check_rank_step(click.get_current_context(), plan, plan_path, rank_step)
    check_model_folder(model_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
                       lengths={"--seq-len": seq_len if data_path is not None else None})
    given = {
        "nm": nm,
        "head_sparsity": head_sparsity,
        "multiple": multiple,
        "heads": heads or None,
        "rank_step": rank_step,
    }
    options = {key: value for key, value in given.items() if value is not None}
    model, tokenizer = load_model(
        model_dir, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    plan.check(model, fingerprint=not no_fingerprint, require_fingerprint=not no_fingerprint)
    data = None
    if data_path is not None:
        data = calibration_data(
            data_path,
            tokenizer,
            num_samples=samples,
            seq_len=seq_len,
            seed=seed,
            text_field=text_field,
        )
    run_compress(
        model,
        plan,
        method=method,
        data=data,
        batch_size=batch_size,
        device=device,
        sequential=not whole_model,
        check_fingerprint=not no_fingerprint,
        progress=not as_json,
        **options,
    )
    path = save_compressed(model, out, tokenizer=tokenizer, overwrite=overwrite)
    step = model.config.cwca_compression["steps"][-1]
    if as_json:
        click.echo(json.dumps(step, indent=2))
        return
    click.echo(_table(step))
    source = "" if data is None else f" on {data.num_samples} x {data.seq_len} tokens"
    click.echo(f"{method}{source} in {step['wall_time_s']:.1f} s; wrote {path}")
