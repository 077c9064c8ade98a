"""``cwca-export run``: carry out a YAML recipe (score, plan, compress, export, eval)."""

from __future__ import annotations

import json

import click

from cwca_export.cli.options import loading_options


@click.command()
@click.argument("recipe_path", metavar="RECIPE", type=click.Path(exists=True, dir_okay=False))
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="Output folder: scores, plan, compressed model, artifact, report (written atomically).")
@click.option("--overwrite", is_flag=True, help="Replace an existing --out folder (atomically).")
@click.option("--json", "as_json", is_flag=True, help="Print the run summary as JSON.")
@loading_options
def run(recipe_path, out, overwrite, as_json, trust_remote_code, allow_pickle) -> None:
    """Run RECIPE, a YAML file naming the model, data and every step (see recipes/README.md).

    \b
    Examples:
      cwca-export run recipes/examples/demo-wanda-50.yaml --out demo-run
      cwca-export run my-recipe.yaml --out build/llama-70 --overwrite
    """
    from cwca_export.recipe import Recipe, run_recipe

    recipe = Recipe.load(recipe_path)
    summary = run_recipe(recipe, out, overwrite=overwrite, echo=lambda m: click.echo(m, err=as_json),
                         trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
