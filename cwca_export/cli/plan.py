"""``cwca-export plan``: solve the pruning or allocation program from a scores file."""

from __future__ import annotations

import json
import math

import click

from cwca_export.cli.guard import guards_output
from cwca_export.cli.options import COUNT, finite


def parse_bounds(specs: tuple[str, ...]) -> tuple[dict[int, float], dict[int, float]]:
    """Parse ``BLOCKS:HI`` or ``BLOCKS:LO:HI`` (BLOCKS = ``3`` or ``0-3``) into per-block overrides.

    Example:
        >>> parse_bounds(("0:0.3", "4-5:0.1:0.6"))
        ({4: 0.1, 5: 0.1}, {0: 0.3, 4: 0.6, 5: 0.6})
    """
    lo: dict[int, float] = {}
    hi: dict[int, float] = {}
    for spec in specs:
        parts = spec.split(":")
        try:
            if len(parts) not in (2, 3):
                raise ValueError
            first, _, last = parts[0].partition("-")
            start = int(first)
            stop = int(last) if last else start
            values = [float(p) for p in parts[1:]]
            if not all(math.isfinite(v) and v >= 0 for v in values) or start < 0:
                raise ValueError
        except ValueError:
            raise click.BadParameter(
                f"{spec!r}: expected BLOCKS:HI or BLOCKS:LO:HI (finite, >= 0), e.g. 0:0.3 or 0-3:0.1:0.5",
                param_hint="--bounds",
            ) from None
        if stop < start:
            raise click.BadParameter(f"{spec!r}: block range {start}-{stop} is empty", param_hint="--bounds")
        for block in range(start, stop + 1):
            if len(values) == 2:
                lo[block] = values[0]
            hi[block] = values[-1]
    return lo, hi


def _table(plan) -> str:
    value = "rho" if plan.program == "prune" else "units"
    width = max(len(n) for n in plan.block_names)
    lines = [f"{'#':>3}  {'block':<{width}}  {'n_k':>12}  {'q_k':>8}  {value:>8}  bound"]
    for i in range(plan.num_blocks):
        x = plan.x[i]
        at = "lo" if x <= plan.lo[i] else ("hi" if x >= plan.hi[i] else "")
        shown = f"{x:8.4f}" if plan.program == "prune" else f"{x:8g}"
        lines.append(
            f"{i:>3}  {plan.block_names[i]:<{width}}  {plan.n_params[i]:>12,}  {plan.q[i]:8.4f}  {shown}  {at}"
        )
    return "\n".join(lines)


@click.command()
@click.argument("scores_path", metavar="SCORES", type=click.Path(dir_okay=False))
@click.option(
    "--program",
    type=click.Choice(["prune", "allocate"]),
    default="prune",
    show_default=True,
    help="prune: per-block sparsity for a global target; allocate: per-block capacity units.",
)
@click.option("--sparsity", type=finite(0, 1, max_open=True),
              help="prune: global sparsity, a fraction of all block weights.")
@click.option("--budget", type=finite(0, min_open=True), help="allocate: total cost, sum of cost * units.")
@click.option("--lo", type=finite(0), default=0.0, show_default=True, help="Lower bound for every block.")
@click.option(
    "--hi",
    type=finite(0),
    default=None,
    help="Upper bound for every block [default: 0.95 for prune, unbounded for allocate]; for"
    " allocate --rule damage, --lo / --hi / --bounds bound the fraction of rank removed (default 0.95).",
)
@click.option(
    "--bounds",
    multiple=True,
    metavar="BLOCKS:[LO:]HI",
    help="Per-block bounds, repeatable: 0:0.3 caps block 0 at 0.3; 0-3:0.1:0.5 sets lo and hi.",
)
@click.option("--eta", type=finite(0, min_open=True), default=2.0, show_default=True, help="prune: cost weight eta.")
@click.option("--kappa", type=finite(0), default=1.0, show_default=True, help="prune: quality exponent; < 1 flattens.")
@click.option(
    "--psi",
    type=click.Choice(["quadratic", "log"]),
    default="quadratic",
    show_default=True,
    help="prune: damage curve rho^2 or -log(1 - rho).",
)
@click.option("--gamma", type=finite(0, min_open=True), default=0.9, show_default=True, help="allocate: value scale.")
@click.option("--beta", type=finite(), default=2.0, show_default=True, help="allocate: quality exponent.")
@click.option("--alpha", type=finite(0), default=0.5, show_default=True, help="allocate: per-unit penalty.")
@click.option("--cost", type=finite(0, min_open=True), default=1.0, show_default=True,
              help="allocate: cost of one unit.")
