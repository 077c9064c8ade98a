"""``cwca-export run``: carry out a YAML recipe (score, plan, compress, export, eval)."""

from __future__ import annotations

import json

import click

from cwca_export.cli.guard import guards_output
from cwca_export.cli.options import OVERWRITE_HELP, loading_options


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Output folder: scores, plan, compressed model, artifact, report (written atomically);"
              " required unless --dry-run.")
@click.option("--set", "overrides", multiple=True, metavar="KEY.PATH=VALUE",
              help="Override a recipe key before validation, VALUE parsed as YAML; repeatable,"
              " e.g. --set plan.sparsity=0.6 --set export.quantize=int4.")
@click.option("--dry-run", is_flag=True, help="Validate the recipe (types and every name in it), print the"
              " steps and exit 0 without running any.")
@click.option("--cache-dir", type=click.Path(file_okay=False), default=None,
              help="Where scores are cached by model fingerprint, data hash and scorer settings"
              " [default: $CWCA_CACHE_DIR or ~/.cache/cwca-export].")
@click.option("--no-cache", is_flag=True, help="Always score; neither read nor write the cache.")
@click.option("--overwrite", is_flag=True,
              help=OVERWRITE_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the run summary (with --dry-run: the"
              " validated recipe) as JSON.")
@loading_options
@guards_output(inputs={"recipe_path": "RECIPE"}, overwrite=None)  # run_recipe checks the rest (its model, data)
def run(recipe_path, out, overrides, dry_run, cache_dir, no_cache, overwrite, as_json, trust_remote_code,
        allow_pickle) -> None:
    """Run RECIPE, a YAML file naming the model, data and every step (see recipes/README.md).

    The whole recipe is validated before any step runs; scores are reused from the cache when
    the model, data and scorer settings are unchanged (a new sparsity or budget re-plans only).

    \b
    Examples:
      cwca-export run recipes/examples/demo-wanda-50.yaml --out demo-run
      cwca-export run recipes/examples/demo-wanda-50.yaml --dry-run --set plan.sparsity=0.6
      cwca-export run my-recipe.yaml --out build/llama-70 --set plan.sparsity=0.7 --overwrite
    """
    from cwca_export.recipe import Recipe, default_cache_dir, run_recipe

    recipe = Recipe.load(recipe_path, overrides=overrides)
    if dry_run:
        if as_json:
            click.echo(json.dumps(recipe.model_dump(mode="json"), indent=2))
        else:
            for line in recipe.describe():
                click.echo(line)
        return
    if out is None:
        raise click.UsageError("give --out DIR (or --dry-run to only validate)")
    cache = None if no_cache else (cache_dir or default_cache_dir())
    summary = run_recipe(recipe, out, overwrite=overwrite, echo=lambda m: click.echo(m, err=as_json),
                         cache_dir=cache, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