@click.option(
    "--integer/--continuous",
    default=True,
    show_default=True,
    help="allocate: whole units (ranks, experts) or the continuous optimum.",
)
@click.option(
    "--rule",
    type=click.Choice(["auto", "cwca", "damage", "band"]),
    default="auto",
    show_default=True,
    help="prune: cwca = the MDL program on q_k; damage = measured per-block curves (scores from"
    " --estimator damage); band = the OWL / LayerIF linear map into [S - band, S + band];"
    " auto = damage when the scores hold curves, else cwca. allocate: cwca = the value program"
    " with --budget; damage = ranks from low-rank damage curves (--option pruner=lowrank or asvd)"
    " with --budget-fraction; auto = damage when --budget-fraction is given (or the scores hold"
    " low-rank curves and no --budget), else cwca.",
)
@click.option(
    "--budget-fraction",
    type=finite(0, 1, min_open=True),
    default=None,
    help="allocate, rule damage: fraction of the blocks' Linear weights the factorised model keeps,"
    " sum_k sum_l min(r_k (m_l + n_l), m_l n_l) <= F * sum_k n_k (never exceeded).",
)
@click.option(
    "--rank-step",
    type=COUNT,
    default=8,
    show_default=True,
    help="allocate, rule damage: rank of one plan unit (recorded in the plan for compress);"
    " with --peft-config: the LoRA rank of one unit.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, file_okay=False),
    default=None,
    help="allocate, rule damage or --peft-config: the model folder whose config gives each Linear's"
    " shape (and name)"
    " [default: the scores' model path]; no weights are read.",
)
@click.option(
    "--band",
    type=finite(0),
    default=None,
    help="prune: keep every block within [S - BAND, S + BAND] (OWL-style); the map's half-width"
    " for --rule band (OWL 0.08, LayerIF 0.3).",
)
@click.option(
    "--form",
    type=click.Choice(["piecewise", "power"]),
    default="piecewise",
    show_default=True,
    help="rule damage: convex piecewise-linear envelope of the probes, or a rho^b fit.",
)
@click.option("--tau", type=finite(0), default=0.05, show_default=True, help="Quality floor: tau * median q.")
@click.option(
    "--out",
    type=click.Path(dir_okay=False),
    default="plan.json",
    show_default=True,
    help="Where to write the plan (written atomically). An existing file is replaced only when it is a plan"
    " the tool wrote, unedited (its content stamp).",
)
@click.option(
    "--peft-config",
    "peft_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="allocate: also write DIR/adapter_config.json, a peft LoraConfig giving every Linear of"
    " block k rank units_k * --rank-step (rank_pattern / alpha_pattern); needs --model or a"
    " local scored model folder, and the peft extra.",
)
@click.option(
    "--peft-alpha-ratio",
    type=finite(0, min_open=True),
    default=2.0,
    show_default=True,
    help="--peft-config: lora_alpha = ratio * rank in every block (equal alpha / r scaling).",
)
@click.option(
    "--llmcompressor-recipe",
    "llmc_recipe",
    type=click.Path(dir_okay=False),
    default=None,
    help="prune: also write an llm-compressor recipe YAML whose pruning modifier takes the"
    " per-block sparsity list (targets: the decoder blocks).",
)
@click.option(
    "--llmcompressor-modifier",
    "llmc_modifier",
    type=click.Choice(["SparseGPTModifier", "WandaPruningModifier"]),
    default="SparseGPTModifier",
    show_default=True,
    help="--llmcompressor-recipe: the modifier the recipe uses.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the plan as JSON instead of a table.")
@click.option("--trust-remote-code", is_flag=True,
              help="With --model: allow the folder's own modelling code (auto_map in its config).")
@guards_output(inputs={"scores_path": "SCORES", "model_path": "--model"}, kind="file", json_types={"Plan"},
               overwrite=None)
def plan(
    scores_path, program, sparsity, budget, lo, hi, bounds, eta, kappa, psi, gamma, beta, alpha, cost,
    integer, rule, budget_fraction, rank_step, model_path, band, form, tau, out, peft_dir,
    peft_alpha_ratio, llmc_recipe, llmc_modifier, as_json, trust_remote_code,
) -> None:
    """Solve the pruning or capacity-allocation program from SCORES (a scores.json).

    \b
    Examples:
      cwca-export plan scores.json --program prune --sparsity 0.5 --bounds 0:0.3 --hi 0.8
      cwca-export plan scores.json --program prune --sparsity 0.7 --kappa 0.25 --psi log
      cwca-export plan scores.json --program allocate --budget 96 --lo 4 --hi 64
      cwca-export plan damage.json --sparsity 0.7 --band 0.2      # measured curves, OWL-style band
      cwca-export plan owl.json --sparsity 0.7 --rule band --band 0.08   # the OWL baseline
      cwca-export plan lowrank-damage.json --program allocate --budget-fraction 0.6 --rank-step 8
      cwca-export plan scores.json --program allocate --budget 96 --lo 4 --model ./my-llama \\
          --peft-config lora/ --rank-step 4      # LoRA ranks for recovery fine-tuning
      cwca-export plan scores.json --sparsity 0.5 --llmcompressor-recipe sparsity.yaml
    """
    from cwca_export.planning.plan import plan_allocation, plan_by_rule
    from cwca_export.scores import LayerScores

    if program == "prune" and sparsity is None:
        raise click.UsageError("--program prune needs --sparsity (e.g. --sparsity 0.5)")
    if program == "prune" and budget is not None:
        raise click.UsageError("--budget belongs to --program allocate; use --sparsity")
    if program == "prune" and budget_fraction is not None:
        raise click.UsageError("--budget-fraction belongs to --program allocate; use --sparsity")
    if program == "allocate" and sparsity is not None:
        raise click.UsageError("--sparsity belongs to --program prune; use --budget or --budget-fraction")
    if program == "prune" and peft_dir is not None:
        raise click.UsageError("--peft-config writes LoRA ranks from --program allocate; use --llmcompressor-recipe")
    if program == "allocate" and llmc_recipe is not None:
        raise click.UsageError("--llmcompressor-recipe writes sparsity from --program prune; use --peft-config")
    if llmc_recipe is not None:  # like --out: never an input, never a file the tool did not write (or one edited)
        from cwca_export.interop import recipe_file_intact
        from cwca_export.outputs import check_output

        check_output(llmc_recipe, kind="file", flag="--llmcompressor-recipe", recognise=recipe_file_intact,
                     inputs=[("SCORES", scores_path), ("--model", model_path), ("--out", out)])
    lo_blocks, hi_blocks = parse_bounds(bounds)
    scores = LayerScores.load(scores_path)
    if program == "allocate":
        rule = _allocate_rule(rule, scores, budget, budget_fraction)
    if program == "prune":
        if rule == "band" and band is None:
            raise click.UsageError("--rule band needs --band (OWL uses 0.08, LayerIF 0.3)")
        result = plan_by_rule(
            scores, sparsity, rule=rule, band=band, lo=lo, hi=0.95 if hi is None else hi,
            lo_blocks=lo_blocks, hi_blocks=hi_blocks, form=form, eta=eta, kappa=kappa, psi=psi, tau=tau,
        )
        rule = result.parameters["rule"]
        summary = (
            f"rule {rule}; "
            f"global sparsity {result.global_sparsity:.6f} (target {sparsity:g});"
            f" dual {result.dual:.4g}; objective {result.objective:.6g};"
            f" {result.iterations} dual evaluations"
        )
    elif rule == "damage":
        from cwca_export.planning.rank_plans import linear_shapes, plan_ranks_from_damage

        shapes = linear_shapes(_shapes_folder(model_path, scores), trust_remote_code=trust_remote_code)
        result = plan_ranks_from_damage(
            scores, budget_fraction, shapes=shapes, rank_step=rank_step, form=form, lo=lo,
            hi=0.95 if hi is None else hi, lo_blocks=lo_blocks, hi_blocks=hi_blocks,
        )
        total = sum(result.n_params)
        kept = result.parameters["kept_params"]
        summary = (
            f"rule damage; kept {kept:,} of {total:,} block weights ({kept / total:.4f}, budget"
            f" {budget_fraction:g}); rank = units * {rank_step}; dual {result.dual:.4g};"
            f" modelled damage {result.objective:.6g}"
        )
    else:
        result = plan_allocation(
            scores, budget, cost=cost, gamma=gamma, beta=beta, alpha=alpha, lo=lo,
            hi=math.inf if hi is None else hi, lo_blocks=lo_blocks, hi_blocks=hi_blocks,
            integer=integer, tau=tau,
        )
        spent = sum(c * x for c, x in zip(result.cost, result.x, strict=True))
        summary = (
            f"spent {spent:g} of budget {budget:g}; dual {result.dual:.4g};"
            f" objective {result.objective:.6g}; {result.iterations} dual evaluations"
        )
    if peft_dir is not None and rule == "damage":
        raise click.UsageError(
            "--peft-config: rule damage's units are ranks a factorisation keeps, not adapter ranks;"
            " use --rule cwca --budget N"
        )
    # the side files first: a refusal there (no peft, a folder with weights) leaves no plan behind
    extra = _write_interop(result, scores, peft_dir, peft_alpha_ratio, rank_step, model_path, llmc_recipe,
                           llmc_modifier)
    path = result.save(out)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2))
        return
    click.echo(_table(result))
    click.echo(summary)
    click.echo(f"scores: {scores.method} ({scores.num_blocks} blocks); wrote {path}")
    for line in extra:
        click.echo(line)


def _write_interop(result, scores, peft_dir, alpha_ratio, rank_step, model_path, llmc_recipe, llmc_modifier):
    """The plan in peft's and llm-compressor's formats, when asked; one line per file written."""
    from cwca_export import interop

    lines = []
    if peft_dir is not None:
        written = interop.write_peft_config(
            result, peft_dir, model_path=_shapes_folder(model_path, scores, flag="--peft-config"),
            rank_step=rank_step, alpha_ratio=alpha_ratio,
        )
        ranks = interop.lora_ranks(result, rank_step)
        lines.append(f"peft LoraConfig: ranks {ranks} (units * {rank_step}); wrote {written}")
    if llmc_recipe is not None:
        written = interop.write_llmcompressor_recipe(result, llmc_recipe, modifier=llmc_modifier)
        lines.append(f"llm-compressor recipe ({llmc_modifier}): wrote {written}")
    return lines


def _allocate_rule(rule: str, scores, budget: float | None, budget_fraction: float | None) -> str:
    """The allocation rule: cwca (value program, --budget) or damage (ranks, --budget-fraction)."""
    if rule == "band":
        raise click.UsageError("--rule band is a pruning rule; --program allocate takes cwca or damage")
    if budget is not None and budget_fraction is not None:
        raise click.UsageError("--budget (rule cwca) and --budget-fraction (rule damage): give one")
    if rule == "auto":
        from cwca_export.planning.plan import damage_pruner, has_damage_curves

        low_rank = has_damage_curves(scores) and damage_pruner(scores) in ("lowrank", "asvd")
        rule = "damage" if budget_fraction is not None or (low_rank and budget is None) else "cwca"
    if rule == "damage" and budget_fraction is None:
        raise click.UsageError("--program allocate --rule damage needs --budget-fraction (e.g. 0.6)")
    if rule == "cwca" and budget is None:
        raise click.UsageError("--program allocate needs --budget (e.g. --budget 96)")
    if rule == "cwca" and budget_fraction is not None:
        raise click.UsageError("--budget-fraction belongs to --rule damage; rule cwca takes --budget")
    return rule


def _shapes_folder(model_path: str | None, scores, flag: str = "--rule damage for ranks") -> str:
    """Where the Linear shapes come from: --model, else the folder the scores were made from."""
    if model_path is not None:
        return model_path
    from pathlib import Path

    recorded = scores.model.get("name_or_path") or ""
    if recorded and (Path(recorded) / "config.json").is_file():
        return recorded
    raise click.UsageError(
        f"{flag} needs each Linear's shape: pass --model MODEL_DIR (the scored"
        f" model's folder; the scores record {recorded!r}, which is not a local folder)"
    )
